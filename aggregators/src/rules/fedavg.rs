//! FedAvg (McMahan et al., 2017) with a server learning rate — ALGORITHMS.md §1.
//!
//! Client: `K` steps of local SGD from `x`; uploads the delta `Δ_i = y − x` (one vector).
//! Server: `x ← x + η_g · Σ w_i Δ_i / Σ w_i`, weights chosen by the scheduler (sample counts `n_i`
//! by default). `η_g = 1` is plain FedAvg. All-zero weights leave `x` unchanged.

use crate::accumulator::Accumulator;
use crate::rule::{
    ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule, ServerState, Upload,
    local_steps,
};
use shoal_core::{Compressor, GradientOracle};

/// FedAvg's client half: plain local SGD, shared by every method whose clients only run SGD and
/// upload their model delta (FedAvg, FedAvgM, FedBuff, FedFix, FedCompass, FedAsync).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalSgdClient;

impl ClientRule for LocalSgdClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        _state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        _compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let run = local_steps(task, &broadcast.x, oracle, |_, _, _| Ok(()))?;
        let delta = run.y.iter().zip(broadcast.x.iter()).map(|(y, x)| y - x).collect();
        Ok(Upload {
            parts: vec![delta],
            mean_loss: run.mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// FedAvg's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedAvgServer {
    /// Server learning rate `η_g`.
    pub server_lr: f32,
}

/// `x ← x + scale · Σ w_i Δ_i`: the step of every delta-summing method (FedAvg with
/// `scale = η_g / Σ w_i`, FedBuff with `η_g / K`, FedFix and FedCompass with `η_g`).
pub(crate) fn add_scaled_sum(state: &mut ServerState, acc: &Accumulator, scale: f64) {
    for (x, s) in state.x.iter_mut().zip(acc.sum(0)) {
        *x = (f64::from(*x) + scale * s) as f32;
    }
}

impl ServerRule for FedAvgServer {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn apply(
        &self,
        state: &mut ServerState,
        acc: &Accumulator,
        _ctx: &ApplyContext,
    ) -> Result<(), RuleError> {
        if !acc.is_empty() {
            add_scaled_sum(state, acc, f64::from(self.server_lr) / acc.total_weight());
        }
        Ok(())
    }
}
