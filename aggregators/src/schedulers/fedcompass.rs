//! FedCompass (Li et al., ICLR 2024): a computing-power-aware semi-asynchronous scheduler —
//! ALGORITHMS.md §5, following APPFL's `compass_scheduler.py`.
//!
//! The server estimates each client's time per local step `S_i` (an EMA with momentum `m` on the
//! newest sample) and gives it the number of local steps `Q_i ∈ [Q_min, Q_max]` that makes it
//! arrive together with an *arrival group*: a set of clients expected back at the group's `T_exp`,
//! tolerated until `T_max = now + λ·Q·S`. A group aggregates when its last member arrives or at
//! `T_max`, whichever comes first, folding its buffer and the *general buffer* of late arrivals
//! with weights `α · s(staleness) · p_i` (`p_i = 1/N` by default). On-time clients wait for their
//! group's aggregation and then get the new model; a late client (after `T_max`) is never blocked:
//! its update goes to the general buffer and it gets the current model at once. A client's very
//! first update is aggregated alone, immediately, as in the reference.
//!
//! Times are integer microseconds; speeds are microseconds per step. One departure from the
//! pseudocode's order, noted in the closing note of the algorithms issue: an aggregated group is
//! expired *before* its clients are reassigned, so a finished group is never a target for them.

use super::Weighting;
use crate::coordinator::{Arrival, Core, TaskRecord};
use crate::staleness::Staleness;
use serde::{Deserialize, Serialize};
use shoal_core::{ClientId, ModelVersion, TaskId, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// The `scheduler = "fedcompass"` table (defaults of APPFL's FedCompass configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedCompassConfig {
    /// Fewest local steps a client is given, `Q_min`.
    #[serde(default = "default_q_min")]
    pub q_min: u32,
    /// Most local steps a client is given, `Q_max` (also every client's first job).
    #[serde(default = "default_q_max")]
    pub q_max: u32,
    /// EMA weight `m` of the newest speed sample.
    #[serde(default = "default_speed_momentum")]
    pub speed_momentum: f64,
    /// Latest-time factor `λ ≥ 1`: a group waits until `λ` times its expected duration.
    #[serde(default = "default_latest_time_factor")]
    pub latest_time_factor: f64,
    /// Global mixing rate `α`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Staleness discount `s(·)`.
    #[serde(default)]
    pub staleness: Staleness,
    /// Client weight `p_i`: `uniform` (`1/N`, default) or `samples`.
    #[serde(default = "uniform")]
    pub weighting: Weighting,
}

fn default_q_min() -> u32 {
    20
}
fn default_q_max() -> u32 {
    100
}
fn default_speed_momentum() -> f64 {
    0.9
}
fn default_latest_time_factor() -> f64 {
    1.5
}
fn default_alpha() -> f64 {
    0.9
}
fn uniform() -> Weighting {
    Weighting::Uniform
}

impl Default for FedCompassConfig {
    fn default() -> Self {
        Self {
            q_min: default_q_min(),
            q_max: default_q_max(),
            speed_momentum: default_speed_momentum(),
            latest_time_factor: default_latest_time_factor(),
            alpha: default_alpha(),
            staleness: Staleness::default(),
            weighting: Weighting::Uniform,
        }
    }
}

impl FedCompassConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.q_min == 0 || self.q_min > self.q_max {
            return Err(format!(
                "need 1 ≤ q_min ≤ q_max, got q_min = {} and q_max = {}",
                self.q_min, self.q_max
            ));
        }
        super::check_unit("speed_momentum", self.speed_momentum)?;
        if !(self.latest_time_factor.is_finite() && self.latest_time_factor >= 1.0) {
            return Err(format!(
                "latest_time_factor must be ≥ 1, got {}",
                self.latest_time_factor
            ));
        }
        super::check_unit("alpha", self.alpha)?;
        self.staleness.validate()
    }
}

/// What the scheduler knows about one client.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CompassClient {
    /// Estimated microseconds per local step; unknown until the first delivery.
    speed: Option<f64>,
    /// The group it is expected in.
    group: Option<u64>,
}

/// An arrival group.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Group {
    /// Clients still expected.
    members: BTreeSet<ClientId>,
    /// Clients that arrived and wait for the aggregation.
    arrived: Vec<ClientId>,
    /// Their updates.
    buffer: Vec<Held>,
    /// Expected and latest arrival times; `None` once the group has aggregated.
    times: Option<(Timestamp, Timestamp)>,
}

/// A held update and what its weight needs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Held {
    task: TaskId,
    base: ModelVersion,
    num_samples: u64,
}

/// The FedCompass scheduler.
#[derive(Debug)]
pub(crate) struct FedCompass {
    config: FedCompassConfig,
    clients: BTreeMap<ClientId, CompassClient>,
    groups: BTreeMap<u64, Group>,
    next_group: u64,
    /// Late arrivals, folded into the next group aggregation.
    general: Vec<Held>,
}

impl FedCompass {
    pub(crate) fn new(config: FedCompassConfig) -> Self {
        Self {
            config,
            clients: BTreeMap::new(),
            groups: BTreeMap::new(),
            next_group: 0,
            general: Vec::new(),
        }
    }

    /// `floor(span / speed)` steps, with a little slack so exact multiples are not lost to rounding.
    fn steps_within(span_us: f64, speed: f64) -> f64 {
        (span_us / speed.max(1e-9) + 1e-9).floor()
    }

    /// A client's first job (or a restart after a failure before its first delivery): `Q_max`,
    /// outside any group.
    fn first_job(&mut self, core: &mut Core, client: ClientId) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.group = None;
        }
        core.assign(client, self.config.q_max);
    }

    /// §5.4: join the group whose expected arrival the client can hit with the most steps, or
    /// create a group sized to land after some group's next cycle; then start the job.
    fn assign_group(&mut self, core: &mut Core, client: ClientId) {
        let Some(speed) = self.clients.get(&client).and_then(|c| c.speed) else {
            self.first_job(core, client);
            return;
        };
        let now = core.now();
        let (q_min, q_max) = (self.config.q_min, self.config.q_max);
        // JoinGroup: prefer the largest feasible q; among equal q, the later group in id order.
        let mut best: Option<(u64, u32)> = None;
        for (&id, g) in &self.groups {
            let Some((t_exp, _)) = g.times else { continue };
            if t_exp <= now {
                continue;
            }
            let q = Self::steps_within(t_exp.micros_since(now) as f64, speed);
            if q >= f64::from(q_min) && q <= f64::from(q_max) && best.is_none_or(|(_, b)| q >= f64::from(b)) {
                best = Some((id, q as u32));
            }
        }
        let (group, q) = match best {
            Some((id, q)) => (id, q),
            None => {
                let q = self.create_group_steps(now, speed);
                let id = self.next_group;
                self.next_group += 1;
                let t_exp = now.after_micros((f64::from(q) * speed).round() as u64);
                let t_max =
                    now.after_micros((self.config.latest_time_factor * f64::from(q) * speed).round() as u64);
                self.groups.insert(
                    id,
                    Group {
                        times: Some((t_exp, t_max)),
                        ..Group::default()
                    },
                );
                core.wake_at(t_max);
                (id, q)
            }
        };
        if let Some(g) = self.groups.get_mut(&group) {
            g.members.insert(client);
        }
        if let Some(c) = self.clients.get_mut(&client) {
            c.group = Some(group);
        }
        core.assign(client, q);
    }

    /// CreateGroup's `Q`: land just after the time the fastest client of some live group would
    /// come back from its next `Q_max` job.
    fn create_group_steps(&self, now: Timestamp, speed: f64) -> u32 {
        let (q_min, q_max) = (self.config.q_min, self.config.q_max);
        let mut q_star: Option<f64> = None;
        for g in self.groups.values() {
            let Some((_, t_max)) = g.times else { continue };
            if now >= t_max {
                continue;
            }
            let fastest = g
                .members
                .iter()
                .chain(&g.arrived)
                .filter_map(|c| self.clients.get(c).and_then(|c| c.speed))
                .fold(f64::INFINITY, f64::min);
            if !fastest.is_finite() {
                continue;
            }
            let t_est = t_max.micros_since(now) as f64 + fastest * f64::from(q_max);
            let q = Self::steps_within(t_est, speed);
            if q <= f64::from(q_max) {
                q_star = Some(q_star.map_or(q, |s: f64| s.max(q)));
            }
        }
        match q_star {
            Some(q) if q >= 0.0 => (q as u32).clamp(q_min, q_max),
            _ => q_max,
        }
    }

    /// §5.5 GroupAggregate: fold the general buffer and the group's buffer, aggregate, expire the
    /// group, and reassign its waiting clients, fastest first.
    fn group_aggregate(&mut self, core: &mut Core, group: u64) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        g.times = None;
        let buffer = std::mem::take(&mut g.buffer);
        let mut waiting = std::mem::take(&mut g.arrived);
        if g.members.is_empty() {
            self.groups.remove(&group);
        }
        let updates: Vec<Held> = std::mem::take(&mut self.general)
            .into_iter()
            .chain(buffer)
            .collect();
        if !updates.is_empty() {
            for held in &updates {
                let staleness = held.base.staleness(core.version());
                let weight = self.config.alpha
                    * self.config.staleness.weight(staleness)
                    * self.config.weighting.share(core, held.num_samples);
                core.fold(held.task, weight);
            }
            core.aggregate();
        }
        let speed_of = |c: &ClientId| self.clients.get(c).and_then(|c| c.speed).unwrap_or(f64::INFINITY);
        waiting.sort_by(|a, b| speed_of(a).total_cmp(&speed_of(b)).then(a.cmp(b)));
        for client in waiting {
            if let Some(c) = self.clients.get_mut(&client) {
                c.group = None;
                self.assign_group(core, client);
            }
        }
    }

    /// Aggregates every live group whose latest time is before `now` (or at it, with `inclusive`).
    fn fire_due_groups(&mut self, core: &mut Core, inclusive: bool) {
        let now = core.now();
        let mut due: Vec<(Timestamp, u64)> = self
            .groups
            .iter()
            .filter_map(|(&id, g)| g.times.map(|(_, t_max)| (t_max, id)))
            .filter(|&(t_max, _)| t_max < now || (inclusive && t_max == now))
            .collect();
        due.sort();
        for (_, id) in due {
            self.group_aggregate(core, id);
        }
    }

    /// Takes a client out of its group; a group left with arrivals and no one else expected
    /// aggregates now, one left with nobody is removed.
    fn leave_group(&mut self, core: &mut Core, client: ClientId) {
        let Some(group) = self.clients.get_mut(&client).and_then(|c| c.group.take()) else {
            return;
        };
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        g.members.remove(&client);
        if g.members.is_empty() {
            if g.arrived.is_empty() {
                self.groups.remove(&group);
            } else if g.times.is_some() {
                self.group_aggregate(core, group);
            }
        }
    }
}

impl super::Scheduler for FedCompass {
    fn name(&self) -> &'static str {
        "fedcompass"
    }

    fn on_joined(&mut self, core: &mut Core, client: ClientId) {
        self.clients.insert(client, CompassClient::default());
        self.first_job(core, client);
    }

    fn on_left(&mut self, core: &mut Core, client: ClientId, _lost: Option<TaskRecord>) {
        self.leave_group(core, client);
        // A client waiting in a group's `arrived` list is dropped from it; its update stays buffered.
        for g in self.groups.values_mut() {
            g.arrived.retain(|&c| c != client);
        }
        self.clients.remove(&client);
    }

    fn on_failed(&mut self, core: &mut Core, task: TaskRecord) {
        self.fire_due_groups(core, false);
        self.leave_group(core, task.client);
        self.assign_group(core, task.client);
    }

    fn on_arrival(&mut self, core: &mut Core, arrival: Arrival) {
        // Catch up on group deadlines the driver has not woken us for yet.
        self.fire_due_groups(core, false);
        let record = arrival.record;
        let client = record.client;
        let now = core.now();
        let num_samples = core
            .client(client)
            .map_or(arrival.meta.num_samples, |c| c.num_samples);
        let held = Held {
            task: record.task,
            base: record.version,
            num_samples,
        };
        // §5.3: the newest sample of time per step, blended with momentum.
        let sample = now.micros_since(record.assigned_at) as f64 / f64::from(record.local_steps.max(1));
        let m = self.config.speed_momentum;
        let entry = self.clients.entry(client).or_default();
        entry.speed = Some(entry.speed.map_or(sample, |s| (1.0 - m) * s + m * sample));
        let group = entry.group;

        let live = group.and_then(|id| self.groups.get(&id).and_then(|g| g.times).map(|t| (id, t)));
        match (group, live) {
            (None, _) => {
                // The first job: aggregated alone, at once.
                let staleness = record.version.staleness(core.version());
                let weight = self.config.alpha
                    * self.config.staleness.weight(staleness)
                    * self.config.weighting.share(core, num_samples);
                core.fold(record.task, weight);
                core.aggregate();
                self.assign_group(core, client);
            }
            (Some(_), Some((id, (_, t_max)))) if now <= t_max => {
                let Some(g) = self.groups.get_mut(&id) else { return };
                g.members.remove(&client);
                g.arrived.push(client);
                g.buffer.push(held);
                if g.members.is_empty() {
                    self.group_aggregate(core, id);
                }
            }
            (Some(_), _) => {
                // Late: buffered for the next group aggregation, and never blocked.
                self.leave_group(core, client);
                self.general.push(held);
                self.assign_group(core, client);
            }
        }
    }

    fn on_timer(&mut self, core: &mut Core) {
        self.fire_due_groups(core, true);
    }

    fn save_state(&self) -> Vec<u8> {
        crate::snapshot::encode_state(&(&self.clients, &self.groups, self.next_group, &self.general))
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        (self.clients, self.groups, self.next_group, self.general) = crate::snapshot::decode_state(bytes)?;
        Ok(())
    }
}
