//! `fl-sim bench codecs`: every codec on a real update — the change of the MNIST `cnn` after one
//! local epoch on one client's shard — against the dense f32 payload of the same run.
//!
//! For each chain: compression ratio (dense f32 bytes ÷ payload bytes), encode and decode
//! throughput (MB/s of dense f32, medians over repetitions), and relative L2 error of the decoded
//! update. The dense `identity` payload is the baseline every ratio is measured against.

use crate::bench::median;
use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use shoal_compression::{CodecSpec, DecodeLimits, decode_into, encode};
use shoal_core::Layout;
use shoal_model::data::TrainTest;
use shoal_model::data::partition::PartitionSpec;
use shoal_model::train::{Sgd, SgdConfig, train_epoch};
use shoal_model::zoo;
use std::time::Instant;

/// The chains measured by default.
pub const DEFAULT_CODECS: &[&str] = &[
    "identity",
    "zstd(3)",
    "fp16",
    "bf16",
    "int8",
    "sign | huffman",
    "qsgd(16) | huffman",
    "randk(0.1)",
    "topk(0.1)",
    "topk(0.2) | kmeans(3) | huffman",
    "topk(0.2) | kmeans(3) | positions",
    "topk(0.2) | kmeans(3) | gaps",
    "fedzip",
    "fedzip | zstd(3)",
    "topk(0.01) | kmeans(3) | smallest | zstd(3)",
];

/// How the update is made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Model from the zoo.
    pub model: String,
    /// Clients the training set is split into (IID); client 0's shard trains.
    pub clients: usize,
    /// Local batch size.
    pub batch_size: usize,
    /// Local learning rate (plain SGD, as FedAvg's clients).
    pub lr: f32,
    /// Seed of the initial model, the partition and the batch order.
    pub seed: u64,
}

/// One codec's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodecFigures {
    /// The chain.
    pub codec: String,
    /// Payload bytes.
    pub bytes: usize,
    /// Dense f32 bytes ÷ payload bytes.
    pub ratio: f64,
    /// Encode throughput, MB/s of dense f32.
    pub encode_mb_s: f64,
    /// Decode throughput, MB/s of dense f32.
    pub decode_mb_s: f64,
    /// `‖decoded − update‖ / ‖update‖`.
    pub relative_l2_error: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodecReport {
    /// How the update was made.
    pub update: UpdateConfig,
    /// Parameters of the update.
    pub params: usize,
    /// Its L2 norm.
    pub update_norm: f64,
    /// Figures per codec.
    pub codecs: Vec<CodecFigures>,
}

/// Trains client 0 for one local epoch from the initial model; returns the layout and the delta.
pub fn make_update(config: &UpdateConfig, data: &TrainTest) -> Result<(Layout, Vec<f32>)> {
    let model = zoo::build(&config.model, data.train.sample_shape(), data.train.num_classes())
        .with_context(|| format!("building model `{}`", config.model))?;
    let partition = PartitionSpec::Iid {
        num_clients: config.clients,
    }
    .partition(data.train.labels(), data.train.num_classes(), config.seed)
    .context("partitioning the training set")?;
    let before = model.init_params(config.seed);
    let mut after = before.clone();
    let sgd_config = SgdConfig {
        lr: config.lr,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let mut sgd = Sgd::new(sgd_config, model.layout());
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(1));
    train_epoch(
        &model,
        after.as_mut_slice(),
        &data.train,
        partition.client(0),
        config.batch_size,
        &mut sgd,
        &mut rng,
        |_| {},
    )
    .context("local training")?;
    let delta = after
        .as_slice()
        .iter()
        .zip(before.as_slice())
        .map(|(a, b)| a - b)
        .collect();
    Ok((model.layout().as_ref().clone(), delta))
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Measures every chain on `update`.
pub fn measure(
    codecs: &[CodecSpec],
    layout: &Layout,
    update: &[f32],
    reps: usize,
) -> Result<Vec<CodecFigures>> {
    let dense_mb = (update.len() * 4) as f64 / 1e6;
    let update_norm = norm(update.iter().map(|&x| f64::from(x))).max(f64::MIN_POSITIVE);
    let limits = DecodeLimits::for_dim(layout.len());
    let mut decoded = vec![0.0f32; update.len()];
    let mut figures = Vec::new();
    for spec in codecs {
        let mut encode_s = Vec::new();
        let mut decode_s = Vec::new();
        let mut payload = Vec::new();
        for rep in 0..reps.max(1) {
            let t = Instant::now();
            payload = encode(spec, layout, update, rep as u64)
                .with_context(|| format!("encoding with `{spec}`"))?;
            encode_s.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            decode_into(&payload, layout, &limits, &mut decoded)
                .with_context(|| format!("decoding `{spec}`"))?;
            decode_s.push(t.elapsed().as_secs_f64());
        }
        let error = norm(
            update
                .iter()
                .zip(&decoded)
                .map(|(&a, &b)| f64::from(a) - f64::from(b)),
        );
        figures.push(CodecFigures {
            codec: spec.to_string(),
            bytes: payload.len(),
            ratio: (update.len() * 4) as f64 / payload.len() as f64,
            encode_mb_s: dense_mb / median(encode_s).max(1e-12),
            decode_mb_s: dense_mb / median(decode_s).max(1e-12),
            relative_l2_error: error / update_norm,
        });
    }
    Ok(figures)
}

/// The report as a table.
pub fn render(report: &CodecReport) -> String {
    let mut out = format!(
        "update: `{}` after 1 local epoch on client 0 of {} (IID, batch {}, lr {}), {} parameters, L2 norm {:.4}\n\n",
        report.update.model,
        report.update.clients,
        report.update.batch_size,
        report.update.lr,
        report.params,
        report.update_norm
    );
    out.push_str(&format!(
        "{:<52} {:>11} {:>9} {:>11} {:>11} {:>10}\n",
        "codec", "bytes", "ratio", "enc MB/s", "dec MB/s", "rel L2 err"
    ));
    for f in &report.codecs {
        out.push_str(&format!(
            "{:<52} {:>11} {:>8.1}× {:>11.0} {:>11.0} {:>10.4}\n",
            f.codec, f.bytes, f.ratio, f.encode_mb_s, f.decode_mb_s, f.relative_l2_error
        ));
    }
    out
}

/// Builds the update and measures `codecs` on it.
pub fn run(config: UpdateConfig, data: &TrainTest, codecs: &[CodecSpec], reps: usize) -> Result<CodecReport> {
    let (layout, update) = make_update(&config, data)?;
    let figures = measure(codecs, &layout, &update, reps)?;
    Ok(CodecReport {
        params: update.len(),
        update_norm: norm(update.iter().map(|&x| f64::from(x))),
        update: config,
        codecs: figures,
    })
}
