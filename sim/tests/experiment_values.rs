//! No value of a numeric field of an fl-sim experiment panics fl-sim: every integer and float field
//! of a small experiment — training on synthetic data, the same under each rule and scheduler, and
//! a systems-only fleet, with every default spelled out — is set, one at a time, to the edges of
//! the integer and float ranges, zero, negatives, NaN and infinities, and seeded random magnitudes.
//! Each case is parsed, checked and, when accepted, run (at most two versions, so a legal but long
//! stopping rule does not make the test long). A value either fails with an error or runs; a panic
//! is reported with its field and value.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

use shoal_fuzz::config_values::{Variant, merged, method_tables, try_variants};
use shoal_sim::experiment::{ExperimentConfig, Quiet, run};

/// Seeded random values per field, beside the edge values.
const RANDOM_PER_FIELD: usize = 3;

/// Six synthetic clients, three per round, two local steps, two rounds.
const TRAINING: &str = r#"
name = "values"
seed = 1
[data]
dataset = "synthetic"
[data.synthetic]
num_clients = 6
dim = 8
classes = 3
[model]
name = "mlp"
batch_size = 4
[algorithm]
local_lr = 0.05
local_steps = 2
rule = { rule = "fedavg" }
scheduler = { scheduler = "sync", clients_per_round = 3 }
[fleet]
base_step_time_s = 0.05
compute = { kind = "lognormal", sigma = 0.8 }
up = { kind = "lognormal", median_mbit_s = 5, sigma = 0.5 }
dropout = 0.1
[stop]
rounds = 2
time_s = 1000
target_accuracy = 0.99
[eval]
every = 1
"#;

/// Parses, checks and runs `case` for at most two versions: `Ok(true)` when it ran.
fn check_and_run(case: toml::Value) -> anyhow::Result<bool> {
    let mut config: ExperimentConfig = case.try_into()?;
    config.validate()?;
    config.stop.rounds = Some(config.stop.rounds.map_or(2, |r| r.min(2)));
    run(&config, None, &mut Quiet)?;
    Ok(true)
}

/// `TRAINING` with `tables` merged over it (tables key by key), written out with every default,
/// varied under the tables `under`.
fn variant(tables: &str, under: &[&'static str]) -> Variant {
    let doc = merged(TRAINING, tables).unwrap();
    let config: ExperimentConfig = doc.try_into().unwrap();
    config.validate().unwrap();
    Variant {
        doc: toml::Value::try_from(&config).unwrap(),
        under: under.to_vec(),
    }
}

#[test]
fn no_value_of_a_numeric_field_panics_a_run() {
    let mut variants = vec![variant("", &[])];
    for tables in method_tables() {
        variants.push(variant(&tables, &["algorithm"]));
    }
    variants.push(variant(
        "mode = \"systems-only\"\n[fleet]\ncount = 40",
        &["fleet", "server", "data"],
    ));
    let tally = try_variants(&variants, 100, RANDOM_PER_FIELD, check_and_run);
    eprintln!(
        "{} fields, {} experiments, {} accepted and run",
        tally.fields, tally.cases, tally.accepted
    );
    if let Some(defect) = tally.defect() {
        panic!("{defect}");
    }
}
