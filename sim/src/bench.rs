//! `fl-sim bench`: training throughput of the model zoo on MNIST, against the machine's f32
//! matrix-multiply rate measured in the same run.
//!
//! Training spends its arithmetic in matrix multiplies (dense layers directly, convolutions through
//! im2col), so the sgemm rate is the ceiling: `fraction_of_gemm` says how much of it training uses.

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use shoal_model::data::Dataset;
use shoal_model::gemm::{Mat, gemm};
use shoal_model::train::{Sgd, SgdConfig, train_epoch};
use shoal_model::zoo;
use std::time::Instant;

/// The rate of one matrix-multiply shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GemmRate {
    /// What the shape stands for.
    pub label: String,
    /// Rows of the output.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of the output.
    pub n: usize,
    /// Median GFLOP/s over the timed repetitions.
    pub gflops: f64,
}

/// Training throughput of one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelThroughput {
    /// Model zoo name.
    pub model: String,
    /// Parameters.
    pub num_params: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// Timed SGD steps.
    pub steps: usize,
    /// Training samples per second (forward, backward, SGD step, batch gathering).
    pub samples_per_s: f64,
    /// FLOPs of one sample's training step (forward, weight and input gradients).
    pub train_flops_per_sample: u64,
    /// Arithmetic rate training achieves.
    pub achieved_gflops: f64,
    /// `achieved_gflops` ÷ the square sgemm rate of the same run.
    pub fraction_of_gemm: f64,
}

/// Everything `fl-sim bench` measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// Matrix-multiply rates; the first is the square baseline.
    pub gemm: Vec<GemmRate>,
    /// Training throughput per model.
    pub models: Vec<ModelThroughput>,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Models to train.
    pub models: Vec<String>,
    /// Minibatch size.
    pub batch_size: usize,
    /// Timed steps per model (after a few warm-up steps).
    pub steps: usize,
    /// Side of the square sgemm baseline.
    pub gemm_size: usize,
}

/// The median of timed repetitions (the upper one for an even count).
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median GFLOP/s of `c = a · b` for an `m × k` by `k × n` product.
pub fn measure_gemm(label: &str, m: usize, k: usize, n: usize) -> GemmRate {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; m * n];
    let flops = 2.0 * (m * k * n) as f64;
    gemm(1.0, Mat::n(&a, m, k), Mat::n(&b, k, n), 0.0, &mut c, m, n);
    let reps = ((2e10 / flops) as usize).clamp(3, 50);
    let rates = (0..reps)
        .map(|_| {
            let t = Instant::now();
            gemm(1.0, Mat::n(&a, m, k), Mat::n(&b, k, n), 0.0, &mut c, m, n);
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    GemmRate {
        label: label.to_string(),
        m,
        k,
        n,
        gflops: median(rates),
    }
}

/// Times `steps` SGD steps of `model` on `train`.
pub fn measure_training(
    model_name: &str,
    train: &Dataset,
    batch_size: usize,
    steps: usize,
    baseline_gflops: f64,
) -> Result<ModelThroughput> {
    let model = zoo::build(model_name, train.sample_shape(), train.num_classes())?;
    let mut params = model.init_params(0);
    let mut sgd = Sgd::new(SgdConfig::default(), model.layout());
    let mut rng = StdRng::seed_from_u64(0);
    let warmup = 3;
    let needed = (warmup + steps) * batch_size;
    anyhow::ensure!(
        train.len() >= needed,
        "{} samples are too few for {} steps of {batch_size}",
        train.len(),
        warmup + steps
    );
    let (warm, timed): (Vec<usize>, Vec<usize>) = (
        (0..warmup * batch_size).collect(),
        (warmup * batch_size..needed).collect(),
    );
    train_epoch(
        &model,
        params.as_mut_slice(),
        train,
        &warm,
        batch_size,
        &mut sgd,
        &mut rng,
        |_| {},
    )?;
    let t = Instant::now();
    train_epoch(
        &model,
        params.as_mut_slice(),
        train,
        &timed,
        batch_size,
        &mut sgd,
        &mut rng,
        |_| {},
    )?;
    let samples_per_s = timed.len() as f64 / t.elapsed().as_secs_f64();
    let flops = model.training_flops_per_sample();
    let achieved = samples_per_s * flops as f64 / 1e9;
    Ok(ModelThroughput {
        model: model_name.to_string(),
        num_params: model.num_params(),
        batch_size,
        steps,
        samples_per_s,
        train_flops_per_sample: flops,
        achieved_gflops: achieved,
        fraction_of_gemm: achieved / baseline_gflops,
    })
}

/// Runs the whole benchmark on `train` (MNIST's training set in the CLI).
pub fn run(config: &BenchConfig, train: &Dataset) -> Result<BenchReport> {
    let s = config.gemm_size;
    let mut gemm_rates = vec![measure_gemm("square baseline", s, s, s)];
    // The CNN's dominant product: conv2's im2col columns times its weights.
    gemm_rates.push(measure_gemm(
        "cnn conv2 forward",
        config.batch_size * 14 * 14,
        5 * 5 * 32,
        64,
    ));
    let baseline = gemm_rates[0].gflops;
    let models = config
        .models
        .iter()
        .map(|m| {
            measure_training(m, train, config.batch_size, config.steps, baseline)
                .with_context(|| format!("benchmarking {m}"))
        })
        .collect::<Result<_>>()?;
    Ok(BenchReport {
        gemm: gemm_rates,
        models,
    })
}

/// The report as a table for the terminal.
pub fn render(report: &BenchReport) -> String {
    let mut out = String::from("f32 matrix multiply (all cores)\n");
    for g in &report.gemm {
        out += &format!(
            "  {:<20} {:>6} x {:>5} x {:>5}   {:>8.1} GFLOP/s\n",
            g.label, g.m, g.k, g.n, g.gflops
        );
    }
    out += "training on MNIST (forward + backward + SGD step)\n";
    out += &format!(
        "  {:<8} {:>10} {:>6} {:>12} {:>14} {:>10} {:>12}\n",
        "model", "params", "batch", "samples/s", "MFLOP/sample", "GFLOP/s", "of sgemm"
    );
    for m in &report.models {
        out += &format!(
            "  {:<8} {:>10} {:>6} {:>12.0} {:>14.2} {:>10.1} {:>11.1}%\n",
            m.model,
            m.num_params,
            m.batch_size,
            m.samples_per_s,
            m.train_flops_per_sample as f64 / 1e6,
            m.achieved_gflops,
            100.0 * m.fraction_of_gemm
        );
    }
    out
}
