//! `fl-sim`: Shoal's simulator and research command line.
//!
//! Subcommands:
//! - `run FILE`: simulate one experiment (a fleet on a virtual clock, real training) and write
//!   `metrics.jsonl`, `metrics.csv`, `summary.json` and SVG plots;
//! - `compare A.toml B.toml …`: run several and draw them on the same plots, with a table;
//! - `fleet FILE`: print what an experiment's fleet looks like;
//! - `central`: train one model centrally on a whole dataset (the baseline federated runs are
//!   compared against) and write `summary.json`, `epochs.jsonl` and `epochs.csv`;
//! - `bench training`: training throughput of the model zoo on MNIST next to the machine's sgemm rate;
//! - `bench fold`: aggregation fold throughput next to a memory copy of the same bytes.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_model::data::DatasetName;
use shoal_model::data::synthetic::SyntheticConfig;
use shoal_model::data::{DATA_DIR_ENV, mnist};
use shoal_model::train::SgdConfig;
use shoal_model::zoo::MODEL_NAMES;
use shoal_sim::bench::{self, BenchConfig};
use shoal_sim::central::{self, CentralConfig, CentralProgress, EpochRecord};
use shoal_sim::codec_bench;
use shoal_sim::experiment::{self, ExperimentConfig, MetricRecord, RunOutput, RunProgress, Summary};
use shoal_sim::fold_bench;
use shoal_sim::report;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "fl-sim",
    version,
    about = "Shoal's simulator: federated-learning experiments and baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate one experiment file: a device fleet on a virtual clock with real training.
    Run(RunArgs),
    /// Run several experiment files and draw them on the same plots, with a table of summaries.
    Compare(CompareArgs),
    /// Print what an experiment's fleet looks like: devices, quantiles of speed and bandwidth,
    /// availability.
    Fleet(FleetArgs),
    /// Write what deploys an experiment on real fl-server and fl-client processes: the tables of
    /// server.toml that define the run (for `fl-server init --tables`) and the clients' partition.
    Deployment(DeploymentArgs),
    /// Train a model centrally on the whole training set and report test accuracy per epoch.
    Central(CentralArgs),
    /// Split computing, BottleFit's way: train the model centrally, inject a bottleneck at a cut,
    /// distil it against the trained model, fine-tune the server side with the device side frozen,
    /// and report split-inference accuracy and bytes per sample.
    Distill(DistillArgs),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchSuite),
}

#[derive(Subcommand)]
enum BenchSuite {
    /// Training throughput (samples/s) on MNIST against the machine's sgemm GFLOP/s.
    Training(BenchArgs),
    /// Folding f32 updates into the aggregation accumulator (GB/s) against a memory copy.
    Fold(FoldArgs),
    /// Every codec on a real MNIST update: compression ratio, encode/decode MB/s, L2 error.
    Codecs(CodecsArgs),
}

#[derive(Args)]
struct CodecsArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Codec chains to measure, separated by `;` (default: a representative set, FedZip included).
    #[arg(long, value_delimiter = ';')]
    codecs: Vec<String>,
    /// Model whose update is compressed.
    #[arg(long, default_value = "cnn", value_parser = clap::builder::PossibleValuesParser::new(MODEL_NAMES))]
    model: String,
    /// Clients the training set is split into (IID); client 0 trains one local epoch.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Local learning rate (plain SGD).
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Timed repetitions per codec (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seed of the model, partition and batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct FoldArgs {
    /// Update sizes in parameters, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    params: Vec<usize>,
    /// Updates folded per measurement.
    #[arg(long, default_value_t = 8)]
    updates: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also write the rates as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DataArgs {
    /// Folder holding `mnist/` with the original IDX files (e.g. ../shared/data).
    #[arg(long, env = DATA_DIR_ENV, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The experiment file (TOML; see examples/).
    file: PathBuf,
    /// Output directory (default: runs/<experiment name>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// Experiment files, run one after the other.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Output directory: one sub-directory per experiment, the shared plots and the table.
    #[arg(long, value_name = "DIR", default_value = "runs/compare")]
    out: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct FleetArgs {
    /// The experiment file whose [fleet] to draw.
    file: PathBuf,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct DeploymentArgs {
    /// The experiment file.
    file: PathBuf,
    /// Folder to write `server-tables.toml` and `deployment.env` into (created if needed).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct CentralArgs {
    /// Dataset to train on.
    #[arg(long, default_value = "mnist")]
    dataset: DatasetName,
    /// Model from the zoo: logreg, mlp (FedAvg 2NN), cnn (FedAvg CNN), lenet5.
    #[arg(long, default_value = "cnn", value_parser = clap::builder::PossibleValuesParser::new(MODEL_NAMES))]
    model: String,
    /// Passes over the training set.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Minibatch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// SGD learning rate (the peak of the cosine decay unless --constant-lr).
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// SGD momentum (0 for plain SGD).
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// L2 weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Keep the learning rate constant instead of decaying it to zero over the run (cosine).
    #[arg(long)]
    constant_lr: bool,
    /// Seed for initialisation, shuffling and synthetic data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on only the first N training samples (quick checks).
    #[arg(long, value_name = "N")]
    max_train_samples: Option<usize>,
    /// Batch size used for test-set evaluation.
    #[arg(long, default_value_t = 256)]
    eval_batch_size: usize,
    /// synthetic(α, β): spread of the clients' models.
    #[arg(long, default_value_t = 1.0)]
    synthetic_alpha: f64,
    /// synthetic(α, β): spread of the clients' inputs.
    #[arg(long, default_value_t = 1.0)]
    synthetic_beta: f64,
    /// synthetic(α, β): number of clients whose data is pooled.
    #[arg(long, default_value_t = 30)]
    synthetic_clients: usize,
    /// Directory for summary.json, epochs.jsonl and epochs.csv.
    #[arg(long, value_name = "DIR", default_value = "runs/central")]
    out: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct DistillArgs {
    /// Model from the zoo.
    #[arg(long, default_value = "cnn", value_parser = clap::builder::PossibleValuesParser::new(MODEL_NAMES))]
    model: String,
    /// Layer after which the model is cut (cnn: pool1 is after its first conv block).
    #[arg(long, default_value = "pool1")]
    cut: String,
    /// Channels of the bottleneck at the cut.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Epochs of the teacher's central training.
    #[arg(long, default_value_t = 1)]
    teacher_epochs: usize,
    /// Minibatches of stage 1 (the bottleneck learns to reproduce the teacher's cut tensor).
    #[arg(long, default_value_t = 1000)]
    distill_steps: usize,
    /// Minibatches of stage 2 (decoder and tail fine-tuned, device side frozen).
    #[arg(long, default_value_t = 1000)]
    finetune_steps: usize,
    /// Minibatch size of every phase.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate of the teacher and of stage 2 (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Learning rate of stage 1.
    #[arg(long, default_value_t = 0.05)]
    distill_lr: f32,
    /// Codec of the bottleneck at inference.
    #[arg(long, default_value = "int8 | zstd(1)")]
    activations: shoal_compression::cut::CutCodec,
    /// Seed of initialisation and minibatch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for summary.json.
    #[arg(long, value_name = "DIR", default_value = "runs/distill")]
    out: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Models to benchmark, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "mlp,cnn")]
    models: Vec<String>,
    /// Minibatch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Timed SGD steps per model.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Side of the square sgemm baseline.
    #[arg(long, default_value_t = 1024)]
    gemm_size: usize,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
}

/// A progress bar per epoch, and a printed line with test accuracy after each.
struct BarProgress {
    bar: Option<ProgressBar>,
    epochs: usize,
}

impl CentralProgress for BarProgress {
    fn epoch_started(&mut self, epoch: usize, samples: usize) {
        let bar = ProgressBar::new(samples as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} samples ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{epoch}/{}", self.epochs));
        self.bar = Some(bar);
    }

    fn samples_done(&mut self, done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }

    fn epoch_finished(&mut self, r: &EpochRecord) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        println!(
            "epoch {}/{}: train loss {:.4}, train acc {:.4} | test loss {:.4}, test accuracy {:.4} ({:.1}s)",
            r.epoch, self.epochs, r.train_loss, r.train_accuracy, r.test_loss, r.test_accuracy, r.elapsed_s
        );
    }
}

fn central_cmd(args: CentralArgs) -> Result<()> {
    let synthetic = SyntheticConfig {
        alpha: args.synthetic_alpha,
        beta: args.synthetic_beta,
        num_clients: args.synthetic_clients,
        seed: args.seed,
        ..SyntheticConfig::default()
    };
    let data = args
        .dataset
        .load(args.data.data_dir.as_deref(), &synthetic)
        .context("loading the dataset")?;
    let config = CentralConfig {
        model: args.model,
        epochs: args.epochs,
        batch_size: args.batch_size,
        sgd: SgdConfig {
            lr: args.lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        },
        cosine_lr: !args.constant_lr,
        seed: args.seed,
        max_train_samples: args.max_train_samples,
        eval_batch_size: args.eval_batch_size,
    };
    let mut progress = BarProgress {
        bar: None,
        epochs: config.epochs,
    };
    let summary = central::run(&config, &data, &mut progress)?;
    central::write_outputs(&summary, &args.out)?;
    println!(
        "final test accuracy {:.4} after {} epoch(s); {:.0} samples/s; {:.1}s wall; wrote {}",
        summary.final_accuracy,
        summary.epochs,
        summary.samples_per_s,
        summary.wall_time_s,
        args.out.join("summary.json").display()
    );
    Ok(())
}

/// A progress bar over versions (or virtual seconds), with the latest accuracy.
struct RunBar {
    bar: ProgressBar,
    by_rounds: bool,
    last: String,
}

impl RunBar {
    fn new() -> Self {
        Self {
            bar: ProgressBar::hidden(),
            by_rounds: true,
            last: String::new(),
        }
    }
}

impl RunProgress for RunBar {
    fn begin(&mut self, name: &str, rounds: Option<u64>, time_s: Option<f64>) {
        let (len, unit) = match (rounds, time_s) {
            (Some(r), _) => (r, "versions"),
            (None, Some(t)) => (t.ceil() as u64, "virtual s"),
            (None, None) => (0, "versions"),
        };
        self.by_rounds = rounds.is_some();
        self.bar = ProgressBar::new(len);
        self.bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar.set_prefix(name.to_string());
    }

    fn aggregated(&mut self, version: u64, time_s: f64) {
        self.bar
            .set_position(if self.by_rounds { version } else { time_s as u64 });
        self.bar
            .set_message(format!("v{version} t={time_s:.0}s {}", self.last));
    }

    fn evaluated(&mut self, r: &MetricRecord) {
        if let Some(a) = r.accuracy {
            self.last = format!("acc {a:.4}");
        }
        self.bar.set_message(format!(
            "v{} t={:.0}s {} ↑{:.1} MB",
            r.version,
            r.time_s,
            self.last,
            r.bytes_up as f64 / 1e6
        ));
    }

    fn end(&mut self, _: &Summary) {
        self.bar.finish_and_clear();
    }
}

fn print_summary(s: &Summary, dir: &std::path::Path) {
    let acc = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |a| format!("{a:.4}"));
    println!(
        "{}: {} versions in {:.1} virtual s ({:.1} s wall; {}); final accuracy {}, best {}; {:.1} MB up, {:.1} MB down",
        s.name,
        s.totals.rounds,
        s.totals.time_s,
        s.totals.wall_time_s,
        s.stopped_because,
        acc(s.totals.final_accuracy),
        acc(s.totals.best_accuracy),
        s.totals.bytes_up as f64 / 1e6,
        s.totals.bytes_down as f64 / 1e6
    );
    if let Some(t) = s.target_accuracy {
        match (s.rounds_to_target, s.time_to_target_s) {
            (Some(r), Some(time)) => println!("  target {t}: reached at version {r}, {time:.1} virtual s"),
            _ => println!("  target {t}: not reached"),
        }
    }
    if let Some(sp) = &s.split {
        println!(
            "  split ({:?}, cut after `{}`{}): device head {} params, {:.2} MFLOP/sample forward; \
             up {:.1} B/sample, down {:.1} B/sample",
            sp.config.variant,
            sp.config.cut,
            sp.config
                .bottleneck
                .as_ref()
                .map_or(String::new(), |b| format!(", bottleneck {} channels", b.channels)),
            sp.profile.head_params,
            sp.profile.head_forward_flops as f64 / 1e6,
            sp.bytes_up_per_sample,
            sp.bytes_down_per_sample
        );
        println!(
            "  bytes per sample: raw input {:.0}, cut without bottleneck {:.0} (f32) / {:.1} ({}), sent {:.1}",
            sp.raw_input_bytes_per_sample,
            sp.cut_f32_bytes_per_sample,
            sp.cut_encoded_bytes_per_sample,
            sp.config.activations,
            sp.inference.bytes_per_sample
        );
        println!(
            "  split inference: accuracy {:.4}, {:.0} B per one-sample request, latency p50 {:.1} ms, p90 {:.1} ms",
            sp.inference.accuracy,
            sp.inference.request_bytes,
            sp.inference.latency_s.p50 * 1e3,
            sp.inference.latency_s.p90 * 1e3
        );
    }
    if let Some(a) = &s.aggregation {
        println!(
            "  server aggregation: {} folds on up to {} leaves, busy {:.1} % · devices waited {:.2} s for new \
             versions ({:.1} % of the time; mean {:.3} s, max {:.3} s) · queue up to {}",
            a.timeline.folds,
            a.timeline.max_leaves,
            a.utilisation * 100.0,
            a.timeline.aggregation_s,
            a.share_of_time * 100.0,
            a.mean_aggregation_s,
            a.timeline.max_aggregation_s,
            a.timeline.max_queue_depth
        );
    }
    println!(
        "  {} events, {:.0} events/s; wrote {}",
        s.engine.events,
        s.events_per_s,
        dir.display()
    );
}

fn run_one(
    file: &std::path::Path,
    out: Option<PathBuf>,
    data_dir: Option<&std::path::Path>,
) -> Result<(RunOutput, PathBuf)> {
    let config = ExperimentConfig::load(file)?;
    let dir = out.unwrap_or_else(|| PathBuf::from("runs").join(config.display_name()));
    let output = experiment::run(&config, data_dir, &mut RunBar::new())
        .with_context(|| format!("running {}", file.display()))?;
    report::write_run(&dir, &output)?;
    print_summary(&output.summary, &dir);
    Ok((output, dir))
}

fn run_cmd(args: RunArgs) -> Result<()> {
    run_one(&args.file, args.out, args.data.data_dir.as_deref()).map(|_| ())
}

fn compare_cmd(args: CompareArgs) -> Result<()> {
    let mut runs = Vec::with_capacity(args.files.len());
    let mut names = std::collections::BTreeSet::new();
    for file in &args.files {
        let name = ExperimentConfig::load(file)?.display_name().to_string();
        anyhow::ensure!(
            names.insert(name.clone()),
            "two experiments are named `{name}`; give each a distinct `name`"
        );
        let (output, _) = run_one(file, Some(args.out.join(&name)), args.data.data_dir.as_deref())?;
        runs.push(output);
    }
    let refs: Vec<&RunOutput> = runs.iter().collect();
    report::write_comparison(&args.out, &refs)?;
    let summaries: Vec<&Summary> = runs.iter().map(|r| &r.summary).collect();
    print!("{}", report::comparison_table(&summaries));
    println!("wrote {}", args.out.display());
    Ok(())
}

fn fleet_cmd(args: FleetArgs) -> Result<()> {
    let config = ExperimentConfig::load(&args.file)?;
    let summary = config.fleet_summary(args.data.data_dir.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary);
    }
    Ok(())
}

fn deployment_cmd(args: DeploymentArgs) -> Result<()> {
    let config = ExperimentConfig::load(&args.file)?;
    let deployment = shoal_sim::deployment::deployment(&config)
        .with_context(|| format!("deploying {}", args.file.display()))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for (name, text) in [
        ("server-tables.toml", &deployment.server_tables),
        ("deployment.env", &deployment.client_env),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes a benchmark report as pretty JSON.
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn bench_cmd(args: BenchArgs) -> Result<()> {
    for m in &args.models {
        anyhow::ensure!(
            MODEL_NAMES.contains(&m.as_str()),
            "unknown model `{m}`; known: {}",
            MODEL_NAMES.join(", ")
        );
    }
    let root = shoal_model::data::resolve_data_root(args.data.data_dir.as_deref())?;
    let data = mnist::load(&root).context("loading MNIST for the benchmark")?;
    let config = BenchConfig {
        models: args.models,
        batch_size: args.batch_size,
        steps: args.steps,
        gemm_size: args.gemm_size,
    };
    let report = bench::run(&config, &data.train)?;
    print!("{}", bench::render(&report));
    if let Some(path) = args.json {
        write_json(&path, &report)?;
    }
    Ok(())
}

fn fold_cmd(args: FoldArgs) -> Result<()> {
    anyhow::ensure!(
        args.updates >= 2 && args.reps >= 1,
        "--updates must be at least 2 and --reps at least 1"
    );
    anyhow::ensure!(args.params.iter().all(|&p| p > 0), "--params must be positive");
    let rates = fold_bench::run(&args.params, args.updates, args.reps);
    print!("{}", fold_bench::render(&rates));
    if let Some(path) = args.json {
        write_json(&path, &rates)?;
    }
    Ok(())
}

fn codecs_cmd(args: CodecsArgs) -> Result<()> {
    let chains: Vec<String> = if args.codecs.is_empty() {
        codec_bench::DEFAULT_CODECS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.codecs
    };
    let specs = chains
        .iter()
        .map(|c| c.parse::<shoal_compression::CodecSpec>())
        .collect::<Result<Vec<_>, _>>()
        .context("reading --codecs")?;
    anyhow::ensure!(
        args.clients >= 1 && args.batch_size >= 1,
        "--clients and --batch-size must be positive"
    );
    let root = shoal_model::data::resolve_data_root(args.data.data_dir.as_deref())?;
    let data = mnist::load(&root).context("loading MNIST for the benchmark")?;
    let config = codec_bench::UpdateConfig {
        model: args.model,
        clients: args.clients,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
    };
    let report = codec_bench::run(config, &data, &specs, args.reps)?;
    print!("{}", codec_bench::render(&report));
    if let Some(path) = args.json {
        write_json(&path, &report)?;
    }
    Ok(())
}

fn distill_cmd(args: DistillArgs) -> Result<()> {
    let data = DatasetName::Mnist
        .load(args.data.data_dir.as_deref(), &SyntheticConfig::default())
        .context("loading MNIST")?;
    let sgd = |lr| SgdConfig {
        lr,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    let config = shoal_sim::distill::DistillConfig {
        teacher: CentralConfig {
            model: args.model,
            epochs: args.teacher_epochs,
            batch_size: args.batch_size,
            sgd: sgd(args.lr),
            cosine_lr: true,
            seed: args.seed,
            max_train_samples: None,
            eval_batch_size: 256,
        },
        cut: args.cut,
        bottleneck: shoal_model::split::BottleneckSpec {
            channels: args.channels,
            decoder_relu: true,
        },
        stages: shoal_split::distill::TwoStageConfig {
            distill_steps: args.distill_steps,
            finetune_steps: args.finetune_steps,
            batch_size: args.batch_size,
            distill_sgd: sgd(args.distill_lr),
            finetune_sgd: sgd(args.lr),
            seed: args.seed,
        },
        activations: args.activations,
    };
    let mut progress = BarProgress {
        bar: None,
        epochs: config.teacher.epochs,
    };
    let s = shoal_sim::distill::run(&config, &data, &mut progress)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    write_json(&args.out.join("summary.json"), &s)?;
    println!(
        "teacher {:.4}; bottleneck as injected {:.4}, after two stages {:.4} (split inference, {})",
        s.teacher.final_accuracy, s.injected.accuracy, s.distilled.accuracy, s.config.activations
    );
    println!(
        "bytes per sample: raw input {:.0}, cut {:.0} (f32) / {:.1} (encoded), bottleneck {:.1}; \
         stage 1 MSE {:.4} → {:.4}, stage 2 loss {:.4} → {:.4} ({:.1} s); wrote {}",
        s.raw_input_bytes_per_sample,
        s.cut_f32_bytes_per_sample,
        s.cut_encoded_bytes_per_sample,
        s.distilled.bytes_per_sample,
        s.stages.distill_mse_start,
        s.stages.distill_mse_end,
        s.stages.finetune_loss_start,
        s.stages.finetune_loss_end,
        s.distill_time_s,
        args.out.join("summary.json").display()
    );
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run_cmd(args),
        Command::Compare(args) => compare_cmd(args),
        Command::Fleet(args) => fleet_cmd(args),
        Command::Deployment(args) => deployment_cmd(args),
        Command::Central(args) => central_cmd(args),
        Command::Distill(args) => distill_cmd(args),
        Command::Bench(BenchSuite::Training(args)) => bench_cmd(args),
        Command::Bench(BenchSuite::Fold(args)) => fold_cmd(args),
        Command::Bench(BenchSuite::Codecs(args)) => codecs_cmd(args),
    }
}
