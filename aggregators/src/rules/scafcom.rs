//! SCAFCOM (Huang, Li, Li, ICLR 2024): SCAFFOLD with a biased compressed uplink and local momentum —
//! ALGORITHMS.md §3.4.
//!
//! Client `i` keeps `c_i` and a local momentum `v_i` (both zero at first):
//! `a_i = (x − y)/(η_l K) + c_i − c` (the round's average stochastic gradient),
//! `v_i ← (1 − β) v_i + β a_i`, `δ̃_i = C(v_i − c_i)`, `c_i ← c_i + δ̃_i`; uploads `δ̃_i`.
//! Server (as halved SCAFFOLD): `x ← x − γ (c + mean δ̃_i)`, `c ← c + (1/N) Σ δ̃_i`.
//! With β = 1 and the identity compressor SCAFCOM is SCAFFOLD (tested).

use super::scaffold::{control_variate_step, corrected_local_run};
use crate::accumulator::Accumulator;
use crate::rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload, state_vector,
};
use shoal_core::{Compressor, GradientOracle};

/// SCAFCOM's client half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScafcomClient {
    /// Local momentum β ∈ (0, 1].
    pub beta: f32,
}

impl ClientRule for ScafcomClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let dim = broadcast.x.len();
        let c_i = state_vector("client control variate", &mut state.c, dim)?.clone();
        let v_i = state_vector("client momentum", &mut state.v, dim)?;
        let (_, mean_loss, delta) = corrected_local_run("scafcom", task, broadcast, &c_i, oracle)?;
        // δ = (x − y)/(ηK) − c, so the round's average gradient is a_i = δ + c_i.
        let beta = self.beta;
        let new_v: Vec<f32> = v_i
            .iter()
            .zip(&delta)
            .zip(&c_i)
            .map(|((v, d), ci)| (1.0 - beta) * v + beta * (d + ci))
            .collect();
        let mut send: Vec<f32> = new_v.iter().zip(&c_i).map(|(v, ci)| v - ci).collect();
        compressor.compress(&mut send)?;
        // Commit the client's state only once nothing can fail any more.
        *v_i = new_v;
        let new_c = c_i.iter().zip(&send).map(|(ci, s)| ci + s).collect();
        state.c = Some(new_c);
        Ok(Upload {
            parts: vec![send],
            mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// SCAFCOM's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScafcomServer {
    /// Global learning rate `η_g`.
    pub global_lr: f32,
}

impl ServerRule for ScafcomServer {
    fn name(&self) -> &'static str {
        "scafcom"
    }

    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        ServerState::with_control_variate(x0)
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::SynchronousMean
    }

    fn apply(&self, state: &mut ServerState, acc: &Accumulator, ctx: &ApplyContext) -> Result<(), RuleError> {
        control_variate_step(state, acc, ctx, self.global_lr, 1.0, 1.0)
    }
}
