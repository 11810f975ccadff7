//! BottleFit's two-stage training of a bottleneck injected into a trained model (ALGORITHMS.md
//! §8.1), the alternative to training the cut model end to end.
//!
//! Stage 1 (head distillation): the trained model is the teacher; the student's head layers and
//! tail layers are the teacher's and stay frozen; only the bottleneck pair is trained, to
//! reproduce the teacher's tensor at the cut: `L₁ = ‖dec(enc(a)) − a‖²` (mean over the batch's
//! values), `a` the teacher's cut activation. Stage 2 (fine-tuning): the encoder — the whole
//! device side — is frozen, so what devices run and send no longer changes; the decoder and the
//! tail are trained with cross-entropy, as a server would, through [`TailSession`].

use crate::error::SplitError;
use crate::head::HeadRunner;
use crate::server::TailSession;
use crate::task::BatchOrder;
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use shoal_compression::cut::CutCodec;
use shoal_core::Params;
use shoal_model::Model;
use shoal_model::data::Dataset;
use shoal_model::split::{DECODER_LAYER, ENCODER_LAYER, SplitModel};
use shoal_model::train::{Sgd, SgdConfig};
use std::sync::Arc;

/// How long and how fast each stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TwoStageConfig {
    /// Minibatches of stage 1 (bottleneck distillation).
    pub distill_steps: usize,
    /// Minibatches of stage 2 (decoder and tail fine-tuning).
    pub finetune_steps: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// Optimiser of stage 1.
    pub distill_sgd: SgdConfig,
    /// Optimiser of stage 2.
    pub finetune_sgd: SgdConfig,
    /// Seed of the minibatch order.
    pub seed: u64,
}

/// What the two stages did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TwoStageReport {
    /// Stage 1 reconstruction error (mean squared, per value) over its first tenth of steps.
    pub distill_mse_start: f64,
    /// … and over its last tenth.
    pub distill_mse_end: f64,
    /// Stage 2 cross-entropy over its first tenth of steps.
    pub finetune_loss_start: f64,
    /// … and over its last tenth.
    pub finetune_loss_end: f64,
}

/// Mean of the first and last tenth of `values`.
fn ends(values: &[f64]) -> (f64, f64) {
    let k = (values.len() / 10).max(1).min(values.len().max(1));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    (
        mean(&values[..k.min(values.len())]),
        mean(&values[values.len().saturating_sub(k)..]),
    )
}

/// Trains the bottleneck of `split` (cut from `whole`) in two stages from the trained `teacher`
/// weights of `whole`, on the samples `indices` of `data`; returns the head and tail weights.
pub fn two_stage(
    whole: &Model,
    teacher: &[f32],
    split: &Arc<SplitModel>,
    data: &Dataset,
    indices: &[usize],
    config: &TwoStageConfig,
) -> Result<(Vec<f32>, Vec<f32>, TwoStageReport), SplitError> {
    let fail = |reason: &str| SplitError::Config(format!("two-stage training: {reason}"));
    if split.bottleneck.is_none() {
        return Err(fail("the cut has no bottleneck"));
    }
    let teacher = Params::from_vec(whole.layout().clone(), teacher.to_vec())
        .map_err(|e| fail(&format!("teacher weights: {e}")))?;
    // The teacher's head (the layers up to the cut) and the student's bottleneck pair.
    let plain = whole.split(&split.cut_layer, None)?;
    let (teacher_head, _) = plain.params_from_whole(&teacher, config.seed);
    let (mut head, mut tail) = split.params_from_whole(&teacher, config.seed);
    let encoder = split
        .head
        .layers()
        .last()
        .filter(|l| l.name() == ENCODER_LAYER)
        .cloned()
        .ok_or_else(|| fail("the head does not end in the encoder"))?;
    let decoders: Vec<_> = split
        .tail
        .layers()
        .iter()
        .take_while(|l| l.name().starts_with(DECODER_LAYER))
        .cloned()
        .collect();
    let mut layers = vec![encoder];
    layers.extend(decoders);
    let pair = Model::new("bottleneck", plain.wire_shape(), layers)?;
    let mut weights = Params::zeros(pair.layout().clone());
    weights.copy_matching_segments(&head);
    weights.copy_matching_segments(&tail);

    // Stage 1: dec(enc(a)) ≈ a.
    let mut order = BatchOrder::new(indices.to_vec(), config.batch_size, config.seed);
    let mut sgd = Sgd::new(config.distill_sgd, pair.layout());
    let (mut head_ws, mut pair_ws) = (plain.head.workspace(), pair.workspace());
    let mut grads = vec![0.0f32; pair.num_params()];
    let mut mse = Vec::with_capacity(config.distill_steps);
    for _ in 0..config.distill_steps {
        let batch = order.next_batch().ok_or_else(|| fail("no samples"))?;
        let (x, _) = data.batch(batch);
        let a = plain
            .head
            .forward(teacher_head.as_slice(), x, &mut head_ws, false)?;
        let y = pair.forward(weights.as_slice(), a.clone(), &mut pair_ws, true)?;
        let n = a.len().max(1) as f32;
        let diff = &y - &a;
        mse.push(f64::from(diff.iter().map(|d| d * d).sum::<f32>() / n));
        let grad: ArrayD<f32> = diff.mapv(|d| 2.0 * d / n).into_dyn();
        pair.backward(weights.as_slice(), &mut pair_ws, grad, &mut grads, false)?;
        sgd.step(pair.layout(), weights.as_mut_slice(), &grads);
        if !mse.last().is_some_and(|m| m.is_finite()) {
            return Err(SplitError::Diverged(f32::NAN));
        }
    }
    head.copy_matching_segments(&weights);
    tail.copy_matching_segments(&weights);

    // Stage 2: the device side frozen; the decoder and the tail learn from the labels.
    let mut device = HeadRunner::frozen(
        split.clone(),
        head.as_slice().to_vec(),
        CutCodec::EXACT,
        config.batch_size,
    );
    let mut server = TailSession::new(
        split.clone(),
        tail.into_vec(),
        config.finetune_sgd,
        CutCodec::EXACT,
        config.batch_size,
    );
    let mut losses = Vec::with_capacity(config.finetune_steps);
    for _ in 0..config.finetune_steps {
        let batch = order.next_batch().ok_or_else(|| fail("no samples"))?;
        let (x, y) = data.batch(batch);
        let message = device.forward(x, &y)?;
        losses.push(f64::from(server.serve(&message)?.loss.mean_loss));
    }
    let (distill_mse_start, distill_mse_end) = ends(&mse);
    let (finetune_loss_start, finetune_loss_end) = ends(&losses);
    Ok((
        head.into_vec(),
        server.params().to_vec(),
        TwoStageReport {
            distill_mse_start,
            distill_mse_end,
            finetune_loss_start,
            finetune_loss_end,
        },
    ))
}
