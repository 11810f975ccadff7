//! FedAsync (Xie, Koyejo, Gupta, 2020): mixing each arrival into the current model —
//! ALGORITHMS.md §4.3.
//!
//! Client: local SGD; uploads its trained model `y_i` (mixing works on models, not deltas).
//! The scheduler folds each arrival with weight `α_t = α · s(n − τ_i)`. Server:
//! `x ← (1 − Σ α_t) x + Σ α_t y_i` — for one arrival `x ← (1 − α_t) x + α_t y_i`. `α_t = 0` leaves
//! `x`; `α_t = 1` replaces it by `y_i`. Mixing weights that sum to more than 1 are refused.

use crate::accumulator::Accumulator;
use crate::rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload, local_steps,
};
use shoal_core::{Compressor, GradientOracle};

/// FedAsync's client half: local SGD, uploading the trained model.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelUploadClient;

impl ClientRule for ModelUploadClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        _state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        _compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let run = local_steps(task, &broadcast.x, oracle, |_, _, _| Ok(()))?;
        Ok(Upload {
            parts: vec![run.y],
            mean_loss: run.mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// FedAsync's server half.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FedAsyncServer;

/// Mixing weights may exceed 1 by this much through rounding.
const MIXING_SLACK: f64 = 1e-9;

impl ServerRule for FedAsyncServer {
    fn name(&self) -> &'static str {
        "fedasync"
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::Mixing
    }

    fn apply(
        &self,
        state: &mut ServerState,
        acc: &Accumulator,
        _ctx: &ApplyContext,
    ) -> Result<(), RuleError> {
        let total = acc.total_weight();
        if total > 1.0 + MIXING_SLACK {
            return Err(RuleError::MixingWeights(total));
        }
        let keep = (1.0 - total).max(0.0);
        for (x, s) in state.x.iter_mut().zip(acc.sum(0)) {
            *x = (keep * f64::from(*x) + s) as f32;
        }
        Ok(())
    }
}
