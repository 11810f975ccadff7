//! Experiments: one TOML file describes a run (dataset, partition, model, `[algorithm]`, codec,
//! `[fleet]`, stopping rule, evaluation, seed); [`run`] carries it out on the engine and returns
//! the per-evaluation metrics and the summary that `fl-sim run` writes.
//!
//! A file may start from another with `extends = "base.toml"` (a path relative to the file): tables
//! merge key by key, anything else in the extending file replaces the base's value. A family of
//! experiments then shares one base and differs only where it says so.

use crate::engine::{Engine, EngineStats, SimError};
use crate::fleet::{FleetConfig, FleetSummary};
use crate::server::ServerModel;
use crate::split::{SplitSetup, SplitTraffic, SplitWorkload};
use crate::training::{SystemsWorkload, TrainingSetup, TrainingWorkload};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use shoal_aggregators::AlgorithmConfig;
use shoal_aggregators::hierarchy::TimelineStats;
use shoal_compression::CodecSpec;
use shoal_compression::feedback::Feedback;
use shoal_core::Params;
use shoal_core::Timestamp;
use shoal_engine::metrics::{FoldWindow, RunTotals, VersionRecord};
use shoal_model::Model;
use shoal_model::data::partition::PartitionSpec;
use shoal_model::data::synthetic::SyntheticConfig;
use shoal_model::data::{Dataset, DatasetName, resolve_data_root};
pub use shoal_model::zoo::ModelConfig;
use shoal_split::SplitConfig;
use shoal_split::inference::{self, SplitProfile};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Whether devices really train.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Real training on real data; accuracy and bytes are measured.
    #[default]
    Training,
    /// Sizes and times only, for fleets of 10⁵–10⁶ devices: no data, no training, no accuracy.
    SystemsOnly,
    /// Split learning (SplitFed V1/V2, `[split]`): devices train the head, the server the tail;
    /// every minibatch's activations and gradients cross the simulated links.
    Split,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist` or `synthetic`.
    pub dataset: DatasetName,
    /// Data root holding `mnist/` and `device_traces/` (else `--data-dir` or `$SHOAL_DATA`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// How the training set is split across clients; omitted for `synthetic`, whose generated
    /// clients are the split.
    #[serde(default)]
    pub partition: Option<PartitionSpec>,
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
    /// Virtual seconds to simulate.
    #[serde(default)]
    pub time_s: Option<f64>,
    /// Test accuracy (0–1) at which the run stops; `rounds_to_target` and `time_to_target_s` are
    /// reported against it.
    #[serde(default)]
    pub target_accuracy: Option<f64>,
}

fn default_eval_batch() -> usize {
    1000
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate the global model on the test set every this many versions. With neither `every`
    /// nor `every_s`, every version is evaluated; the last version always is.
    #[serde(default)]
    pub every: Option<u64>,
    /// Evaluate at the first version produced after each multiple of this many virtual seconds —
    /// the fair choice when methods produce versions at very different rates.
    #[serde(default)]
    pub every_s: Option<f64>,
    /// Evaluation batch size.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Evaluate on the first N test samples only (all when absent).
    #[serde(default)]
    pub test_samples: Option<usize>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: None,
            every_s: None,
            batch_size: default_eval_batch(),
            test_samples: None,
        }
    }
}

/// One experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Name in reports (default: the file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Seed of every random choice: data split, initial model, fleet, sampling, minibatches.
    #[serde(default)]
    pub seed: u64,
    /// `training` (default) or `systems-only`.
    #[serde(default)]
    pub mode: Mode,
    /// Dataset and split.
    pub data: DataConfig,
    /// Network and minibatch size.
    pub model: ModelConfig,
    /// Rule, scheduler, local work — the same table fl-server reads.
    pub algorithm: AlgorithmConfig,
    /// Upload codec chain (default: dense f32).
    #[serde(default = "CodecSpec::identity")]
    pub codec: CodecSpec,
    /// Error feedback around the codec: `none` (default), `ef` or `ef21`.
    #[serde(default)]
    pub feedback: Feedback,
    /// The devices.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// When to stop.
    #[serde(default)]
    pub stop: StopConfig,
    /// When and how to evaluate.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Split learning (`mode = "split"`): cut, bottleneck, SplitFed variant, cut codecs.
    #[serde(default)]
    pub split: Option<SplitConfig>,
    /// The simulated server's compute (split runs charge the tail's work on it).
    #[serde(default)]
    pub server: ServerModel,
}

/// Merges `over` into `base`: tables key by key, everything else replaced.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn load_value(path: &Path, depth: usize) -> Result<toml::Value> {
    ensure!(
        depth < 8,
        "{}: `extends` chains deeper than 8 files",
        path.display()
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut value: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let base = match value.as_table_mut().and_then(|t| t.remove("extends")) {
        None => return Ok(value),
        Some(toml::Value::String(base)) => base,
        Some(other) => bail!("{}: `extends` must be a path, got {other}", path.display()),
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
    let mut merged = load_value(&base_path, depth + 1)
        .with_context(|| format!("{} extends {}", path.display(), base_path.display()))?;
    merge(&mut merged, value);
    Ok(merged)
}

impl ExperimentConfig {
    /// Reads an experiment file (following `extends`); the name defaults to the file's stem.
    pub fn load(path: &Path) -> Result<Self> {
        let value = load_value(path, 0)?;
        let mut config: Self = value
            .try_into()
            .with_context(|| format!("{} is not a valid experiment", path.display()))?;
        if config.name.is_none() {
            config.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        config.validate().with_context(|| format!("{}", path.display()))?;
        Ok(config)
    }

    /// The name used in reports.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("experiment")
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<()> {
        // The engine's check of the method (algorithm, codec, feedback): the same in fl-server.
        shoal_engine::check_method(
            &self.algorithm,
            &self.codec,
            self.feedback,
            self.seed,
            self.mode == Mode::Split,
        )?;
        ensure!(
            self.stop.rounds.is_some() || self.stop.time_s.is_some(),
            "[stop] needs `rounds` or `time_s` (a target accuracy alone may never be reached)"
        );
        if let Some(t) = self.stop.time_s {
            ensure!(
                t.is_finite() && t > 0.0,
                "[stop] time_s must be positive, got {t}"
            );
        }
        if let Some(a) = self.stop.target_accuracy {
            ensure!(
                (0.0..=1.0).contains(&a),
                "[stop] target_accuracy is a fraction in [0, 1], got {a}"
            );
        }
        self.data
            .dataset
            .check(&self.data.synthetic)
            .context("[data.synthetic]")?;
        ensure!(self.eval.every != Some(0), "[eval] every must be at least 1");
        if let Some(t) = self.eval.every_s {
            ensure!(
                t.is_finite() && t > 0.0,
                "[eval] every_s must be positive, got {t}"
            );
        }
        self.model.check()?;
        self.fleet.validate()?;
        if let Some(aggregation) = &self.server.aggregation {
            aggregation
                .check()
                .map_err(|e| anyhow::anyhow!("[server.aggregation] {e}"))?;
        }
        match (&self.split, self.mode) {
            (Some(split), Mode::Split) => {
                split.check_algorithm(&self.algorithm)?;
                ensure!(
                    self.server.gflops.is_finite() && self.server.gflops > 0.0 && self.server.lanes >= 1,
                    "[server] needs gflops > 0 and lanes ≥ 1"
                );
                split
                    .cut_model(&self.model_for_shape()?)
                    .with_context(|| format!("[split] cutting `{}`", self.model.name))?;
            }
            (None, Mode::Split) => bail!("mode = \"split\" needs a [split] table (at least `cut`)"),
            (Some(_), _) => bail!("a [split] table needs mode = \"split\""),
            (None, _) => {}
        }
        if self.mode == Mode::SystemsOnly {
            ensure!(
                self.fleet.count.is_some() || self.data.partition.is_some(),
                "systems-only runs need [fleet] count (or a [data.partition] with num_clients)"
            );
        } else if self.data.dataset == DatasetName::Mnist {
            ensure!(
                self.data.partition.is_some(),
                "[data] partition is required for mnist (e.g. {{ kind = \"iid\", num_clients = 100 }})"
            );
        }
        Ok(())
    }

    fn data_root(&self, cli: Option<&Path>) -> Option<PathBuf> {
        let explicit = cli.map(Path::to_path_buf).or_else(|| self.data.data_dir.clone());
        resolve_data_root(explicit.as_deref()).ok()
    }

    fn model_for_shape(&self) -> Result<Model> {
        let (shape, classes) = self.data.dataset.shape(&self.data.synthetic);
        self.model
            .build(&shape, classes)
            .with_context(|| format!("[model] `{}`", self.model.name))
    }

    /// Seconds per local step on a reference device: configured, or one minibatch's training
    /// FLOPs of `model` at the reference rate.
    fn base_step_time(&self, model: &Model) -> f64 {
        self.fleet
            .base_step_time(model.training_flops_per_sample() * self.model.batch_size as u64)
    }

    /// The number of devices: the partition's clients (training), or `[fleet] count`.
    fn device_count(&self) -> usize {
        match (self.mode, self.fleet.count, &self.data.partition) {
            (Mode::SystemsOnly, Some(n), _) => n,
            (_, _, Some(p)) => p.num_clients(),
            (_, Some(n), None) => n,
            (_, None, None) => self.data.synthetic.num_clients,
        }
    }

    /// The fleet this experiment simulates, without loading its dataset.
    pub fn fleet_summary(&self, data_dir: Option<&Path>) -> Result<FleetSummary> {
        let model = self.model_for_shape()?;
        let base = self.base_step_time(&model);
        let root = self.data_root(data_dir);
        let fleet = self
            .fleet
            .build(self.device_count(), base, root.as_deref(), self.seed)?;
        Ok(fleet.summary())
    }
}

/// One evaluation of the global model: a line of `metrics.jsonl`, the same schema as fl-server's.
pub type MetricRecord = VersionRecord;

/// What `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Experiment name (fl-sim only).
    pub name: String,
    /// `training` or `systems-only` (fl-sim only).
    pub mode: Mode,
    /// What every run's summary holds, fl-server's too: rule, scheduler, codec, feedback, versions,
    /// accuracies, bytes, updates, run and wall time (`time_s` is virtual here).
    #[serde(flatten)]
    pub totals: RunTotals,
    /// Model name (fl-sim only).
    pub model: String,
    /// Parameters of the model.
    pub num_params: usize,
    /// Devices simulated.
    pub clients: usize,
    /// The target accuracy, if any.
    pub target_accuracy: Option<f64>,
    /// First version at which the target was reached.
    pub rounds_to_target: Option<u64>,
    /// Virtual seconds until then.
    pub time_to_target_s: Option<f64>,
    /// Bytes (up + down) until then.
    pub bytes_to_target: Option<u64>,
    /// Why the run ended.
    pub stopped_because: String,
    /// Happenings simulated per wall-clock second.
    pub events_per_s: f64,
    /// Peak resident memory of the process, bytes (Linux; absent elsewhere).
    pub peak_memory_bytes: Option<u64>,
    /// The engine's counters.
    pub engine: EngineStats,
    /// The fleet that was simulated.
    pub fleet: FleetSummary,
    /// Split runs: what crossed the cut, what each side computes, split inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitSummary>,
    /// The server's aggregation work, when `[server.aggregation]` charges it on the clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<AggregationSummary>,
}

/// The simulated server's aggregation runtime in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregationSummary {
    /// Folds, queueing, and the time from each aggregation's call to its new model.
    #[serde(flatten)]
    pub timeline: TimelineStats,
    /// Mean time from an aggregation's call to its new model (s).
    pub mean_aggregation_s: f64,
    /// Time the devices waited for aggregations (call to new model) as a share of the virtual
    /// time: near 1, the server is the bottleneck.
    pub share_of_time: f64,
    /// Leaf time spent folding over the time the leaves there were could fold (up to 1).
    pub utilisation: f64,
}

/// Split learning in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    /// The `[split]` table as run.
    pub config: SplitConfig,
    /// Parameters and FLOPs of each side (what the device must hold and run).
    pub profile: SplitProfile,
    /// Forward-message bytes per training sample (activations and labels), over folded tasks.
    pub bytes_up_per_sample: f64,
    /// Gradient bytes per training sample.
    pub bytes_down_per_sample: f64,
    /// Traffic totals of the folded tasks.
    pub traffic: SplitTraffic,
    /// Bytes per sample of the raw input (1 per pixel for MNIST, 4 per feature otherwise).
    pub raw_input_bytes_per_sample: f64,
    /// Bytes per sample of the cut tensor without the bottleneck, as f32.
    pub cut_f32_bytes_per_sample: f64,
    /// Bytes per sample of the cut tensor without the bottleneck, through the activation codec
    /// (measured on the test set with the trained head).
    pub cut_encoded_bytes_per_sample: f64,
    /// Split inference of the final model on the test set, through the activation codec.
    pub inference: SplitInference,
}

/// Split inference (split computing) with the final model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitInference {
    /// Test accuracy as deployed (quantised activations).
    pub accuracy: f64,
    /// Bytes a device sends per sample in evaluation batches.
    pub bytes_per_sample: f64,
    /// Bytes of a one-sample request.
    pub request_bytes: f64,
    /// Latency of one sample over the fleet: head on the device, request over its uplink, tail on
    /// the server, the prediction back over its downlink.
    pub latency_s: crate::fleet::Quantiles,
}

/// Everything a run produces.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The configuration run.
    pub config: ExperimentConfig,
    /// One record per evaluation.
    pub records: Vec<MetricRecord>,
    /// The summary.
    pub summary: Summary,
}

/// What a progress display learns during a run.
pub trait RunProgress {
    /// The run begins, bounded by `rounds` versions or `time_s` virtual seconds.
    fn begin(&mut self, name: &str, rounds: Option<u64>, time_s: Option<f64>);
    /// A version was produced at virtual time `time_s`.
    fn aggregated(&mut self, version: u64, time_s: f64);
    /// An evaluation was recorded.
    fn evaluated(&mut self, record: &MetricRecord);
    /// The run ended.
    fn end(&mut self, summary: &Summary);
}

/// No display.
pub struct Quiet;

impl RunProgress for Quiet {
    fn begin(&mut self, _: &str, _: Option<u64>, _: Option<f64>) {}
    fn aggregated(&mut self, _: u64, _: f64) {}
    fn evaluated(&mut self, _: &MetricRecord) {}
    fn end(&mut self, _: &Summary) {}
}

/// Runs `config`; `data_dir` overrides the file's data root.
pub fn run(
    config: &ExperimentConfig,
    data_dir: Option<&Path>,
    progress: &mut dyn RunProgress,
) -> Result<RunOutput> {
    config.validate()?;
    let start = Instant::now();
    let root = config.data_root(data_dir);
    let (algorithm, coordinator) = config.algorithm.build(config.seed)?;
    let parts = algorithm.server.upload_parts();
    match config.mode {
        Mode::SystemsOnly => {
            let model = config.model_for_shape()?;
            let count = config.device_count();
            let base = config.base_step_time(&model);
            let fleet = config.fleet.build(count, base, root.as_deref(), config.seed)?;
            let workload = SystemsWorkload::for_model(model.layout(), &config.codec, config.seed)?;
            let engine = Engine::new(coordinator, fleet, vec![1; count], workload);
            let engine = charge_server(engine, config, parts * model.num_params());
            drive(
                config,
                &model,
                engine,
                |_: &Engine<SystemsWorkload>| Ok(None),
                |_: &Engine<SystemsWorkload>, _| Ok(None),
                start,
                progress,
            )
        }
        Mode::Training => {
            let (engine, test) = training_engine(config, root.as_deref(), coordinator)?;
            let model = engine.workload().shared_model();
            let engine = charge_server(engine, config, parts * model.num_params());
            let batch_size = config.eval.batch_size;
            let evaluate = |engine: &Engine<TrainingWorkload>| {
                let e = engine.workload().evaluate(&test, batch_size)?;
                Ok(Some((e.accuracy, e.loss)))
            };
            drive(config, &model, engine, evaluate, |_, _| Ok(None), start, progress)
        }
        Mode::Split => run_split(config, root.as_deref(), coordinator, start, progress),
    }
}

/// The engine of a training experiment as [`run`] builds it (without charging the server's
/// aggregation on the clock), and its held-out set: for callers that step it one version at a time
/// and read the model after each ([`Engine::next_aggregation`], [`TrainingWorkload::model_params`]).
pub fn training_engine_for(
    config: &ExperimentConfig,
    data_dir: Option<&Path>,
) -> Result<(Engine<TrainingWorkload>, Dataset)> {
    config.validate()?;
    ensure!(
        config.mode == Mode::Training,
        "a training engine needs mode = \"training\""
    );
    let root = config.data_root(data_dir);
    let (_, coordinator) = config.algorithm.build(config.seed)?;
    training_engine(config, root.as_deref(), coordinator)
}

fn training_engine(
    config: &ExperimentConfig,
    root: Option<&Path>,
    coordinator: shoal_aggregators::Coordinator,
) -> Result<(Engine<TrainingWorkload>, Dataset)> {
    let loaded = load(config, root)?;
    let workload = TrainingWorkload::new(TrainingSetup {
        model: loaded.model,
        train: loaded.train,
        partition: loaded.partition,
        batch_size: config.model.batch_size,
        config: config.algorithm.clone(),
        codec: config.codec.clone(),
        feedback: config.feedback,
        seed: config.seed,
    })?;
    Ok((
        Engine::new(coordinator, loaded.fleet, loaded.samples, workload),
        loaded.test,
    ))
}

/// The engine, charging the server's aggregation on the clock when `[server.aggregation]` asks,
/// for uploads of `values` values.
fn charge_server<W: crate::engine::Workload>(
    engine: Engine<W>,
    config: &ExperimentConfig,
    values: usize,
) -> Engine<W> {
    match &config.server.aggregation {
        Some(aggregation) => engine.charge_aggregation(aggregation.timeline(values)),
        None => engine,
    }
}

/// A training or split run's data, model and fleet.
struct Loaded {
    train: Arc<Dataset>,
    test: Dataset,
    partition: Vec<Vec<usize>>,
    model: Arc<Model>,
    fleet: crate::fleet::Fleet,
    samples: Vec<u64>,
}

fn load(config: &ExperimentConfig, root: Option<&Path>) -> Result<Loaded> {
    let data = config
        .data
        .dataset
        .load(root, &config.data.synthetic)
        .context("loading the dataset")?;
    let partition = match (&config.data.partition, data.natural_partition) {
        (Some(spec), _) => spec
            .partition(data.train.labels(), data.train.num_classes(), config.seed)
            .context("[data] partition")?,
        (None, Some(natural)) => natural,
        (None, None) => bail!("[data] partition is required for {:?}", config.data.dataset),
    };
    let model = Arc::new(
        config
            .model
            .build(data.train.sample_shape(), data.train.num_classes())
            .with_context(|| format!("[model] `{}`", config.model.name))?,
    );
    let base = config.base_step_time(&model);
    let fleet = config
        .fleet
        .build(partition.num_clients(), base, root, config.seed)?;
    let samples: Vec<u64> = partition.sizes().into_iter().map(|s| s as u64).collect();
    let mut test = data.test;
    if let Some(n) = config.eval.test_samples {
        test = test.head(n);
    }
    Ok(Loaded {
        train: Arc::new(data.train),
        test,
        partition: partition.clients().to_vec(),
        model,
        fleet,
        samples,
    })
}

/// Bytes a prediction takes on the way back to the device in split inference.
const PREDICTION_BYTES: u64 = 8;

fn run_split(
    config: &ExperimentConfig,
    root: Option<&Path>,
    coordinator: shoal_aggregators::Coordinator,
    start: Instant,
    progress: &mut dyn RunProgress,
) -> Result<RunOutput> {
    let split_config = config
        .split
        .clone()
        .context("mode = \"split\" needs a [split] table")?;
    let loaded = load(config, root)?;
    let (model, test) = (loaded.model, loaded.test);
    let workload = SplitWorkload::new(SplitSetup {
        model: model.clone(),
        train: loaded.train,
        partition: loaded.partition,
        batch_size: config.model.batch_size,
        lr: config.algorithm.local_lr,
        split: split_config.clone(),
        codec: config.codec.clone(),
        server: config.server,
        seed: config.seed,
    })?;
    let engine = Engine::new(coordinator, loaded.fleet, loaded.samples, workload);
    // fl-server folds a split update as one dense vector [head | tail].
    let cut = engine.workload().split_model();
    let values = cut.head.num_params() + cut.tail.num_params();
    let engine = charge_server(engine, config, values);
    let batch_size = config.eval.batch_size;
    let evaluate = |engine: &Engine<SplitWorkload>| {
        let e = engine.workload().evaluate(&test, batch_size)?;
        Ok(Some((e.accuracy, e.loss)))
    };
    // `accuracy`: the final version's, as the last record evaluated it.
    let describe = |engine: &Engine<SplitWorkload>, accuracy: Option<f64>| -> Result<Option<SplitSummary>> {
        let w = engine.workload();
        let split = w.split_model();
        let (head, _) = w.params();
        let sent = inference::forward_bytes(split, head, &split_config.activations, &test, batch_size)?;
        let traffic = w.traffic();
        let per = |bytes: u64| bytes as f64 / traffic.samples.max(1) as f64;
        // The same cut without the bottleneck: the trained head's layers up to the cut layer.
        let plain = Arc::new(model.split(&split_config.cut, None)?);
        let mut plain_head = Params::zeros(plain.head.layout().clone());
        plain_head.copy_matching_segments(&Params::from_vec(split.head.layout().clone(), head.to_vec())?);
        let plain_values: usize = plain.wire_shape().iter().product();
        let plain_bytes = inference::forward_bytes(
            &plain,
            plain_head.as_slice(),
            &split_config.activations,
            &test,
            batch_size,
        )?;
        let request = inference::forward_bytes(
            split,
            head,
            &split_config.activations,
            &test.head(100.min(test.len())),
            1,
        )?;
        let profile = SplitProfile::of(split);
        let whole_flops = (model.training_flops_per_sample() * config.model.batch_size as u64).max(1) as f64;
        let server_s = profile.tail_forward_flops as f64 / (config.server.gflops * 1e9);
        let latency: Vec<f64> = engine
            .fleet()
            .devices
            .iter()
            .map(|d| {
                let head_s = d.step_time_s * profile.head_forward_flops as f64 / whole_flops;
                let up_s = d.up.transfer_s(0.0, request.ceil() as u64);
                let down_s = d.down.transfer_s(head_s + up_s + server_s, PREDICTION_BYTES);
                head_s + up_s + server_s + down_s
            })
            .collect();
        Ok(Some(SplitSummary {
            config: split_config.clone(),
            profile,
            bytes_up_per_sample: per(traffic.forward_bytes),
            bytes_down_per_sample: per(traffic.gradient_bytes),
            traffic,
            raw_input_bytes_per_sample: crate::split::raw_input_bytes(
                config.data.dataset,
                model.input_shape(),
            ),
            cut_f32_bytes_per_sample: 4.0 * plain_values as f64,
            cut_encoded_bytes_per_sample: plain_bytes,
            inference: SplitInference {
                accuracy: accuracy.unwrap_or(f64::NAN),
                bytes_per_sample: sent,
                request_bytes: request,
                latency_s: crate::fleet::Quantiles::of(latency),
            },
        }))
    };
    drive(config, &model, engine, evaluate, describe, start, progress)
}

#[allow(clippy::too_many_arguments)]
fn drive<W: crate::engine::Workload>(
    config: &ExperimentConfig,
    model: &Model,
    mut engine: Engine<W>,
    evaluate: impl Fn(&Engine<W>) -> Result<Option<(f64, f64)>, SimError>,
    describe_split: impl FnOnce(&Engine<W>, Option<f64>) -> Result<Option<SplitSummary>>,
    start: Instant,
    progress: &mut dyn RunProgress,
) -> Result<RunOutput> {
    let name = config.display_name().to_string();
    progress.begin(&name, config.stop.rounds, config.stop.time_s);
    let until = config
        .stop
        .time_s
        .map_or(Timestamp(u64::MAX), Timestamp::from_secs_f64);
    let mut records = Vec::new();
    let mut window = FoldWindow::default();
    let mut version = 0u64;
    let mut updates_folded = 0u64;
    // `time_s`: when the version was ready (its aggregation's call, plus the server's work on it).
    let record = |engine: &Engine<W>,
                  version: u64,
                  time_s: f64,
                  window: &mut FoldWindow,
                  updates_folded: u64|
     -> Result<MetricRecord> {
        let eval = evaluate(engine).context("evaluating the global model")?;
        let stats = engine.stats();
        let folded = window.take();
        Ok(MetricRecord {
            version,
            time_s,
            wall_s: start.elapsed().as_secs_f64(),
            accuracy: eval.map(|e| e.0),
            loss: eval.map(|e| e.1),
            client_loss: folded.client_loss.filter(|_| eval.is_some()),
            bytes_up: stats.bytes_up,
            bytes_down: stats.bytes_down,
            updates: folded.updates,
            updates_folded,
            staleness_mean: folded.staleness_mean,
            staleness_max: folded.staleness_max,
        })
    };
    let first = record(&engine, 0, 0.0, &mut window, 0)?;
    let mut version_time_s = 0.0;
    progress.evaluated(&first);
    records.push(first);
    let target = config.stop.target_accuracy;
    let reached = |r: &MetricRecord| matches!((target, r.accuracy), (Some(t), Some(a)) if a >= t);
    let mut stopped_because = String::new();
    if reached(&records[0]) {
        stopped_because = "target accuracy reached".into();
    }
    while stopped_because.is_empty() {
        let Some(agg) = engine.next_aggregation(until)? else {
            stopped_because = if engine.now() >= until {
                format!("virtual time limit ({} s)", until.as_secs_f64())
            } else {
                "nothing left to happen (every device idle or offline for good)".into()
            };
            break;
        };
        version = agg.version.0;
        version_time_s = agg.time.as_secs_f64();
        window.add(
            agg.updates as u64,
            agg.staleness_mean,
            agg.staleness_max,
            agg.client_loss,
        );
        updates_folded += agg.updates as u64;
        progress.aggregated(version, agg.time.as_secs_f64());
        let last_round = config.stop.rounds.is_some_and(|r| version >= r);
        let by_versions = match (config.eval.every, config.eval.every_s) {
            (Some(n), _) => version % n == 0,
            (None, None) => true,
            (None, Some(_)) => false,
        };
        let now_s = agg.time.as_secs_f64();
        let by_time = config
            .eval
            .every_s
            .is_some_and(|dt| (now_s / dt).floor() > (records.last().map_or(0.0, |r| r.time_s) / dt).floor());
        if by_versions || by_time || last_round {
            let r = record(&engine, version, version_time_s, &mut window, updates_folded)?;
            progress.evaluated(&r);
            let hit = reached(&r);
            records.push(r);
            if hit {
                stopped_because = "target accuracy reached".into();
            }
        }
        if last_round && stopped_because.is_empty() {
            stopped_because = format!("{version} rounds");
        }
    }
    if records.last().is_some_and(|r| r.version != version) {
        let r = record(&engine, version, version_time_s, &mut window, updates_folded)?;
        progress.evaluated(&r);
        records.push(r);
    }
    let final_accuracy = records.last().and_then(|r| r.accuracy);
    let split = describe_split(&engine, final_accuracy).context("measuring the split model")?;
    let wall = start.elapsed().as_secs_f64();
    let stats = engine.stats();
    let first_hit = records.iter().find(|r| reached(r));
    // The last version may be ready after the last event, once the server's aggregation is charged.
    let virtual_time_s = records
        .last()
        .map_or(0.0, |r| r.time_s)
        .max(engine.now().as_secs_f64());
    let accuracies: Vec<f64> = records.iter().filter_map(|r| r.accuracy).collect();
    let summary = Summary {
        name,
        mode: config.mode,
        totals: RunTotals {
            rule: config.algorithm.rule.name().to_string(),
            scheduler: engine.coordinator().scheduler_name().to_string(),
            codec: config.codec.to_string(),
            feedback: config.feedback.to_string(),
            rounds: version,
            initial_accuracy: records.first().and_then(|r| r.accuracy),
            final_accuracy: records.last().and_then(|r| r.accuracy),
            best_accuracy: accuracies.iter().copied().reduce(f64::max),
            bytes_up: stats.bytes_up,
            bytes_down: stats.bytes_down,
            updates_folded,
            time_s: virtual_time_s,
            wall_time_s: wall,
        },
        model: config.model.name.clone(),
        num_params: model.num_params(),
        clients: engine.fleet().devices.len(),
        target_accuracy: target,
        rounds_to_target: first_hit.map(|r| r.version),
        time_to_target_s: first_hit.map(|r| r.time_s),
        bytes_to_target: first_hit.map(|r| r.bytes_up + r.bytes_down),
        stopped_because,
        events_per_s: stats.events as f64 / wall.max(1e-9),
        peak_memory_bytes: shoal_core::usage::peak_memory_bytes(),
        engine: stats,
        fleet: engine.fleet().summary(),
        split,
        aggregation: engine.aggregation_stats().map(|t| AggregationSummary {
            timeline: t.clone(),
            mean_aggregation_s: t.aggregation_s / t.aggregations.max(1) as f64,
            share_of_time: t.aggregation_s / virtual_time_s.max(1e-12),
            utilisation: t.fold_busy_s / (virtual_time_s * t.max_leaves.max(1) as f64).max(1e-12),
        }),
    };
    progress.end(&summary);
    Ok(RunOutput {
        config: config.clone(),
        records,
        summary,
    })
}
