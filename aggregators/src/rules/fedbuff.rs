//! FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation — ALGORITHMS.md §4.2.
//!
//! Clients run local SGD and upload `Δ_i = y − x^{τ_i}` relative to the model they started from
//! ([`LocalSgdClient`](super::fedavg::LocalSgdClient)). The scheduler folds each arrival with weight
//! `w(s)` (a staleness discount, see [`crate::staleness`]) and aggregates every `K` arrivals.
//! Server: `Δ̄ = Σ w(s_i) Δ_i / K`, `x ← x + η_g Δ̄`, applied to the *current* model. `K` is the
//! number of updates folded, so a flush of a partial buffer divides by what it holds.

use super::fedavg::add_scaled_sum;
use crate::accumulator::Accumulator;
use crate::rule::{Aggregation, ApplyContext, RuleError, ServerRule, ServerState};

/// FedBuff's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedBuffServer {
    /// Server learning rate `η_g`.
    pub server_lr: f32,
}

impl ServerRule for FedBuffServer {
    fn name(&self) -> &'static str {
        "fedbuff"
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::PerUpdateMean
    }

    fn apply(
        &self,
        state: &mut ServerState,
        acc: &Accumulator,
        _ctx: &ApplyContext,
    ) -> Result<(), RuleError> {
        if acc.count() > 0 {
            add_scaled_sum(state, acc, f64::from(self.server_lr) / acc.count() as f64);
        }
        Ok(())
    }
}
