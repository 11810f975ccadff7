//! SCAFFOLD-M (Cheng, Huang, Wu, Yuan, ICLR 2024): SCAFFOLD's control variates plus FedAvg-M's
//! global direction — ALGORITHMS.md §2.2, and SCAFFOLD-M-VR (§2.3) behind `variance_reduced`.
//!
//! Client `i` keeps `c_i`. Each local step, with `h_k = ∇F(y; ξ_k)`:
//! `d_k = β (h_k − c_i + c) + (1 − β) g`, or in the variance-reduced form
//! `d_k = h_k − β (c_i − c) + (1 − β)(g − ∇F(x^{r−1}; ξ_k))`.
//! Then `c_i⁺ = (1/K) Σ h_k` (option II), `Δc_i = c_i⁺ − c_i`, `u_i = (x − y)/(η K)`.
//! - Two vectors up: `u_i` and `Δc_i`.
//! - Halved (not with `variance_reduced`): only `Δc_i`; the server rebuilds
//!   `mean u_i = β (mean Δc_i + c) + (1 − β) g`.
//!
//! Server: `g ← mean u_i`, `x ← x − γ g`, `c ← c + (1/N) Σ Δc_i`. With β = 1 it is SCAFFOLD with
//! `γ = η_g η_l K` (tested). Means are uniform (every fold weight is 1).

use super::fedavg_m::{blend_momentum, global_direction_step};
use super::scaffold::{Uplink, add_to_control_variate, rescale_control_variate};
use crate::accumulator::Accumulator;
use crate::rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload, average_direction, local_steps, require, state_vector,
};
use shoal_core::{Compressor, GradientOracle};

/// SCAFFOLD-M's client half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaffoldMomentumClient {
    /// Weight β ∈ (0, 1] of the fresh corrected gradient.
    pub beta: f32,
    /// Uplink form.
    pub uplink: Uplink,
    /// Use the variance-reduced direction (SCAFFOLD-M-VR).
    pub variance_reduced: bool,
}

impl ClientRule for ScaffoldMomentumClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        _compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let dim = broadcast.x.len();
        let c = require("scaffold-m", "c", &broadcast.c, dim)?;
        let g = require("scaffold-m", "g", &broadcast.g, dim)?;
        let x_prev = if self.variance_reduced {
            Some(require("scaffold-m", "x_prev", &broadcast.x_prev, dim)?)
        } else {
            None
        };
        let c_i = state_vector("client control variate", &mut state.c, dim)?;
        let mut scratch = vec![0.0f32; if x_prev.is_some() { dim } else { 0 }];
        let mut sum_h = vec![0.0f64; dim];
        let beta = self.beta;
        let run = local_steps(task, &broadcast.x, oracle, |oracle, _, d| {
            for (s, h) in sum_h.iter_mut().zip(d.iter()) {
                *s += f64::from(*h);
            }
            if x_prev.is_some() {
                // h − β(c_i − c), then + (1 − β)(g − ∇F(x^{r−1}; ξ)).
                for ((d, ci), c) in d.iter_mut().zip(c_i.iter()).zip(c) {
                    *d -= beta * (ci - c);
                }
            } else {
                // h − c_i + c, then β·(…) + (1 − β)·g.
                for ((d, ci), c) in d.iter_mut().zip(c_i.iter()).zip(c) {
                    *d = *d - ci + c;
                }
            }
            blend_momentum(beta, g, x_prev.map(|p| (p, scratch.as_mut_slice())), oracle, d)
        })?;
        let k = f64::from(task.local_steps);
        let delta_c: Vec<f32> = sum_h
            .iter()
            .zip(c_i.iter())
            .map(|(s, ci)| (s / k) as f32 - ci)
            .collect();
        for (ci, dc) in c_i.iter_mut().zip(&delta_c) {
            *ci += dc;
        }
        let parts = match self.uplink {
            Uplink::TwoVectors => vec![average_direction(task, &broadcast.x, &run.y), delta_c],
            Uplink::Halved => vec![delta_c],
        };
        Ok(Upload {
            parts,
            mean_loss: run.mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// SCAFFOLD-M's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaffoldMomentumServer {
    /// Weight β (needed to rebuild `u_i` from a halved uplink).
    pub beta: f32,
    /// Global step γ.
    pub global_step: f32,
    /// Uplink form.
    pub uplink: Uplink,
    /// SCAFFOLD-M-VR: keep and broadcast `x^{r−1}` (only the VR clients read it).
    pub variance_reduced: bool,
}

impl ServerRule for ScaffoldMomentumServer {
    fn name(&self) -> &'static str {
        "scaffold-m"
    }

    fn upload_parts(&self) -> usize {
        self.uplink.vectors()
    }

    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        let dim = x0.len();
        let x_prev = self.variance_reduced.then(|| x0.clone());
        ServerState {
            g: Some(vec![0.0; dim]),
            x_prev,
            ..ServerState::with_control_variate(x0)
        }
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::SynchronousMean
    }

    fn apply(&self, state: &mut ServerState, acc: &Accumulator, ctx: &ApplyContext) -> Result<(), RuleError> {
        if acc.is_empty() {
            return rescale_control_variate(state, ctx);
        }
        let dim = state.x.len();
        let (new_g, c_part) = match self.uplink {
            Uplink::TwoVectors => (acc.weighted_mean(0).unwrap_or_else(|| vec![0.0; dim]), 1),
            Uplink::Halved => {
                let beta = f64::from(self.beta);
                let c = state_vector("server control variate", &mut state.c, dim)?;
                let g = state_vector("global direction", &mut state.g, dim)?;
                let n = acc.total_weight();
                let rebuilt = acc
                    .sum(0)
                    .iter()
                    .zip(c.iter())
                    .zip(g.iter())
                    .map(|((s, c), g)| beta * (s / n + f64::from(*c)) + (1.0 - beta) * f64::from(*g))
                    .collect();
                (rebuilt, 0)
            }
        };
        global_direction_step(state, new_g, self.global_step, self.variance_reduced);
        // The halved uplink rebuilt `u_i` from the `c` the clients had; now `c` moves to the
        // current population and takes the increments.
        rescale_control_variate(state, ctx)?;
        add_to_control_variate(state, acc, c_part, ctx)
    }
}
