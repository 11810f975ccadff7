//! An experiment as a deployment: the tables of `server.toml` that define the run (seed, codec,
//! feedback, `[data]`, `[model]`, `[algorithm]`) and what each fl-client needs to take its share
//! of the same partition — so the method a researcher simulated runs unchanged on real fl-server
//! and fl-client processes (`fl-sim deployment FILE --out DIR`, used by
//! `examples/local-federation.sh --config FILE`).

use crate::experiment::{ExperimentConfig, Mode};
use anyhow::{Context, Result, ensure};
use shoal_aggregators::SchedulerConfig;
use shoal_aggregators::schedulers::sync::SyncConfig;

/// Clients to start when the scheduler does not say how many a round needs.
const DEFAULT_CLIENTS: usize = 5;

/// What `fl-sim deployment` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// `server-tables.toml`: the run-defining tables, for `fl-server init --tables`.
    pub server_tables: String,
    /// `deployment.env`: shell assignments for the clients — `partition` (the experiment's
    /// `[data] partition` as an inline table for `fl-client --partition`), `partition_seed`,
    /// `dataset`, `num_clients`, and `clients_per_round` (the clients a synchronous round of `m`
    /// needs; otherwise [`DEFAULT_CLIENTS`], or fewer if the partition has fewer).
    pub client_env: String,
}

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The deployment of `config`, a training experiment with a `[data] partition`.
pub fn deployment(config: &ExperimentConfig) -> Result<Deployment> {
    ensure!(
        config.mode == Mode::Training,
        "only training experiments deploy (this one is {:?}); split deployments take `--split`",
        config.mode
    );
    let partition = config
        .data
        .partition
        .as_ref()
        .context("the experiment needs a [data] partition: each fl-client takes its share of it")?;
    let mut tables = toml::Table::new();
    tables.insert(
        "seed".into(),
        toml::Value::Integer(i64::try_from(config.seed).context("seed")?),
    );
    tables.insert("codec".into(), toml::Value::String(config.codec.to_string()));
    tables.insert(
        "feedback".into(),
        toml::Value::String(config.feedback.to_string()),
    );
    let mut data = toml::Table::new();
    data.insert("dataset".into(), toml::Value::try_from(config.data.dataset)?);
    data.insert("synthetic".into(), toml::Value::try_from(&config.data.synthetic)?);
    tables.insert("data".into(), toml::Value::Table(data));
    tables.insert("model".into(), toml::Value::try_from(&config.model)?);
    tables.insert("algorithm".into(), toml::Value::try_from(&config.algorithm)?);
    let server_tables = format!(
        "# The run-defining tables of experiment `{}`, written by `fl-sim deployment`.\n{}",
        config.display_name(),
        toml::to_string(&toml::Value::Table(tables)).context("writing the server tables")?
    );
    let inline = toml::Value::try_from(partition)?.to_string();
    let clients_per_round = match &config.algorithm.scheduler {
        SchedulerConfig::Sync(SyncConfig {
            clients_per_round: Some(m),
            ..
        }) => *m,
        _ => DEFAULT_CLIENTS.min(partition.num_clients()),
    };
    let dataset = match toml::Value::try_from(config.data.dataset)? {
        toml::Value::String(name) => name,
        other => anyhow::bail!("the dataset's name is not a string: {other}"),
    };
    let client_env = format!(
        "partition={}\npartition_seed={}\ndataset={}\nnum_clients={}\nclients_per_round={clients_per_round}\n",
        shell_quote(&inline),
        config.seed,
        shell_quote(&dataset),
        partition.num_clients(),
    );
    Ok(Deployment {
        server_tables,
        client_env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_aggregators::AlgorithmConfig;
    use shoal_model::data::partition::PartitionSpec;

    fn experiment() -> ExperimentConfig {
        toml::from_str(
            r#"seed = 9
codec = "topk(0.05)"
feedback = "ef"
[data]
dataset = "synthetic"
partition = { kind = "dirichlet", num_clients = 12, alpha = 0.3 }
[model]
name = "logreg"
[algorithm]
local_steps = 3
local_lr = 0.2
[algorithm.rule]
rule = "fedavgm"
momentum = 0.5
[algorithm.scheduler]
scheduler = "sync"
clients_per_round = 4
[stop]
rounds = 2
"#,
        )
        .expect("a valid experiment")
    }

    #[test]
    fn the_tables_and_the_partition_read_back_as_the_experiment_has_them() {
        let config = experiment();
        let d = deployment(&config).expect("deploys");
        let tables: toml::Table = toml::from_str(&d.server_tables).expect("valid TOML");
        let algorithm: AlgorithmConfig = tables["algorithm"]
            .clone()
            .try_into()
            .expect("the [algorithm] table");
        assert_eq!(algorithm, config.algorithm);
        assert_eq!(tables["seed"].as_integer(), Some(9));
        assert_eq!(tables["codec"].as_str(), Some("topk(0.05)"));
        assert_eq!(tables["feedback"].as_str(), Some("ef"));
        assert!(
            tables["data"].get("partition").is_none(),
            "the server has no partition"
        );
        let line = d
            .client_env
            .lines()
            .find_map(|l| l.strip_prefix("partition="))
            .expect("a partition");
        let inline = line.trim_matches('\'');
        #[derive(serde::Deserialize)]
        struct Wrap {
            partition: PartitionSpec,
        }
        let wrap: Wrap = toml::from_str(&format!("partition = {inline}")).expect("an inline table");
        assert_eq!(Some(wrap.partition), config.data.partition);
        for expected in [
            "partition_seed=9",
            "dataset='synthetic'",
            "num_clients=12",
            "clients_per_round=4",
        ] {
            assert!(
                d.client_env.lines().any(|l| l == expected),
                "{expected} in\n{}",
                d.client_env
            );
        }
    }

    #[test]
    fn an_experiment_without_a_partition_is_refused_with_the_reason() {
        let mut config = experiment();
        config.data.partition = None;
        let err = deployment(&config).expect_err("refused");
        assert!(err.to_string().contains("[data] partition"), "{err}");
    }
}
