//! SCAFFOLD (Karimireddy et al., 2020), original and halved-uplink forms — ALGORITHMS.md §3.1, §3.2.
//!
//! Client `i` keeps a control variate `c_i` (zero at first). Each local step follows
//! `g_i(y) − c_i + c`. With option II, `δ_i = (x − y)/(η_l K) − c` is the control-variate increment,
//! and `c_i ← c_i + δ_i`.
//! - **Original** (two vectors up): uploads `Δy_i = y − x` and `Δc_i = δ_i`; the server does
//!   `x ← x + η_g · mean Δy_i`, `c ← c + (1/N) Σ Δc_i`.
//! - **Halved** (one vector up): uploads `δ_i`; the server rebuilds the step:
//!   `x ← x − γ (c + mean δ_i)` with `γ = η_g η_l K`, and `c ← c + (1/N) Σ δ_i`.
//!
//! Means are uniform over the participants (every fold weight is 1), so `c` stays the mean of all
//! `c_i`. Both forms give the same trajectory (tested).

use super::fedavg::add_scaled_sum;
use crate::accumulator::Accumulator;
use crate::rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload, average_direction, local_steps, require, state_vector,
};
use serde::{Deserialize, Serialize};
use shoal_core::{Compressor, GradientOracle};

/// What a SCAFFOLD-family client uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Uplink {
    /// The model delta and the control-variate increment (2d floats).
    #[default]
    TwoVectors,
    /// Only the control-variate increment (d floats); the server rebuilds the model step.
    Halved,
}

impl Uplink {
    /// Vectors per upload in this form.
    pub fn vectors(self) -> usize {
        match self {
            Uplink::TwoVectors => 2,
            Uplink::Halved => 1,
        }
    }
}

/// SCAFFOLD's client half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaffoldClient {
    /// Uplink form.
    pub uplink: Uplink,
}

/// Runs SCAFFOLD's corrected local steps and returns `(y, mean loss, δ_i)` with
/// `δ_i = (x − y)/(η_l K) − c`. Shared by SCAFFOLD, SCALLION and SCAFCOM.
pub(crate) fn corrected_local_run(
    rule: &'static str,
    task: &LocalTask,
    broadcast: &Broadcast,
    c_i: &[f32],
    oracle: &mut dyn GradientOracle,
) -> Result<(Vec<f32>, f32, Vec<f32>), RuleError> {
    let x = &broadcast.x;
    let c = require(rule, "c", &broadcast.c, x.len())?;
    let run = local_steps(task, x, oracle, |_, _, d| {
        for ((d, ci), c) in d.iter_mut().zip(c_i).zip(c) {
            *d = *d - ci + c;
        }
        Ok(())
    })?;
    let mut delta = average_direction(task, x, &run.y);
    for (d, c) in delta.iter_mut().zip(c) {
        *d -= c;
    }
    Ok((run.y, run.mean_loss, delta))
}

impl ClientRule for ScaffoldClient {
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        _compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError> {
        let dim = broadcast.x.len();
        let c_i = state_vector("client control variate", &mut state.c, dim)?;
        let (y, mean_loss, delta) = corrected_local_run("scaffold", task, broadcast, c_i, oracle)?;
        for (ci, d) in c_i.iter_mut().zip(&delta) {
            *ci += d;
        }
        let parts = match self.uplink {
            Uplink::TwoVectors => vec![
                y.iter().zip(broadcast.x.iter()).map(|(y, x)| y - x).collect(),
                delta,
            ],
            Uplink::Halved => vec![delta],
        };
        Ok(Upload {
            parts,
            mean_loss,
            local_steps: task.local_steps,
        })
    }
}

/// SCAFFOLD's server half.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaffoldServer {
    /// Global learning rate `η_g`.
    pub global_lr: f32,
    /// Uplink form.
    pub uplink: Uplink,
}

/// The server step shared by halved SCAFFOLD, SCALLION and SCAFCOM: with `m_i` the uploaded
/// vectors, `x ← x − γ (c + step_scale · mean m_i)` and `c ← c + (cv_scale/N) Σ m_i`,
/// `γ = η_g η_l K`.
pub(crate) fn control_variate_step(
    state: &mut ServerState,
    acc: &Accumulator,
    ctx: &ApplyContext,
    global_lr: f32,
    step_scale: f64,
    cv_scale: f64,
) -> Result<(), RuleError> {
    if acc.is_empty() {
        return rescale_control_variate(state, ctx);
    }
    let dim = state.x.len();
    let gamma = f64::from(global_lr) * f64::from(ctx.task.lr) * f64::from(ctx.task.local_steps);
    let count = acc.total_weight();
    let c = state_vector("server control variate", &mut state.c, dim)?;
    let per_client = cv_scale / ctx.num_clients.max(1) as f64;
    let rescale = population_scale(ctx);
    for ((x, c), &s) in state.x.iter_mut().zip(c.iter_mut()).zip(acc.sum(0)) {
        // The model steps with the `c` the clients trained with; `c` then moves to the current
        // population and takes this aggregation's increments.
        let old_c = f64::from(*c);
        *x = (f64::from(*x) - gamma * (old_c + step_scale * s / count)) as f32;
        *c = (old_c * rescale + per_client * s) as f32;
    }
    Ok(())
}

/// `N_prev / N`, or 1 when the population is unchanged or was empty.
fn population_scale(ctx: &ApplyContext) -> f64 {
    match (ctx.previous_num_clients, ctx.num_clients) {
        (0, _) | (_, 0) => 1.0,
        (before, now) => before as f64 / now as f64,
    }
}

/// Rescales the server control variate from the previous population to the current one:
/// `c ← c · N_prev / N`, since the clients that joined since hold `c_i = 0` (ALGORITHMS.md §3.1:
/// `c` is the mean of all `c_i`). Every control-variate rule calls it first, even for an empty
/// aggregation, so no change of population is missed — after the model step, which uses the `c`
/// the clients trained with.
pub(crate) fn rescale_control_variate(state: &mut ServerState, ctx: &ApplyContext) -> Result<(), RuleError> {
    let scale = population_scale(ctx);
    if scale == 1.0 {
        return Ok(());
    }
    let dim = state.x.len();
    let c = state_vector("server control variate", &mut state.c, dim)?;
    for c in c.iter_mut() {
        *c = (f64::from(*c) * scale) as f32;
    }
    Ok(())
}

/// Adds `(1/N) Σ` of part `part` to the server control variate (after
/// [`rescale_control_variate`]).
pub(crate) fn add_to_control_variate(
    state: &mut ServerState,
    acc: &Accumulator,
    part: usize,
    ctx: &ApplyContext,
) -> Result<(), RuleError> {
    let dim = state.x.len();
    let c = state_vector("server control variate", &mut state.c, dim)?;
    let per_client = 1.0 / ctx.num_clients.max(1) as f64;
    for (c, &s) in c.iter_mut().zip(acc.sum(part)) {
        *c = (f64::from(*c) + per_client * s) as f32;
    }
    Ok(())
}

impl ServerRule for ScaffoldServer {
    fn name(&self) -> &'static str {
        "scaffold"
    }

    fn upload_parts(&self) -> usize {
        self.uplink.vectors()
    }

    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        ServerState::with_control_variate(x0)
    }

    fn aggregation(&self) -> Aggregation {
        Aggregation::SynchronousMean
    }

    fn apply(&self, state: &mut ServerState, acc: &Accumulator, ctx: &ApplyContext) -> Result<(), RuleError> {
        if acc.is_empty() {
            return rescale_control_variate(state, ctx);
        }
        match self.uplink {
            Uplink::Halved => control_variate_step(state, acc, ctx, self.global_lr, 1.0, 1.0),
            Uplink::TwoVectors => {
                add_scaled_sum(state, acc, f64::from(self.global_lr) / acc.total_weight());
                rescale_control_variate(state, ctx)?;
                add_to_control_variate(state, acc, 1, ctx)
            }
        }
    }
}
