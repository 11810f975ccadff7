//! Local training and evaluation: minibatch SGD with momentum and weight decay over a set of sample
//! indices, and accuracy / loss over a dataset.

use crate::data::Dataset;
use crate::error::ModelError;
use crate::model::{Model, Workspace};
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use shoal_core::Layout;

/// SGD hyper-parameters (PyTorch semantics: `v ← μ·v + (g + λ·x)`, `x ← x − η·v`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Momentum μ (0 for plain SGD).
    pub momentum: f32,
    /// L2 weight decay λ.
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }
}

/// How the learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The configured rate throughout.
    Constant,
    /// Cosine decay from the configured rate to zero over `total_steps`.
    Cosine {
        /// Steps over which the rate decays.
        total_steps: usize,
    },
}

impl LrSchedule {
    /// The rate at step `t` (0-based) for a base rate `lr`.
    pub fn rate(&self, lr: f32, t: usize) -> f32 {
        match *self {
            LrSchedule::Constant => lr,
            LrSchedule::Cosine { total_steps } => {
                let progress = (t as f64 / total_steps.max(1) as f64).min(1.0);
                (f64::from(lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
            }
        }
    }
}

/// SGD with momentum over the trainable segments of a layout; buffers are never touched.
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
    schedule: LrSchedule,
    steps: usize,
    velocity: Vec<f32>,
}

impl Sgd {
    /// A fresh optimiser (zero velocity, constant rate) for parameters of `layout`.
    pub fn new(config: SgdConfig, layout: &Layout) -> Self {
        Self::with_schedule(config, LrSchedule::Constant, layout)
    }

    /// A fresh optimiser whose rate follows `schedule`.
    pub fn with_schedule(config: SgdConfig, schedule: LrSchedule, layout: &Layout) -> Self {
        Self {
            config,
            schedule,
            steps: 0,
            velocity: vec![0.0; layout.len()],
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> SgdConfig {
        self.config
    }

    /// The learning rate the next step will use.
    pub fn current_lr(&self) -> f32 {
        self.schedule.rate(self.config.lr, self.steps)
    }

    /// One step on `params` with gradient `grads`, over the trainable ranges of `layout`.
    pub fn step(&mut self, layout: &Layout, params: &mut [f32], grads: &[f32]) {
        let SgdConfig {
            momentum,
            weight_decay,
            ..
        } = self.config;
        let lr = self.current_lr();
        self.steps += 1;
        for range in layout.trainable_ranges() {
            let (x, g, v) = (
                &mut params[range.clone()],
                &grads[range.clone()],
                &mut self.velocity[range],
            );
            for ((x, &g), v) in x.iter_mut().zip(g).zip(v) {
                let g = g + weight_decay * *x;
                *v = momentum * *v + g;
                *x -= lr * *v;
            }
        }
    }
}

/// Statistics of one pass over local data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// Mean minibatch loss, weighted by batch size.
    pub mean_loss: f32,
    /// Training accuracy measured on the minibatches as they were trained.
    pub train_accuracy: f32,
    /// Samples processed.
    pub samples: usize,
    /// Optimiser steps taken.
    pub steps: usize,
}

/// Accuracy and loss of a model on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of samples classified correctly, in [0, 1].
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Samples evaluated.
    pub samples: usize,
}

/// Runs one epoch of minibatch SGD over `indices` (shuffled with `rng`), calling `progress` with the
/// number of samples done after every step. Fails if the loss stops being finite.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(
    model: &Model,
    params: &mut [f32],
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    sgd: &mut Sgd,
    rng: &mut impl Rng,
    mut progress: impl FnMut(usize),
) -> Result<EpochStats, ModelError> {
    let mut order = indices.to_vec();
    order.shuffle(rng);
    let mut ws = model.workspace();
    let mut grads = vec![0.0; model.num_params()];
    let (mut loss_sum, mut correct, mut samples, mut steps) = (0.0f64, 0usize, 0usize, 0usize);
    for chunk in order.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(chunk);
        let stats = model.loss_and_gradient(params, x, &y, &mut ws, &mut grads)?;
        if !stats.mean_loss.is_finite() {
            return Err(ModelError::Diverged {
                step: steps,
                loss: stats.mean_loss,
            });
        }
        sgd.step(model.layout(), params, &grads);
        loss_sum += f64::from(stats.mean_loss) * chunk.len() as f64;
        correct += stats.correct;
        samples += chunk.len();
        steps += 1;
        progress(samples);
    }
    let n = samples.max(1) as f64;
    Ok(EpochStats {
        mean_loss: (loss_sum / n) as f32,
        train_accuracy: (correct as f64 / n) as f32,
        samples,
        steps,
    })
}

/// Accuracy and mean loss of `params` on the whole of `data`, in batches of `batch_size` evaluated
/// in parallel (one workspace per thread); the per-batch results are summed in order, so the result
/// does not depend on the number of threads.
pub fn evaluate(
    model: &Model,
    params: &[f32],
    data: &Dataset,
    batch_size: usize,
) -> Result<Evaluation, ModelError> {
    use rayon::prelude::*;
    let all: Vec<usize> = (0..data.len()).collect();
    let per_batch = all
        .par_chunks(batch_size.max(1))
        .map_init(
            || model.workspace(),
            |ws: &mut Workspace, chunk| {
                let (x, y) = data.batch(chunk);
                model
                    .evaluate_batch(params, x, &y, ws)
                    .map(|stats| (f64::from(stats.mean_loss) * chunk.len() as f64, stats.correct))
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for (loss, right) in per_batch {
        loss_sum += loss;
        correct += right;
    }
    let n = data.len().max(1) as f64;
    Ok(Evaluation {
        accuracy: correct as f64 / n,
        loss: loss_sum / n,
        samples: data.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{LayoutBuilder, SegmentKind};

    #[test]
    fn sgd_matches_the_momentum_recursion_and_skips_buffers() {
        let mut b = LayoutBuilder::new();
        b.push("w", &[2], SegmentKind::Trainable).unwrap();
        b.push("running", &[1], SegmentKind::Buffer).unwrap();
        let layout = b.build();
        let mut sgd = Sgd::new(
            SgdConfig {
                lr: 0.1,
                momentum: 0.5,
                weight_decay: 0.01,
            },
            &layout,
        );
        let mut x = vec![1.0f32, -2.0, 7.0];
        let g = [0.5f32, 0.25, 100.0];
        sgd.step(&layout, &mut x, &g);
        // v = g + λx = [0.51, 0.23]; x = x − 0.1·v
        assert!((x[0] - (1.0 - 0.051)).abs() < 1e-6 && (x[1] - (-2.0 - 0.023)).abs() < 1e-6);
        let (x0, x1) = (x[0], x[1]);
        sgd.step(&layout, &mut x, &g);
        let v0 = 0.5 * 0.51 + (0.5 + 0.01 * x0);
        let v1 = 0.5 * 0.23 + (0.25 + 0.01 * x1);
        assert!((x[0] - (x0 - 0.1 * v0)).abs() < 1e-6 && (x[1] - (x1 - 0.1 * v1)).abs() < 1e-6);
        assert_eq!(x[2], 7.0, "buffers never move");
    }

    #[test]
    fn cosine_schedule_decays_from_the_base_rate_to_zero() {
        let s = LrSchedule::Cosine { total_steps: 100 };
        assert_eq!(s.rate(0.1, 0), 0.1);
        assert!((s.rate(0.1, 50) - 0.05).abs() < 1e-7);
        assert!(s.rate(0.1, 100).abs() < 1e-9 && s.rate(0.1, 500).abs() < 1e-9);
        assert!((1..100).all(|t| s.rate(0.1, t) < s.rate(0.1, t - 1)));
        assert_eq!(LrSchedule::Constant.rate(0.1, 1000), 0.1);
    }
}
