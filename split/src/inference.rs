//! Split inference (split computing): the device runs the head and sends the encoded cut tensor;
//! the server runs the tail and returns the prediction. [`evaluate`] measures accuracy as
//! deployed (through the activation codec) and the bytes per sample; [`SplitProfile`] says what
//! each side must compute and hold.

use crate::error::SplitError;
use crate::head::HeadRunner;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_compression::cut::{CutCodec, CutLimits, decode_cut};
use shoal_model::data::Dataset;
use shoal_model::loss::softmax_cross_entropy;
use shoal_model::split::SplitModel;
use std::sync::Arc;

/// Accuracy and traffic of split inference on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitEvaluation {
    /// Fraction of samples classified correctly.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// Mean bytes of the forward message per sample (activations, codec header amortised over the
    /// batch; no labels).
    pub bytes_per_sample: f64,
}

/// What each side of a split model computes and holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitProfile {
    /// Parameters the device holds.
    pub head_params: usize,
    /// Parameters the server holds.
    pub tail_params: usize,
    /// FLOPs of the head's forward pass per sample (inference on the device).
    pub head_forward_flops: u64,
    /// FLOPs of the head's training step per sample.
    pub head_training_flops: u64,
    /// FLOPs of the tail's training step per sample (the server's work per training sample).
    pub tail_training_flops: u64,
    /// FLOPs of the tail's forward pass per sample (the server's work per inference).
    pub tail_forward_flops: u64,
    /// Values per sample that cross the wire.
    pub wire_values: usize,
}

impl SplitProfile {
    /// The profile of `split`.
    pub fn of(split: &SplitModel) -> Self {
        Self {
            head_params: split.head.num_params(),
            tail_params: split.tail.num_params(),
            head_forward_flops: split.head.forward_flops_per_sample(),
            head_training_flops: split.head.training_flops_per_sample(),
            tail_training_flops: split.tail.training_flops_per_sample(),
            tail_forward_flops: split.tail.forward_flops_per_sample(),
            wire_values: split.wire_shape().iter().product(),
        }
    }
}

/// Split inference of `data` in batches of `batch_size`: each batch's head output is encoded with
/// `codec`, decoded as the server would, and classified by the tail. Batches run in parallel and
/// are summed in order, so the result does not depend on the thread count.
pub fn evaluate(
    split: &Arc<SplitModel>,
    head: &[f32],
    tail: &[f32],
    codec: &CutCodec,
    data: &Dataset,
    batch_size: usize,
) -> Result<SplitEvaluation, SplitError> {
    let batch_size = batch_size.max(1);
    let limits = CutLimits::for_batches(batch_size, split.wire_shape().iter().product());
    let all: Vec<usize> = (0..data.len()).collect();
    let per_batch = all
        .par_chunks(batch_size)
        .map_init(
            || {
                (
                    HeadRunner::frozen(split.clone(), head.to_vec(), *codec, batch_size),
                    split.tail.workspace(),
                )
            },
            |(runner, ws), chunk| -> Result<(f64, usize, u64), SplitError> {
                let (x, y) = data.batch(chunk);
                let message = runner.forward(x, &[])?;
                let cut = decode_cut(&message, &limits)?;
                let a = ArrayD::from_shape_vec(IxDyn(&cut.shape), cut.values)
                    .map_err(|e| SplitError::Config(e.to_string()))?;
                let logits = split.tail.forward(tail, a, ws, false)?;
                let (stats, _) = softmax_cross_entropy(&logits, &y, false);
                Ok((
                    f64::from(stats.mean_loss) * chunk.len() as f64,
                    stats.correct,
                    message.len() as u64,
                ))
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    let (mut loss, mut correct, mut bytes) = (0.0f64, 0usize, 0u64);
    for (l, c, b) in per_batch {
        loss += l;
        correct += c;
        bytes += b;
    }
    let n = data.len().max(1) as f64;
    Ok(SplitEvaluation {
        accuracy: correct as f64 / n,
        loss: loss / n,
        samples: data.len(),
        bytes_per_sample: bytes as f64 / n,
    })
}

/// Mean bytes per sample of the forward messages (no labels) the head sends for `data` in
/// batches of `batch_size`.
pub fn forward_bytes(
    split: &Arc<SplitModel>,
    head: &[f32],
    codec: &CutCodec,
    data: &Dataset,
    batch_size: usize,
) -> Result<f64, SplitError> {
    let batch_size = batch_size.max(1);
    let all: Vec<usize> = (0..data.len()).collect();
    let per_batch = all
        .par_chunks(batch_size)
        .map_init(
            || HeadRunner::frozen(split.clone(), head.to_vec(), *codec, batch_size),
            |runner, chunk| -> Result<u64, SplitError> {
                let (x, _) = data.batch(chunk);
                Ok(runner.forward(x, &[])?.len() as u64)
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    Ok(per_batch.iter().sum::<u64>() as f64 / data.len().max(1) as f64)
}
