//! FedAvg-M (Cheng, Huang, Wu, Yuan, ICLR 2024; = FedCM): a server-held global direction `g` blended
//! into every local step — ALGORITHMS.md §2.1, and FedAvg-M-VR (§2.3) behind `variance_reduced`.
//!
//! Client: `d_k = β ∇F(y; ξ_k) + (1 − β) g`, `y ← y − η d_k`; uploads `u_i = (x − y)/(η K)`.
//! Variance-reduced: `d_k = ∇F(y; ξ_k) + (1 − β)(g − ∇F(x^{r−1}; ξ_k))` on the same minibatch
//! (one extra gradient per step; needs the previous model in the broadcast).
//! Server: `g ← Σ w_i u_i / Σ w_i`, `x ← x − γ g` (and `x^{r−1} ← x` before the step).
//! With β = 1 and `γ = η K` it is FedAvg (tested). `g^0 = 0` (the stated default).

use crate::accumulator::Accumulator;
use crate::rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload, average_direction, local_steps, require,
};
use shoal_core::{Compressor, GradientOracle};

/// FedAvg-M's client half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvgMomentumClient {
    /// Weight β ∈ (0, 1] of the fresh gradient (β = 1 is FedAvg).
    pub beta: f32,
    /// Use the STORM-style variance-reduced direction (FedAvg-M-VR).
    pub variance_reduced: bool,
}

/// The momentum-blended direction of one local step, shared with SCAFFOLD-M: `d` holds the fresh
/// (possibly corrected) gradient term on entry and `β·d + (1 − β)·g` on exit; in the
/// variance-reduced form `d + (1 − β)(g − ∇F(x^{r−1}; ξ))`.
pub(crate) fn blend_momentum(
    beta: f32,
    g: &[f32],
    vr_prev: Option<(&[f32], &mut [f32])>,
    oracle: &mut dyn GradientOracle,
    d: &mut [f32],
) -> Result<(), RuleError> {
    match vr_prev {
        None => {
            for (d, g) in d.iter_mut().zip(g) {
                *d = beta * *d + (1.0 - beta) * g;
            }
        }
        Some((x_prev, scratch)) => {
            oracle.gradient_same_batch(x_prev, scratch)?;
            for ((d, g), p) in d.iter_mut().zip(g).zip(scratch.iter()) {
                *d += (1.0 - beta) * (g - p);
            }
        }
    }
    Ok(())
}

impl ClientRule for FedAvgMomentumClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        _state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        _compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let dim = broadcast.x.len();
        let g = require("fedavg-m", "g", &broadcast.g, dim)?;
        let x_prev = if self.variance_reduced {
            Some(require("fedavg-m", "x_prev", &broadcast.x_prev, dim)?)
        } else {
            None
        };
        let mut scratch = vec![0.0f32; if x_prev.is_some() { dim } else { 0 }];
        let run = local_steps(task, &broadcast.x, oracle, |oracle, _, d| {
            blend_momentum(
                self.beta,
                g,
                x_prev.map(|p| (p, scratch.as_mut_slice())),
                oracle,
                d,
            )
        })?;
        let u = average_direction(task, &broadcast.x, &run.y);
        Ok(Upload {
            parts: vec![u],
            mean_loss: run.mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// FedAvg-M's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvgMomentumServer {
    /// Global step γ.
    pub global_step: f32,
    /// FedAvg-M-VR: keep and broadcast `x^{r−1}` (only the VR clients read it).
    pub variance_reduced: bool,
}

/// `x^{r−1} ← x` (variance-reduced forms only: the others never send it), `g ← new_g`,
/// `x ← x − γ g`: the server step of FedAvg-M and SCAFFOLD-M.
pub(crate) fn global_direction_step(
    state: &mut ServerState,
    new_g: Vec<f64>,
    gamma: f32,
    variance_reduced: bool,
) {
    state.x_prev = variance_reduced.then(|| state.x.clone());
    let gamma = f64::from(gamma);
    for (x, g) in state.x.iter_mut().zip(&new_g) {
        *x = (f64::from(*x) - gamma * g) as f32;
    }
    state.g = Some(new_g.into_iter().map(|g| g as f32).collect());
}

impl ServerRule for FedAvgMomentumServer {
    fn name(&self) -> &'static str {
        "fedavg-m"
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::SynchronousWeightedMean
    }

    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        let dim = x0.len();
        ServerState {
            g: Some(vec![0.0; dim]),
            x_prev: self.variance_reduced.then(|| x0.clone()),
            ..ServerState::new(x0)
        }
    }

    fn apply(
        &self,
        state: &mut ServerState,
        acc: &Accumulator,
        _ctx: &ApplyContext,
    ) -> Result<(), RuleError> {
        if let Some(new_g) = acc.weighted_mean(0) {
            global_direction_step(state, new_g, self.global_step, self.variance_reduced);
        }
        Ok(())
    }
}
