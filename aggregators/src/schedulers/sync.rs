//! Synchronous rounds: sample `m` clients (a count, or a fraction `C` of those registered), wait for
//! their updates, aggregate, repeat — with the production refinements of cross-device FL: a
//! per-round deadline, over-commitment (sample more than `m`, close at the first `m`), a minimum
//! number of updates worth aggregating, and stragglers dropped.
//!
//! A round opens when at least `m` clients are idle. It closes, and aggregates, when
//! - `m` updates have arrived (the remaining tasks are cancelled: stragglers are dropped), or
//! - the deadline has passed and at least `min_updates` have arrived, or
//! - no task is left running and at least `min_updates` have arrived.
//!
//! A round never discards what it accepted: past the deadline with fewer than `min_updates`, it
//! keeps waiting, and when every task has failed it samples replacements among idle clients.
//! Weights are `n_i` (`weighting = "samples"`) or 1; rules that average uniformly get 1.

use super::Weighting;
use crate::coordinator::{Arrival, Core, DiscardReason, TaskRecord};
use crate::rule::Aggregation;
use serde::{Deserialize, Serialize};
use shoal_core::{ClientId, TaskId, Timestamp, micros_from_secs};
use std::collections::BTreeSet;

/// The `scheduler = "sync"` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Clients per round `m` (exclusive with `fraction`).
    #[serde(default)]
    pub clients_per_round: Option<usize>,
    /// Fraction `C` of registered clients per round (exclusive with `clients_per_round`).
    #[serde(default)]
    pub fraction: Option<f64>,
    /// Seconds after a round opens at which it closes with what has arrived (none: no deadline).
    #[serde(default)]
    pub deadline_s: Option<f64>,
    /// Extra clients sampled, as a fraction of `m` (0.3 samples `⌈1.3 m⌉` and keeps the first `m`).
    #[serde(default)]
    pub over_commit: f64,
    /// Fewest updates a round aggregates; below it the round waits past its deadline.
    #[serde(default = "one")]
    pub min_updates: usize,
    /// `samples` or `uniform`; by default `samples`, or `uniform` for rules that average uniformly.
    #[serde(default)]
    pub weighting: Option<Weighting>,
}

fn one() -> usize {
    1
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            clients_per_round: Some(10),
            fraction: None,
            deadline_s: None,
            over_commit: 0.0,
            min_updates: 1,
            weighting: None,
        }
    }
}

impl SyncConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match (self.clients_per_round, self.fraction) {
            (Some(_), Some(_)) => return Err("set `clients_per_round` or `fraction`, not both".into()),
            (None, None) => return Err("set `clients_per_round` (m) or `fraction` (C)".into()),
            (Some(0), None) => return Err("clients_per_round must be at least 1".into()),
            (None, Some(c)) => super::check_unit("fraction", c)?,
            _ => {}
        }
        if let Some(d) = self.deadline_s {
            super::check_positive("deadline_s", d)?;
        }
        if !(self.over_commit.is_finite() && self.over_commit >= 0.0) {
            return Err(format!("over_commit must be ≥ 0, got {}", self.over_commit));
        }
        if self.min_updates == 0 {
            return Err("min_updates must be at least 1".into());
        }
        if let Some(m) = self.clients_per_round
            && self.min_updates > m
        {
            return Err(format!(
                "min_updates ({}) cannot exceed clients_per_round ({m})",
                self.min_updates
            ));
        }
        Ok(())
    }
}

/// One open round.
#[derive(Debug, Serialize, Deserialize)]
struct Round {
    /// Updates to collect, `m`.
    target: usize,
    /// Tasks still running.
    outstanding: BTreeSet<TaskId>,
    /// Updates folded.
    received: usize,
    deadline: Option<Timestamp>,
}

/// The synchronous-rounds scheduler.
#[derive(Debug)]
pub(crate) struct SyncRounds {
    config: SyncConfig,
    weighting: Weighting,
    local_steps: u32,
    round: Option<Round>,
}

impl SyncRounds {
    pub(crate) fn new(config: SyncConfig, aggregation: Aggregation, local_steps: u32) -> Self {
        let default = match aggregation {
            Aggregation::SynchronousMean | Aggregation::PerUpdateMean => Weighting::Uniform,
            _ => Weighting::Samples,
        };
        Self {
            weighting: config.weighting.unwrap_or(default),
            config,
            local_steps,
            round: None,
        }
    }

    /// `m` for a round opened now.
    fn target(&self, core: &Core) -> usize {
        match (self.config.clients_per_round, self.config.fraction) {
            (Some(m), _) => m,
            (None, Some(c)) => ((c * core.num_clients() as f64).ceil() as usize).max(1),
            (None, None) => 1,
        }
    }

    /// Samples `want` idle clients into the open round.
    fn recruit(&mut self, core: &mut Core, want: usize) {
        let chosen = core.sample_idle(want);
        let local_steps = self.local_steps;
        if let Some(round) = self.round.as_mut() {
            for client in chosen {
                if let Some(task) = core.assign(client, local_steps) {
                    round.outstanding.insert(task);
                }
            }
        }
    }

    fn try_open(&mut self, core: &mut Core) {
        if self.round.is_some() {
            return;
        }
        let target = self.target(core);
        if core.idle_count() < target {
            return;
        }
        let deadline = self
            .config
            .deadline_s
            .map(|d| core.now().after_micros(micros_from_secs(d)));
        self.round = Some(Round {
            target,
            outstanding: BTreeSet::new(),
            received: 0,
            deadline,
        });
        let sampled = ((target as f64) * (1.0 + self.config.over_commit)).ceil() as usize;
        self.recruit(core, sampled.max(target));
        if let Some(at) = deadline {
            core.wake_at(at);
        }
    }

    /// Closes the round if it is done, replaces failed clients if it starves, opens the next one.
    fn progress(&mut self, core: &mut Core) {
        if let Some(round) = &self.round {
            let past_deadline = round.deadline.is_some_and(|d| core.now() >= d);
            let enough = round.received >= self.config.min_updates.min(round.target);
            let done =
                round.received >= round.target || (enough && (past_deadline || round.outstanding.is_empty()));
            if done {
                self.close(core);
            } else if round.outstanding.is_empty() {
                let want = round.target - round.received;
                self.recruit(core, want);
            }
        }
        self.try_open(core);
    }

    fn close(&mut self, core: &mut Core) {
        if let Some(round) = self.round.take() {
            for task in round.outstanding {
                core.cancel(task);
            }
            core.aggregate();
        }
    }

    /// Forgets a task that will not deliver.
    fn forget(&mut self, task: TaskId) {
        if let Some(round) = self.round.as_mut() {
            round.outstanding.remove(&task);
        }
    }
}

impl super::Scheduler for SyncRounds {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn on_joined(&mut self, core: &mut Core, _client: ClientId) {
        self.progress(core);
    }

    fn on_left(&mut self, core: &mut Core, _client: ClientId, lost: Option<TaskRecord>) {
        if let Some(task) = lost {
            self.forget(task.task);
        }
        self.progress(core);
    }

    fn on_failed(&mut self, core: &mut Core, task: TaskRecord) {
        self.forget(task.task);
        self.progress(core);
    }

    fn on_arrival(&mut self, core: &mut Core, arrival: Arrival) {
        let task = arrival.record.task;
        // Tasks of closed rounds are cancelled, so an update of another round cannot be accepted;
        // were one to come, it is discarded rather than held forever.
        if let Some(round) = self.round.as_mut()
            && round.outstanding.remove(&task)
        {
            round.received += 1;
            let n = core
                .client(arrival.record.client)
                .map_or(arrival.meta.num_samples, |c| c.num_samples);
            core.fold(task, self.weighting.relative(n));
        } else {
            core.discard(task, DiscardReason::RoundClosed);
        }
        self.progress(core);
    }

    fn on_timer(&mut self, core: &mut Core) {
        self.progress(core);
    }

    fn save_state(&self) -> Vec<u8> {
        crate::snapshot::encode_state(&self.round)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        self.round = crate::snapshot::decode_state(bytes)?;
        Ok(())
    }
}
