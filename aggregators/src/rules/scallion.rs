//! SCALLION (Huang, Li, Li, ICLR 2024): SCAFFOLD with an unbiased compressed uplink — ALGORITHMS.md §3.3.
//!
//! Client: SCAFFOLD's corrected local steps, `δ_i = (x − y)/(η_l K) − c`, `m_i = C(δ_i)`.
//! The placement of the scaling factor α is UNCERTAIN in the source; both readings are offered:
//! - `control_variates` (default, DIANA-style): upload `m_i`; `c_i ← c_i + α m_i`;
//!   server `x ← x − γ (c + mean m_i)`, `c ← c + (α/N) Σ m_i`. The model step is unbiased for any α.
//! - `payload` (the third-party implementation): the payload is `α m_i`; `c_i ← c_i + α m_i`;
//!   server `x ← x − γ (c + mean α m_i)`, `c ← c + (1/N) Σ α m_i`. The wire carries `m_i` itself —
//!   exactly the bytes the codec produced and whose decoding the client added to `c_i` — and the
//!   server multiplies by α, which is the same arithmetic: re-encoding `α m_i` with a random codec
//!   would compress it a second time and break `c = mean c_i`.
//!
//! The two coincide for α = 1; with the identity compressor and α = 1 SCALLION is halved SCAFFOLD.

use super::scaffold::{control_variate_step, corrected_local_run};
use crate::accumulator::Accumulator;
use crate::rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload, state_vector,
};
use serde::{Deserialize, Serialize};
use shoal_core::{Compressor, GradientOracle};

/// Where SCALLION's α acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaPlacement {
    /// α damps only the control-variate updates (default).
    #[default]
    ControlVariates,
    /// α scales the uploaded payload itself.
    Payload,
}

/// SCALLION's client half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScallionClient {
    /// Scaling factor α ∈ (0, 1].
    pub alpha: f32,
    /// Where α acts.
    pub placement: AlphaPlacement,
}

impl ClientRule for ScallionClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let dim = broadcast.x.len();
        let c_i = state_vector("client control variate", &mut state.c, dim)?;
        let (_, mean_loss, mut m) = corrected_local_run("scallion", task, broadcast, c_i, oracle)?;
        compressor.compress(&mut m)?;
        for (ci, mi) in c_i.iter_mut().zip(&m) {
            *ci += self.alpha * mi;
        }
        // Under either placement the upload is `m_i` as compressed; the server applies α.
        Ok(Upload {
            parts: vec![m],
            mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// SCALLION's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScallionServer {
    /// Global learning rate `η_g`.
    pub global_lr: f32,
    /// Scaling factor α.
    pub alpha: f32,
    /// Where α acts.
    pub placement: AlphaPlacement,
}

impl ServerRule for ScallionServer {
    fn name(&self) -> &'static str {
        "scallion"
    }

    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        ServerState::with_control_variate(x0)
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::SynchronousMean
    }

    fn apply(&self, state: &mut ServerState, acc: &Accumulator, ctx: &ApplyContext) -> Result<(), RuleError> {
        let alpha = f64::from(self.alpha);
        let step_scale = match self.placement {
            AlphaPlacement::ControlVariates => 1.0,
            AlphaPlacement::Payload => alpha,
        };
        control_variate_step(state, acc, ctx, self.global_lr, step_scale, alpha)
    }
}
