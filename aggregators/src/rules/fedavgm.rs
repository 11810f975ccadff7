//! FedAvgM (Hsu et al., 2019): FedAvg with server momentum — ALGORITHMS.md §1.
//!
//! Clients run plain local SGD and upload `Δ_i = y − x` ([`LocalSgdClient`](super::fedavg::LocalSgdClient)).
//! Server: `Δ̄ = Σ w_i Δ_i / Σ w_i`, `v ← μ v + Δ̄`, `x ← x + η_g v`. With `μ = 0` it is FedAvg.

use crate::accumulator::Accumulator;
use crate::rule::{ApplyContext, RuleError, ServerRule, ServerState};

/// FedAvgM's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvgMServer {
    /// Server learning rate `η_g`.
    pub server_lr: f32,
    /// Server momentum `μ`.
    pub momentum: f32,
}

impl ServerRule for FedAvgMServer {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        let dim = x0.len();
        ServerState {
            momentum: Some(vec![0.0; dim]),
            ..ServerState::new(x0)
        }
    }

    fn apply(
        &self,
        state: &mut ServerState,
        acc: &Accumulator,
        _ctx: &ApplyContext,
    ) -> Result<(), RuleError> {
        let Some(mean) = acc.weighted_mean(0) else {
            return Ok(());
        };
        let dim = state.x.len();
        let v = crate::rule::state_vector("server momentum", &mut state.momentum, dim)?;
        let (mu, lr) = (f64::from(self.momentum), f64::from(self.server_lr));
        for ((x, v), d) in state.x.iter_mut().zip(v.iter_mut()).zip(mean) {
            let nv = mu * f64::from(*v) + d;
            *v = nv as f32;
            *x = (f64::from(*x) + lr * nv) as f32;
        }
        Ok(())
    }
}
