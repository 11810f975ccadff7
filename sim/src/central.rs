//! `fl-sim central`: centralised training on the whole training set, the baseline that federated
//! runs are compared against.
//!
//! Writes to the output directory:
//! - `summary.json`: configuration, `final_accuracy` (0–1), `final_loss`, `epochs`, `samples_per_s`,
//!   `wall_time_s`, and the per-epoch records;
//! - `epochs.jsonl` and `epochs.csv`: one record per epoch (train loss and accuracy, test loss and
//!   accuracy, elapsed seconds), ready to plot.

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use shoal_model::data::TrainTest;
use shoal_model::train::{Evaluation, LrSchedule, Sgd, SgdConfig, evaluate, train_epoch};
use shoal_model::zoo;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What to train and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralConfig {
    /// Model zoo name.
    pub model: String,
    /// Passes over the training set.
    pub epochs: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// Optimiser.
    pub sgd: SgdConfig,
    /// Decay the learning rate to zero over the run with a cosine (constant otherwise).
    pub cosine_lr: bool,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Use only the first N training samples (all when `None`).
    pub max_train_samples: Option<usize>,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
}

/// One epoch's record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's minibatches.
    pub train_loss: f32,
    /// Training accuracy over the epoch's minibatches.
    pub train_accuracy: f32,
    /// Test-set loss after the epoch.
    pub test_loss: f64,
    /// Test-set accuracy after the epoch.
    pub test_accuracy: f64,
    /// Seconds since training started (evaluation included).
    pub elapsed_s: f64,
}

/// What `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralSummary {
    /// Dataset name.
    pub dataset: String,
    /// The configuration trained.
    pub config: CentralConfig,
    /// Parameters of the model.
    pub num_params: usize,
    /// Training samples used.
    pub train_samples: usize,
    /// Test samples evaluated.
    pub test_samples: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Test accuracy after the last epoch, in [0, 1].
    pub final_accuracy: f64,
    /// Test loss after the last epoch.
    pub final_loss: f64,
    /// Training samples per second of training time (evaluation excluded).
    pub samples_per_s: f64,
    /// Seconds spent in training steps.
    pub train_time_s: f64,
    /// Seconds from start to finish, evaluation included.
    pub wall_time_s: f64,
    /// Per-epoch records.
    pub per_epoch: Vec<EpochRecord>,
}

/// Observer of a central run's progress (a progress bar in the CLI, nothing in tests).
pub trait CentralProgress {
    /// An epoch of `samples` training samples begins.
    fn epoch_started(&mut self, epoch: usize, samples: usize);
    /// `done` samples of the current epoch are trained.
    fn samples_done(&mut self, done: usize);
    /// An epoch finished and was evaluated.
    fn epoch_finished(&mut self, record: &EpochRecord);
}

/// Discards progress.
pub struct Quiet;

impl CentralProgress for Quiet {
    fn epoch_started(&mut self, _: usize, _: usize) {}
    fn samples_done(&mut self, _: usize) {}
    fn epoch_finished(&mut self, _: &EpochRecord) {}
}

/// Trains `config.model` on `data.train` and evaluates on `data.test` after every epoch.
pub fn run(
    config: &CentralConfig,
    data: &TrainTest,
    progress: &mut dyn CentralProgress,
) -> Result<CentralSummary> {
    train(config, data, progress).map(|(summary, _)| summary)
}

/// [`run`], also returning the trained weights.
pub fn train(
    config: &CentralConfig,
    data: &TrainTest,
    progress: &mut dyn CentralProgress,
) -> Result<(CentralSummary, Vec<f32>)> {
    anyhow::ensure!(config.epochs > 0, "--epochs must be at least 1");
    anyhow::ensure!(config.batch_size > 0, "--batch-size must be at least 1");
    let model = zoo::build(&config.model, data.train.sample_shape(), data.train.num_classes()).with_context(
        || {
            format!(
                "building model `{}` for dataset {}",
                config.model,
                data.train.name()
            )
        },
    )?;
    let mut params = model.init_params(config.seed);
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(0x5eed));
    let n = config
        .max_train_samples
        .map_or(data.train.len(), |m| m.min(data.train.len()));
    let schedule = if config.cosine_lr {
        LrSchedule::Cosine {
            total_steps: n.div_ceil(config.batch_size) * config.epochs,
        }
    } else {
        LrSchedule::Constant
    };
    let mut sgd = Sgd::with_schedule(config.sgd, schedule, model.layout());
    let indices: Vec<usize> = (0..n).collect();
    tracing::info!(model = %config.model, params = model.num_params(), train = n, test = data.test.len(), "central training");

    let start = Instant::now();
    let mut train_time = 0.0;
    let mut per_epoch = Vec::with_capacity(config.epochs);
    let mut last = Evaluation {
        accuracy: 0.0,
        loss: f64::NAN,
        samples: 0,
    };
    for epoch in 1..=config.epochs {
        progress.epoch_started(epoch, n);
        let epoch_start = Instant::now();
        let stats = train_epoch(
            &model,
            params.as_mut_slice(),
            &data.train,
            &indices,
            config.batch_size,
            &mut sgd,
            &mut rng,
            |done| progress.samples_done(done),
        )
        .with_context(|| format!("training epoch {epoch}"))?;
        train_time += epoch_start.elapsed().as_secs_f64();
        last =
            evaluate(&model, params.as_slice(), &data.test, config.eval_batch_size).context("evaluating")?;
        let record = EpochRecord {
            epoch,
            train_loss: stats.mean_loss,
            train_accuracy: stats.train_accuracy,
            test_loss: last.loss,
            test_accuracy: last.accuracy,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        progress.epoch_finished(&record);
        per_epoch.push(record);
    }
    let summary = CentralSummary {
        dataset: data.train.name().trim_end_matches("-train").to_string(),
        config: config.clone(),
        num_params: model.num_params(),
        train_samples: n,
        test_samples: data.test.len(),
        epochs: config.epochs,
        final_accuracy: last.accuracy,
        final_loss: last.loss,
        samples_per_s: (n * config.epochs) as f64 / train_time.max(1e-9),
        train_time_s: train_time,
        wall_time_s: start.elapsed().as_secs_f64(),
        per_epoch,
    };
    Ok((summary, params.into_vec()))
}

/// Writes `summary.json`, `epochs.jsonl` and `epochs.csv` into `dir` (created if needed).
pub fn write_outputs(summary: &CentralSummary, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating output directory {}", dir.display()))?;
    let summary_path = dir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(summary)? + "\n")
        .with_context(|| format!("writing {}", summary_path.display()))?;
    let mut jsonl = Vec::new();
    let mut csv = b"epoch,train_loss,train_accuracy,test_loss,test_accuracy,elapsed_s\n".to_vec();
    for r in &summary.per_epoch {
        writeln!(jsonl, "{}", serde_json::to_string(r)?)?;
        writeln!(
            csv,
            "{},{},{},{},{},{}",
            r.epoch, r.train_loss, r.train_accuracy, r.test_loss, r.test_accuracy, r.elapsed_s
        )?;
    }
    for (name, bytes) in [("epochs.jsonl", jsonl), ("epochs.csv", csv)] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
