//! FedCompass (Li et al., ICLR 2024): group aggregation of a computing-power-aware semi-asynchronous
//! scheduler — ALGORITHMS.md §5.6 (APPFL `FedCompassAggregator`, gradient-based mode).
//!
//! Clients run the number of local SGD steps the scheduler assigns and upload `Δ_j = y − x^{τ_j}`.
//! A group aggregation folds every update of the group (and of the general buffer of late
//! arrivals) with weight `α · s(staleness_j) · w_j`, `w_j = 1/N`, and the server adds the sum:
//! `x ← x + Σ α s(stale_j) w_j Δ_j` — APPFL's `x ← x − Σ α s w (x^{τ} − y)` with our delta sign.
//! With homogeneous speeds every group holds all `N` fresh clients and the step is FedAvg with
//! server learning rate `α`.

use super::fedavg::add_scaled_sum;
use crate::accumulator::Accumulator;
use crate::rule::{Aggregation, ApplyContext, RuleError, ServerRule, ServerState};

/// FedCompass's server half.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FedCompassServer;

impl ServerRule for FedCompassServer {
    fn name(&self) -> &'static str {
        "fedcompass"
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::WeightedSum
    }

    fn apply(
        &self,
        state: &mut ServerState,
        acc: &Accumulator,
        _ctx: &ApplyContext,
    ) -> Result<(), RuleError> {
        add_scaled_sum(state, acc, 1.0);
        Ok(())
    }
}
