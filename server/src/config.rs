//! `server.toml`: what a run trains (the same `[model]`, `[algorithm]` and `codec` tables as an
//! fl-sim experiment), when it stops, how the global model is evaluated, and how the daemon
//! listens and stores its state. `fl-server init` writes a commented one.

use crate::runtime::RuntimeConfig;
use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use shoal_aggregators::{AlgorithmConfig, RuleConfig, SchedulerConfig};
use shoal_compression::CodecSpec;
use shoal_compression::feedback::Feedback;
use shoal_model::data::DatasetName;
use shoal_model::data::synthetic::SyntheticConfig;
use shoal_model::zoo::ModelConfig;
use shoal_split::SplitConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `[data]`: the dataset the model is sized for, and the held-out set for evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist` or `synthetic`.
    pub dataset: DatasetName,
    /// Data root holding `mnist/` (else `--data-dir` or `$SHOAL_DATA`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Parameters of the synthetic dataset.
    #[serde(default)]
    pub synthetic: SyntheticConfig,
}

/// `[stop]`: the run ends at whichever comes first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConfig {
    /// Global versions to produce.
    #[serde(default)]
    pub rounds: Option<u64>,
    /// Held-out accuracy (0–1) at which the run stops (needs `[eval]`).
    #[serde(default)]
    pub target_accuracy: Option<f64>,
}

fn yes() -> bool {
    true
}
fn default_eval_batch() -> usize {
    1000
}

/// `[eval]`: evaluation of the global model on the dataset's held-out split, logged per version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Evaluate every this many versions (the last version always is).
    #[serde(default)]
    pub every: Option<u64>,
    /// Use the first N held-out samples only (all when absent).
    #[serde(default)]
    pub test_samples: Option<usize>,
    /// Evaluation batch size.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            every: None,
            test_samples: None,
            batch_size: default_eval_batch(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4433))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4434))
}
fn default_grace() -> f64 {
    30.0
}
fn default_idle() -> f64 {
    30.0
}
fn default_transfer() -> f64 {
    300.0
}
fn default_max_payload() -> u64 {
    1 << 30
}

/// `[server]`: addresses, authentication, timeouts and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// QUIC address devices connect to.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// gRPC admin address (loopback by default; port 0 picks a free one, written to
    /// `DIR/admin-listening`).
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Accept clients without a certificate (named by their Hello). Off unless set explicitly.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Seconds a disconnected client keeps its task before it counts as gone.
    #[serde(default = "default_grace")]
    pub reconnect_grace_s: f64,
    /// Seconds of silence after which a connection is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_s: f64,
    /// Seconds allowed for one payload transfer.
    #[serde(default = "default_transfer")]
    pub transfer_timeout_s: f64,
    /// Largest accepted update payload, bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: u64,
    /// MiB of update payloads the server holds in memory at once, across every connection; an
    /// upload beyond it waits (up to `transfer_timeout_s`) for room. At least `max_payload_bytes`.
    #[serde(default = "default_upload_memory")]
    pub upload_memory_mb: u64,
}

fn default_upload_memory() -> u64 {
    2048
}

/// The durations the daemon runs with, from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkDurations {
    /// A silent connection is closed after this.
    pub idle: Duration,
    /// Keep-alive pings this often (a quarter of `idle`, at least 0.5 s).
    pub keep_alive: Duration,
    /// One payload transfer may take this long.
    pub transfer: Duration,
    /// A disconnected client keeps its task this long.
    pub reconnect_grace: Duration,
}

impl NetworkConfig {
    /// The durations of `[server]`, each positive and at most [`MAX_SECONDS`]; an error names the
    /// field and the bound.
    pub fn durations(&self) -> Result<NetworkDurations> {
        let seconds = |name: &str, v: f64| {
            ensure!(
                v.is_finite() && v > 0.0 && v <= MAX_SECONDS,
                "[server] {name} must be positive and at most {MAX_SECONDS} s (about 116 days), got {v}"
            );
            Ok(Duration::from_secs_f64(v))
        };
        let idle = seconds("idle_timeout_s", self.idle_timeout_s)?;
        Ok(NetworkDurations {
            idle,
            keep_alive: (idle / 4).max(Duration::from_millis(500)),
            transfer: seconds("transfer_timeout_s", self.transfer_timeout_s)?,
            reconnect_grace: seconds("reconnect_grace_s", self.reconnect_grace_s)?,
        })
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin: default_admin(),
            allow_anonymous: false,
            reconnect_grace_s: default_grace(),
            idle_timeout_s: default_idle(),
            transfer_timeout_s: default_transfer(),
            max_payload_bytes: default_max_payload(),
            upload_memory_mb: default_upload_memory(),
        }
    }
}

fn default_keep() -> usize {
    20
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Model versions whose state files are kept (0: all).
    #[serde(default = "default_keep")]
    pub keep_versions: usize,
    /// Keep every folded update (with its weight) under `state/folded/VERSION/`, so
    /// `fl-server audit` can fold a version again, flat, and compare.
    #[serde(default)]
    pub keep_updates: bool,
    /// Versions between two snapshots of the Coordinator; each lets the event log drop what the
    /// snapshot before it covers, so a restart replays at most about twice this many versions'
    /// events (0: never, the log is replayed whole).
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
}

fn default_snapshot_every() -> u64 {
    50
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            keep_versions: default_keep(),
            keep_updates: false,
            snapshot_every: default_snapshot_every(),
        }
    }
}

/// The whole `server.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Seed of the initial model and of every scheduler choice.
    #[serde(default)]
    pub seed: u64,
    /// Dataset (model shape, held-out set).
    pub data: DataConfig,
    /// Network and minibatch size.
    pub model: ModelConfig,
    /// Rule, scheduler, local work — the same table as in fl-sim experiments.
    pub algorithm: AlgorithmConfig,
    /// Upload codec chain.
    #[serde(default = "CodecSpec::identity")]
    pub codec: CodecSpec,
    /// Error feedback around the codec: `none` (default) or `ef` (each client keeps its memory).
    #[serde(default)]
    pub feedback: Feedback,
    /// When to stop.
    #[serde(default)]
    pub stop: StopConfig,
    /// Evaluation.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Network.
    #[serde(default)]
    pub server: NetworkConfig,
    /// Storage.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Split learning: devices run the head, the server the tail (the same table as fl-sim's).
    #[serde(default)]
    pub split: Option<SplitConfig>,
    /// The aggregation runtime: fold mode, pool limits, keep-alive (does not define the run).
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Hierarchical deployment: this server is the top of leaf fl-servers, or a leaf of a top.
    #[serde(default)]
    pub federation: Option<FederationConfig>,
}

/// `[federation]`: fl-servers in a tree (ALGORITHMS.md §6). A leaf accepts its own clients, runs
/// each round among them on its aggregation runtime and forwards the partial aggregate — the f64
/// sums and their total weight, never an average — to the top as its update; the top merges the
/// leaves' partials and applies the rule once, so the result is the flat aggregate of every
/// client's update. Leaves train from the top's versions: a leaf's version `v` is the top's.
///
/// ```toml
/// [federation]                 # on the top
/// role = "top"
/// leaves = ["leaf-a", "leaf-b"]  # names of the certificates issued to the leaves
///
/// [federation]                 # on a leaf
/// role = "leaf"
/// top = "127.0.0.1:4433"
/// identity = "top-identity"    # ca.pem, client.pem, client.key from `fl-server issue-client TOP leaf-a`
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case", deny_unknown_fields)]
pub enum FederationConfig {
    /// The top: its clients are leaf fl-servers, whose updates are partial aggregates.
    Top {
        /// Certificate names of the leaves (their uploads must be, and only theirs may be, partials).
        leaves: Vec<String>,
    },
    /// A leaf: accepts clients, forwards partial aggregates to the top.
    Leaf {
        /// The top fl-server's QUIC address.
        top: SocketAddr,
        /// The name in the top's certificate.
        #[serde(default = "default_top_name")]
        server_name: String,
        /// Directory with the identity the top issued to this leaf (`ca.pem`, `client.pem`,
        /// `client.key`); relative paths are under the data directory. Its name is the leaf's name.
        identity: PathBuf,
    },
}

fn default_top_name() -> String {
    "localhost".into()
}

/// The longest time any `_s` setting may name: longer ones are surely a mistake, and far longer
/// ones would overflow the clock.
pub const MAX_SECONDS: f64 = 1e7;

/// The largest `[server] upload_memory_mb` (1 TiB): the budget counts MiB as semaphore permits.
pub const MAX_UPLOAD_MEMORY_MB: u64 = 1 << 20;

impl ServerConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid server configuration", path.display()))?;
        config.validate().with_context(|| path.display().to_string())?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<()> {
        // The engine's check of the method (algorithm, codec, feedback): the same in fl-sim.
        shoal_engine::check_method(
            &self.algorithm,
            &self.codec,
            self.feedback,
            self.seed,
            self.split.is_some(),
        )?;
        ensure!(
            self.stop.rounds.is_some() || self.stop.target_accuracy.is_some(),
            "[stop] needs `rounds` or `target_accuracy`"
        );
        if let Some(a) = self.stop.target_accuracy {
            ensure!(
                (0.0..=1.0).contains(&a),
                "[stop] target_accuracy is a fraction in [0, 1], got {a}"
            );
            ensure!(self.eval.enabled, "[stop] target_accuracy needs [eval] enabled");
        }
        self.data
            .dataset
            .check(&self.data.synthetic)
            .context("[data.synthetic]")?;
        ensure!(self.eval.every != Some(0), "[eval] every must be at least 1");
        self.model.check()?;
        self.server.durations()?;
        ensure!(self.stop.rounds != Some(0), "[stop] rounds must be at least 1");
        ensure!(
            self.storage.keep_versions != 1,
            "[storage] keep_versions must be 0 (all) or at least 2: a damaged latest version is made \
             again from the one before"
        );
        ensure!(
            self.server.max_payload_bytes >= 1,
            "[server] max_payload_bytes must be at least 1 (0 would refuse every update)"
        );
        ensure!(
            self.server.upload_memory_mb <= MAX_UPLOAD_MEMORY_MB
                && self.server.upload_memory_mb.saturating_mul(1 << 20) >= self.server.max_payload_bytes,
            "[server] upload_memory_mb must hold the largest upload (max_payload_bytes = {} needs at least \
             {}) and be at most {MAX_UPLOAD_MEMORY_MB}, got {}",
            self.server.max_payload_bytes,
            self.server.max_payload_bytes.div_ceil(1 << 20),
            self.server.upload_memory_mb
        );
        self.runtime
            .check()
            .map_err(|e| anyhow::anyhow!("[runtime] {e}"))?;
        if let Some(federation) = &self.federation {
            ensure!(self.split.is_none(), "[federation] does not combine with [split]");
            ensure!(
                matches!(
                    self.algorithm.rule,
                    RuleConfig::FedAvg { .. } | RuleConfig::FedAvgM { .. }
                ) && matches!(self.algorithm.scheduler, SchedulerConfig::Sync(_)),
                "[federation] runs fedavg or fedavgm under synchronous rounds (their sums merge across \
                 servers exactly; the other rules keep state per client or per update)"
            );
            if let FederationConfig::Top { leaves } = federation {
                ensure!(!leaves.is_empty(), "[federation] role = \"top\" needs `leaves`");
            }
        }
        if let Some(split) = &self.split {
            split.check_algorithm(&self.algorithm)?;
            let (shape, classes) = self.data.dataset.shape(&self.data.synthetic);
            let model = self.model.build(&shape, classes).context("[model]")?;
            split.cut_model(&model).context("[split]")?;
        }
        Ok(())
    }

    /// A hash of everything that defines the run's results (not addresses, timeouts or storage),
    /// so a restart with another algorithm, model, codec or seed is refused.
    pub fn fingerprint(&self) -> u64 {
        let mut defining = serde_json::json!({
            "seed": self.seed,
            "data": self.data,
            "model": self.model,
            "algorithm": self.algorithm,
            "codec": self.codec.to_string(),
            "split": self.split,
        });
        // Only a run with feedback names it, so runs from before the key keep their fingerprint.
        if self.feedback != Feedback::None {
            defining["feedback"] = serde_json::json!(self.feedback);
        }
        xxhash_rust::xxh3::xxh3_64(defining.to_string().as_bytes())
    }
}

/// The tables of `server.toml` a run-defining file may set (`fl-server init --tables`, written by
/// `fl-sim deployment` from an experiment).
const RUN_TABLES: [&str; 9] = [
    "seed",
    "codec",
    "feedback",
    "data",
    "model",
    "algorithm",
    "split",
    "stop",
    "eval",
];

/// The configuration `template` with its top-level keys and tables replaced by those of `tables`
/// (TOML text holding only [`RUN_TABLES`]); checked as a whole before it is returned.
pub fn with_tables(template: &str, tables: &str) -> Result<String> {
    let mut config: toml::Table = toml::from_str(template).context("the configuration template")?;
    let tables: toml::Table = toml::from_str(tables).context("parsing the tables")?;
    for (key, value) in tables {
        ensure!(
            RUN_TABLES.contains(&key.as_str()),
            "`{key}` is not a table that defines a run (only {}; [server], [storage] and [runtime] stay the \
             template's)",
            RUN_TABLES.join(", ")
        );
        config.insert(key, value);
    }
    let text = format!(
        "# fl-server configuration, from the template of `fl-server init` with the run's tables replaced\n\
         # (`fl-server init --tables`). Start the server with `fl-server run DIR`.\n{}",
        toml::to_string(&config).context("writing the configuration")?
    );
    let parsed: ServerConfig = toml::from_str(&text).context("the configuration with the tables")?;
    parsed.validate().context("the configuration with the tables")?;
    Ok(text)
}

/// The commented configuration `fl-server init` writes.
pub fn template(listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"# fl-server configuration. Start the server with `fl-server run DIR`.
#
# [model], [algorithm] and codec are the same tables as in fl-sim experiments, so a method
# studied in the simulator runs unchanged here. Changing seed, [data], [model], [algorithm] or
# codec makes the state under state/ unusable: start a new data directory for a new run.

seed = 1                       # initial model and every scheduler choice
codec = "identity"             # upload codec chain, e.g. "fedzip" or "topk(0.1) | kmeans(3) | huffman"
feedback = "none"              # error feedback around a lossy codec: none | ef

[data]
dataset = "mnist"              # the model's input shape, and the held-out set of [eval]
# data_dir = "/path/to/data"   # holds mnist/; else --data-dir or $SHOAL_DATA

[model]
name = "mlp"                   # logreg | mlp (FedAvg's 2NN) | cnn | lenet5
batch_size = 10                # local minibatch B

[algorithm]
local_steps = 50               # K local steps per task
local_lr = 0.05
evict_after_failures = 3       # failed tasks in a row before a client is disconnected
task_timeout_s = 900           # a task not answered within this fails, and its client drops it

[algorithm.rule]
rule = "fedavg"                # fedavg | fedavgm | fedavg-m | scaffold | scaffold-m | scallion |
                               # scafcom | fedasync | fedbuff | fedfix | fedcompass

[algorithm.scheduler]
scheduler = "sync"             # sync | fedbuff | fedasync | fedfix | fedcompass
clients_per_round = 5
deadline_s = 300               # a round closes without the clients that have not answered

[stop]                         # whichever comes first
rounds = 3                     # global versions to produce
# target_accuracy = 0.97       # stop once the held-out accuracy reaches it

[eval]                         # the global model on the dataset's held-out split, per version
enabled = true
every = 1
# test_samples = 2000          # first N held-out samples only

[server]
listen = "{listen}"            # QUIC address devices connect to
admin = "{admin}"       # gRPC admin API (fl-server status DIR); keep it on loopback
allow_anonymous = false        # true accepts clients without certificates: only for trusted networks
reconnect_grace_s = 30         # a disconnected client keeps its task this long
idle_timeout_s = 30
transfer_timeout_s = 300
max_payload_bytes = 1073741824
upload_memory_mb = 2048        # update payloads held in memory at once, all clients together

[storage]
keep_versions = 20             # model versions whose files are kept (0: all)
keep_updates = false           # keep folded updates under state/folded/ for `fl-server audit`
snapshot_every = 50            # versions between Coordinator snapshots, which compact the event log (0: never)

[runtime]                      # the aggregation runtime (serverless workers, leaf → middle → top)
mode = "eager"                 # eager: fold each update as it arrives; lazy: all at the end
max_leaves = 0                 # leaves folding at once (0: this machine's cores)
memory_mb = 2048               # what the leaves' f64 accumulators may take
fan_in = 32                    # updates one leaf is planned to fold
leaves_per_middle = 4          # leaves one middle merges
keep_alive_s = 60              # an idle worker stays warm this long, then retires
scale_up_queue = 2             # a leaf joins when every leaf has this many updates waiting

# A hierarchical deployment (FedAvg or FedAvgM under sync rounds). On the top, whose clients are
# leaf fl-servers (issue each a certificate with `fl-server issue-client DIR leaf-a`):
# [federation]
# role = "top"
# leaves = ["leaf-a", "leaf-b"]
# On a leaf, which accepts its own clients and forwards partial sums to the top:
# [federation]
# role = "leaf"
# top = "10.0.0.5:4433"          # the top's QUIC address
# identity = "top-identity"      # the directory `issue-client` made on the top (relative: under DIR)

# Split learning (SplitFed): devices run the head of the model and send the activations at the
# cut; this server runs the tail and returns the gradient. The rule must be fedavg (server_lr 1)
# and the scheduler sync. Uncomment to enable:
# [split]
# cut = "pool1"                  # the layer after which the model is cut (cnn: its first conv block)
# bottleneck = {{ channels = 4 }}  # a learned 1×1-convolution bottleneck at the cut
# variant = "v1"                 # v1: a tail per client, averaged; v2: one tail, clients in turn
# activations = "int8 | zstd(1)" # codec of the activations; gradients = "f32" (or "int8")
# momentum = 0.0                 # SGD momentum of both sides (learning rate: local_lr)
# pipeline = 4                   # minibatches a device keeps in flight
"#
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn run_tables_replace_the_template_s_and_the_rest_stay() {
        let listen = "127.0.0.1:4433".parse().expect("an address");
        let admin = "127.0.0.1:4434".parse().expect("an address");
        let text = with_tables(
            &template(listen, admin),
            "codec = \"topk(0.1)\"\nfeedback = \"ef\"\n[data]\ndataset = \"synthetic\"\n[model]\nname = \"logreg\"\nbatch_size = 4\n",
        )
        .expect("valid tables");
        let config: ServerConfig = toml::from_str(&text).expect("a valid configuration");
        assert_eq!(config.codec.to_string(), "topk(0.1)");
        assert_eq!(config.feedback, Feedback::Ef);
        assert_eq!(config.model.name, "logreg");
        assert_eq!(config.server.listen, listen, "[server] stays the template's");
        let err =
            with_tables(&template(listen, admin), "[server]\nlisten = \"0.0.0.0:1\"\n").expect_err("refused");
        assert!(err.to_string().contains("`server`"), "{err}");
        // The whole configuration is checked: SCAFFOLD with a lossy codec is refused.
        let err = with_tables(
            &template(listen, admin),
            "codec = \"topk(0.1)\"\n[algorithm.rule]\nrule = \"scaffold\"\n",
        )
        .expect_err("refused");
        assert!(format!("{err:#}").contains("lossless"), "{err:#}");
    }

    use super::*;

    #[test]
    fn the_template_is_a_valid_configuration() {
        let config: ServerConfig = toml::from_str(&template(default_listen(), default_admin())).unwrap();
        config.validate().unwrap();
        assert!(!config.server.allow_anonymous, "mutual TLS is the default");
        let mut other = config.clone();
        other.server.listen = "0.0.0.0:9".parse().unwrap();
        assert_eq!(
            other.fingerprint(),
            config.fingerprint(),
            "addresses do not define a run"
        );
        other.seed += 1;
        assert_ne!(other.fingerprint(), config.fingerprint());
    }

    #[test]
    fn the_templates_commented_split_table_enables_a_valid_split_run() {
        // What examples/local-federation.sh --split does: uncomment from `# [split]` to the end.
        let base = template(default_listen(), default_admin());
        let at = base.find("# [split]").unwrap();
        let tail: String = base[at..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let split = format!("{}{tail}", &base[..at]).replace("name = \"mlp\"", "name = \"cnn\"");
        let config: ServerConfig = toml::from_str(&split).unwrap();
        assert!(config.split.is_some() && config.federation.is_none());
        config.validate().unwrap();
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let base = template(default_listen(), default_admin());
        let no_stop = base.replace("rounds = 3", "");
        let config: ServerConfig = toml::from_str(&no_stop).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("[stop]"));
        // The engine's codec–rule check, as fl-sim makes it: SCAFFOLD with a lossy codec.
        let lossy = base
            .replace("codec = \"identity\"", "codec = \"topk(0.1)\"")
            .replace("rule = \"fedavg\"", "rule = \"scaffold\"");
        let config: ServerConfig = toml::from_str(&lossy).unwrap();
        let e = config.validate().unwrap_err().to_string();
        assert!(
            e.contains("scaffold") && e.contains("topk(0.1)") && e.contains("lossless"),
            "{e}"
        );
        let typo = base.replace("[storage]", "[storage]\nkeep_verisons = 2");
        assert!(toml::from_str::<ServerConfig>(&typo).is_err());
        // Federations: a top names its leaves; only rules whose sums merge across servers.
        let top = format!("{base}\n[federation]\nrole = \"top\"\nleaves = []\n");
        let config: ServerConfig = toml::from_str(&top).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("leaves"));
        let leaf = format!(
            "{}\n[federation]\nrole = \"leaf\"\ntop = \"127.0.0.1:4433\"\nidentity = \"id\"\n",
            base.replace("rule = \"fedavg\"", "rule = \"scaffold\"")
        );
        let config: ServerConfig = toml::from_str(&leaf).unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("fedavg or fedavgm")
        );
        // Values that would panic or stall the daemon are refused at load, by name.
        for (from, to, named) in [
            ("idle_timeout_s = 30", "idle_timeout_s = 1e30", "idle_timeout_s"),
            (
                "reconnect_grace_s = 30",
                "reconnect_grace_s = 1e19",
                "reconnect_grace_s",
            ),
            (
                "transfer_timeout_s = 300",
                "transfer_timeout_s = inf",
                "transfer_timeout_s",
            ),
            ("keep_alive_s = 60", "keep_alive_s = 1e30", "keep_alive_s"),
            ("rounds = 3", "rounds = 0", "rounds"),
            (
                "max_payload_bytes = 1073741824",
                "max_payload_bytes = 0",
                "max_payload_bytes",
            ),
            ("memory_mb = 2048", "memory_mb = 0", "memory_mb"),
            ("keep_versions = 20", "keep_versions = 1", "keep_versions"),
            (
                "upload_memory_mb = 2048",
                "upload_memory_mb = 10",
                "upload_memory_mb",
            ),
        ] {
            assert!(base.contains(from), "the template sets `{from}`");
            let config: ServerConfig = toml::from_str(&base.replace(from, to)).unwrap();
            let e = config.validate().expect_err(to).to_string();
            assert!(e.contains(named), "{to}: {e}");
        }
        let runtime = base.replace("scale_up_queue = 2", "scale_up_queue = 0");
        let config: ServerConfig = toml::from_str(&runtime).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("[runtime]"));
    }
}
