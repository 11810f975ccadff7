//! `fl-sim distill`: BottleFit's recipe for split computing end to end — train the model
//! centrally (the teacher), inject a bottleneck at the cut, distil it against the teacher's cut
//! tensor, fine-tune the server side with the device side frozen, and measure split inference of
//! the result against the teacher: accuracy, and bytes per sample of the raw input, of the cut
//! without the bottleneck, and of the bottleneck.

use crate::central::{self, CentralConfig, CentralProgress, CentralSummary};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shoal_compression::cut::CutCodec;
use shoal_core::Params;
use shoal_model::data::{DatasetName, TrainTest};
use shoal_model::split::BottleneckSpec;
use shoal_model::zoo;
use shoal_split::distill::{TwoStageConfig, TwoStageReport, two_stage};
use shoal_split::inference::{self, SplitEvaluation, SplitProfile};
use std::sync::Arc;
use std::time::Instant;

/// What to distil.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The teacher's central training.
    pub teacher: CentralConfig,
    /// Layer after which the model is cut.
    pub cut: String,
    /// The bottleneck at the cut.
    pub bottleneck: BottleneckSpec,
    /// The two stages.
    pub stages: TwoStageConfig,
    /// Codec of the bottleneck at inference.
    pub activations: CutCodec,
}

/// What `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillSummary {
    /// The configuration.
    pub config: DistillConfig,
    /// The teacher's central training.
    pub teacher: CentralSummary,
    /// Split inference with the bottleneck as injected (untrained pair).
    pub injected: SplitEvaluation,
    /// Split inference after both stages.
    pub distilled: SplitEvaluation,
    /// Loss and reconstruction error through the stages.
    pub stages: TwoStageReport,
    /// What each side runs and holds.
    pub profile: SplitProfile,
    /// Raw input bytes per sample (1 per pixel for MNIST, 4 per feature otherwise).
    pub raw_input_bytes_per_sample: f64,
    /// The cut without the bottleneck, as f32.
    pub cut_f32_bytes_per_sample: f64,
    /// The cut without the bottleneck, through the activation codec.
    pub cut_encoded_bytes_per_sample: f64,
    /// Seconds of the two stages.
    pub distill_time_s: f64,
}

/// Trains the teacher on MNIST (`data`), then the bottleneck in two stages, and measures split
/// inference.
pub fn run(
    config: &DistillConfig,
    data: &TrainTest,
    progress: &mut dyn CentralProgress,
) -> Result<DistillSummary> {
    let (teacher, weights) =
        central::train(&config.teacher, data, progress).context("training the teacher")?;
    let model = zoo::build(
        &config.teacher.model,
        data.train.sample_shape(),
        data.train.num_classes(),
    )?;
    let split = Arc::new(
        model
            .split(&config.cut, Some(&config.bottleneck))
            .with_context(|| format!("cutting `{}` after `{}`", config.teacher.model, config.cut))?,
    );
    let whole = Params::from_vec(model.layout().clone(), weights.clone())?;
    let (head, tail) = split.params_from_whole(&whole, config.stages.seed);
    let eval_batch = config.teacher.eval_batch_size;
    let injected = inference::evaluate(
        &split,
        head.as_slice(),
        tail.as_slice(),
        &config.activations,
        &data.test,
        eval_batch,
    )?;
    let start = Instant::now();
    let indices: Vec<usize> = (0..data.train.len()).collect();
    let (head, tail, stages) = two_stage(&model, &weights, &split, &data.train, &indices, &config.stages)?;
    let distill_time_s = start.elapsed().as_secs_f64();
    let distilled = inference::evaluate(&split, &head, &tail, &config.activations, &data.test, eval_batch)?;
    let plain = Arc::new(model.split(&config.cut, None)?);
    let (plain_head, _) = plain.params_from_whole(&whole, 0);
    let cut_encoded = inference::forward_bytes(
        &plain,
        plain_head.as_slice(),
        &config.activations,
        &data.test,
        eval_batch,
    )?;
    Ok(DistillSummary {
        config: config.clone(),
        teacher,
        injected,
        distilled,
        stages,
        profile: SplitProfile::of(&split),
        raw_input_bytes_per_sample: crate::split::raw_input_bytes(DatasetName::Mnist, model.input_shape()),
        cut_f32_bytes_per_sample: 4.0 * plain.wire_shape().iter().product::<usize>() as f64,
        cut_encoded_bytes_per_sample: cut_encoded,
        distill_time_s,
    })
}
