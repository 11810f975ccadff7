//! FedFix (Fraboni et al., JMLR 2023): aggregation at fixed instants `t_n = t_0 + n·Δt` —
//! ALGORITHMS.md §4.1, following the authors' code.
//!
//! Every registered client works. The first event with a client present starts the clock `t_0`
//! and hands every idle client a task. An update that arrives is folded at once with weight
//! `d_i = ⌈τ_i / Δt⌉ · p_i` ([`fedfix_weight`]), `τ_i` its job's measured duration and `p_i` the
//! client's share (`samples`: `n_i / Σ n`; `uniform`: `1/N`); its client then idles until the next
//! instant. At each instant the server aggregates what was folded, and every idle client (those
//! that arrived, and any that joined) gets a task on the new version. With `Δt` at least every
//! job's duration this is synchronous FedAvg.
//!
//! An empty window is skipped: no version is made, so nothing is written or evaluated for it, a
//! server whose commit takes longer than `Δt` cannot build a backlog of empty versions, and
//! `[stop] rounds` counts versions that hold updates. The weights depend on a job's duration, not
//! on versions, so the model is the same either way. `advance_empty_windows = true` advances the
//! version at every instant instead, as the authors' code does (then a client that needs `k`
//! windows per job always arrives with staleness `k − 1`).

use super::Weighting;
use crate::coordinator::{Arrival, Core, TaskRecord};
use crate::rules::fedfix::fedfix_weight;
use serde::{Deserialize, Serialize};
use shoal_core::{ClientId, Timestamp, micros_from_secs};

/// The `scheduler = "fedfix"` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedFixConfig {
    /// Seconds between aggregations `Δt`.
    pub period_s: f64,
    /// Target importance `p_i`: `samples` (default) or `uniform`.
    #[serde(default = "samples")]
    pub weighting: Weighting,
    /// Make a version at every instant, empty windows included (the reference's behaviour).
    #[serde(default)]
    pub advance_empty_windows: bool,
}

fn samples() -> Weighting {
    Weighting::Samples
}

impl FedFixConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        super::check_positive("period_s", self.period_s)?;
        if micros_from_secs(self.period_s) == 0 {
            return Err(format!(
                "period_s must be at least a microsecond, got {}",
                self.period_s
            ));
        }
        Ok(())
    }
}

/// The FedFix scheduler.
#[derive(Debug)]
pub(crate) struct FedFix {
    weighting: Weighting,
    period_us: u64,
    advance_empty_windows: bool,
    local_steps: u32,
    /// The next aggregation instant, once started.
    next_instant: Option<Timestamp>,
    /// The start instant `t_0`.
    started_at: Option<Timestamp>,
}

impl FedFix {
    pub(crate) fn new(config: FedFixConfig, local_steps: u32) -> Self {
        Self {
            weighting: config.weighting,
            period_us: micros_from_secs(config.period_s).max(1),
            advance_empty_windows: config.advance_empty_windows,
            local_steps,
            next_instant: None,
            started_at: None,
        }
    }

    fn start_idle(&self, core: &mut Core) {
        for client in core.idle_clients() {
            core.assign(client, self.local_steps);
        }
    }

    fn start_if_needed(&mut self, core: &mut Core) {
        if self.next_instant.is_none() && core.num_clients() > 0 {
            let first = core.now().after_micros(self.period_us);
            self.next_instant = Some(first);
            self.started_at = Some(core.now());
            core.wake_at(first);
            self.start_idle(core);
        }
    }
}

impl super::Scheduler for FedFix {
    fn name(&self) -> &'static str {
        "fedfix"
    }

    fn on_joined(&mut self, core: &mut Core, client: ClientId) {
        if self.started_at == Some(core.now()) {
            // Joined at the start instant: starts with the others.
            core.assign(client, self.local_steps);
        }
        // Later, a new client waits for the next instant, like one that just delivered.
        self.start_if_needed(core);
    }

    fn on_left(&mut self, _core: &mut Core, _client: ClientId, _lost: Option<TaskRecord>) {}

    fn on_failed(&mut self, _core: &mut Core, _task: TaskRecord) {}

    fn on_arrival(&mut self, core: &mut Core, arrival: Arrival) {
        let record = arrival.record;
        let duration = core.now().micros_since(record.assigned_at);
        let n = core
            .client(record.client)
            .map_or(arrival.meta.num_samples, |c| c.num_samples);
        let p = self.weighting.share(core, n);
        core.fold(record.task, fedfix_weight(duration, self.period_us, p));
    }

    fn on_timer(&mut self, core: &mut Core) {
        let Some(mut instant) = self.next_instant else {
            return;
        };
        if core.now() < instant {
            return;
        }
        while core.now() >= instant {
            if core.pending_folds() > 0 || (self.advance_empty_windows && core.num_clients() > 0) {
                core.aggregate();
            }
            instant = instant.after_micros(self.period_us);
        }
        self.next_instant = Some(instant);
        core.wake_at(instant);
        self.start_idle(core);
    }

    fn save_state(&self) -> Vec<u8> {
        crate::snapshot::encode_state(&(self.next_instant, self.started_at))
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        (self.next_instant, self.started_at) = crate::snapshot::decode_state(bytes)?;
        Ok(())
    }
}
