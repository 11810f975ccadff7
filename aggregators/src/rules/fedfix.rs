//! FedFix (Fraboni et al., JMLR 2023): aggregation every `Δt` of time — ALGORITHMS.md §4.1.
//!
//! Clients run local SGD and upload `Δ_i = y − x^{τ_i}`. At each instant `t_n = n·Δt` the scheduler
//! folds every update that has arrived since the last instant with weight
//! `d_i = ⌈τ_i^{compute} / Δt⌉ · p_i` ([`fedfix_weight`]): a client that needs several windows per
//! job is aggregated that many times less often, so its weight is scaled up accordingly and the
//! long-run objective is `Σ p_i f_i`. Server: `x ← x + η_g Σ d_i Δ_i` (a plain weighted sum). No
//! staleness discount. With `Δt ≥` every job's duration all `d_i = p_i` and FedFix is FedAvg.

use super::fedavg::add_scaled_sum;
use crate::accumulator::Accumulator;
use crate::rule::{Aggregation, ApplyContext, RuleError, ServerRule, ServerState};

/// FedFix's weight `⌈compute / Δt⌉ · p_i`, with times in the same integer unit (`Δt > 0`).
pub fn fedfix_weight(compute_time: u64, delta_t: u64, p_i: f64) -> f64 {
    compute_time.div_ceil(delta_t.max(1)).max(1) as f64 * p_i
}

/// FedFix's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedFixServer {
    /// Server learning rate `η_g` (1 in the paper's experiments).
    pub server_lr: f32,
}

impl ServerRule for FedFixServer {
    fn name(&self) -> &'static str {
        "fedfix"
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
        add_scaled_sum(state, acc, f64::from(self.server_lr));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_scale_with_the_windows_a_job_spans() {
        assert_eq!(fedfix_weight(10, 10, 0.25), 0.25);
        assert_eq!(fedfix_weight(11, 10, 0.25), 0.5);
        assert_eq!(fedfix_weight(30, 10, 0.25), 0.75);
        assert_eq!(
            fedfix_weight(0, 10, 0.25),
            0.25,
            "a job always spans at least one window"
        );
    }
}
