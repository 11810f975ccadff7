//! The Coordinator: the sans-IO state machine every driver runs (DESIGN.md, "The data path of one
//! update").
//!
//! A driver — fl-server with real time, fl-sim with a virtual clock — feeds it [`Event`]s stamped
//! with `now` and carries out the [`Command`]s it returns: send a task, fold an update with a
//! weight, aggregate, wake it at a time, cancel a straggler, evict a client. The Coordinator owns
//! the model version counter and the per-client records; the configured scheduler (see
//! [`crate::schedulers`]) decides who trains, for how many steps, when to aggregate and with what
//! weights. Tensor bytes never pass through here: a command names a task, and the driver finds the
//! decoded update it holds under that task id.
//!
//! Accounting that tests rely on: every update the Coordinator accepts ([`Event::UpdateArrived`]
//! returning `Ok`) leaves in exactly one [`Command::Fold`] or [`Command::Discard`], and every fold
//! is followed by exactly one [`Command::Aggregate`] that includes it. Events at the same instant
//! are expected in the order: client events (arrivals, failures, joins, leaves) before
//! [`Event::Timer`] — so an update that lands exactly on a deadline counts as on time.

use crate::schedulers::Scheduler;
use crate::snapshot::{CoreState, SavedRng, Snapshot, SnapshotError};
use chacha20::ChaCha12Rng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use shoal_core::{ClientId, ModelVersion, TaskId, Timestamp, UpdateMeta};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Something that happened, as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client is available for work. Its number of training samples (counted as at most
    /// `[algorithm] max_samples_per_client`) weights its updates. A
    /// client that is already registered (a reconnection) only updates its sample count.
    Joined {
        /// The client.
        client: ClientId,
        /// Its training samples `n_i`.
        num_samples: u64,
    },
    /// A client is gone; its running task, if any, is lost. Updates it already delivered are kept.
    Left {
        /// The client.
        client: ClientId,
    },
    /// A client's update arrived, was decoded and checked (finite, right size) by the driver, and
    /// is held under its task id until the Coordinator folds or discards it.
    UpdateArrived(UpdateMeta),
    /// A running task ended without a usable update (training error, upload lost, rejected payload).
    TaskFailed {
        /// The task.
        task: TaskId,
    },
    /// A time the Coordinator asked for with [`Command::WakeAt`] has come (spurious ones are harmless).
    Timer,
}

/// Why an accepted update is not aggregated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DiscardReason {
    /// Staler than the scheduler's `max_staleness`.
    TooStale {
        /// The update's staleness.
        staleness: u64,
        /// The configured bound.
        max: u64,
    },
    /// Its synchronous round had already closed.
    RoundClosed,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Send `client` the model of `version` and have it run `local_steps` local steps.
    Train {
        /// The client.
        client: ClientId,
        /// The task id its upload must carry.
        task: TaskId,
        /// The global version to train from (always the current one when the command is issued).
        version: ModelVersion,
        /// Local steps `K` (or FedCompass' `Q_i`).
        local_steps: u32,
        /// The seed of every random choice the device makes for the task ([`crate::task_seed`]).
        seed: u64,
    },
    /// Fold the update held under `task` into the aggregation in progress with `weight`.
    Fold {
        /// The update's task.
        task: TaskId,
        /// Who sent it.
        client: ClientId,
        /// Its aggregation weight, in the meaning of the rule's [`Aggregation`](crate::Aggregation).
        weight: f64,
        /// Versions between the update's base and the version it is folded into.
        staleness: u64,
    },
    /// Drop the update held under `task`; it will not be aggregated.
    Discard {
        /// The update's task.
        task: TaskId,
        /// Who sent it.
        client: ClientId,
        /// Why.
        reason: DiscardReason,
    },
    /// Apply the folded updates with the server rule and commit the result as `version`.
    Aggregate {
        /// The version this aggregation creates.
        version: ModelVersion,
        /// Updates folded into it (0 for FedFix's empty windows: the version still advances).
        updates: usize,
        /// The population `N`: every client that has registered in the run, including those that
        /// left or were evicted since (SCAFFOLD's control variates average over them).
        num_clients: usize,
        /// The population at the previous aggregation (0 before the first).
        previous_num_clients: usize,
    },
    /// Wake the Coordinator with [`Event::Timer`] at this instant.
    WakeAt(Timestamp),
    /// Tell `client` to stop `task`: its round closed without it. An upload for it is refused.
    Cancel {
        /// The client.
        client: ClientId,
        /// The task.
        task: TaskId,
    },
    /// Disconnect `client`: it failed too many tasks in a row. It may join again later.
    Evict {
        /// The client.
        client: ClientId,
        /// Why, for the log.
        reason: String,
    },
}

/// An event the Coordinator refused; its state is unchanged.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoordinatorError {
    /// `now` is earlier than a previous event's.
    #[error("time went backwards: {now} is before {last}")]
    TimeWentBackwards {
        /// The event's time.
        now: Timestamp,
        /// The latest time seen.
        last: Timestamp,
    },
    /// The client is not registered.
    #[error("{0} is not registered")]
    UnknownClient(ClientId),
    /// An update or failure for a task that is not running: finished, cancelled, failed, or never
    /// assigned. Duplicated uploads land here.
    #[error("{0} is not running (finished, cancelled, or never assigned)")]
    TaskNotRunning(TaskId),
    /// The update names another client than the one the task was given to.
    #[error("{task} belongs to {expected}, not {actual}")]
    WrongClient {
        /// The task.
        task: TaskId,
        /// Its client.
        expected: ClientId,
        /// The client the update names.
        actual: ClientId,
    },
    /// The update claims another base version than the one the task was given.
    #[error("{task} was given {expected}, the update says {actual}")]
    WrongVersion {
        /// The task.
        task: TaskId,
        /// The version sent with the task.
        expected: ModelVersion,
        /// The version the update names.
        actual: ModelVersion,
    },
}

/// What the Coordinator knows about a registered client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Training samples `n_i`.
    pub num_samples: u64,
    /// The task it is running, if any.
    pub task: Option<TaskId>,
    /// When it joined.
    pub joined_at: Timestamp,
    /// Updates it delivered.
    pub delivered: u64,
    /// Tasks it failed since its last delivered update.
    pub failures_in_a_row: u32,
}

/// One task handed to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task.
    pub task: TaskId,
    /// Its client.
    pub client: ClientId,
    /// The version it trains from.
    pub version: ModelVersion,
    /// Local steps asked for.
    pub local_steps: u32,
    /// When it was assigned.
    pub assigned_at: Timestamp,
    /// The task's seed ([`crate::task_seed`]), sent to the device with the task.
    pub seed: u64,
}

/// An update the Coordinator accepted, as a scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    /// The task it answers.
    pub record: TaskRecord,
    /// Its metadata.
    pub meta: UpdateMeta,
}

/// Counters over a run (all monotone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStats {
    /// Tasks assigned.
    pub assigned: u64,
    /// Updates accepted.
    pub arrived: u64,
    /// Updates folded.
    pub folded: u64,
    /// Updates discarded.
    pub discarded: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks failed (including those lost when a client left).
    pub failed: u64,
    /// Aggregations (versions created).
    pub aggregations: u64,
    /// Clients evicted.
    pub evicted: u64,
    /// Tasks failed because they ran past `task_timeout_s` (counted in `failed` too).
    pub timed_out: u64,
}

/// A set of clients with O(1) insert and remove and O(1) access by position (for sampling).
#[derive(Debug, Default)]
struct IdleSet {
    members: Vec<ClientId>,
    position: std::collections::HashMap<ClientId, usize>,
}

impl IdleSet {
    /// The set of `members`, in that order (a snapshot's).
    fn from_members(members: Vec<ClientId>) -> Self {
        let position = members.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        Self { members, position }
    }

    fn insert(&mut self, client: ClientId) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.position.entry(client) {
            e.insert(self.members.len());
            self.members.push(client);
        }
    }

    fn remove(&mut self, client: ClientId) {
        if let Some(i) = self.position.remove(&client) {
            self.members.swap_remove(i);
            if let Some(&moved) = self.members.get(i) {
                self.position.insert(moved, i);
            }
        }
    }
}

/// The Coordinator's bookkeeping, which schedulers act on through its methods.
#[derive(Debug)]
pub struct Core {
    now: Timestamp,
    version: ModelVersion,
    clients: BTreeMap<ClientId, ClientRecord>,
    /// Registered clients without a task, for O(k) sampling in fleets of 10⁵–10⁶ clients.
    idle: IdleSet,
    /// Σ n_i over registered clients.
    total_samples: u64,
    running: BTreeMap<TaskId, TaskRecord>,
    /// Accepted updates waiting for a fold or discard decision.
    held: BTreeMap<TaskId, TaskRecord>,
    next_task: u64,
    pending_folds: usize,
    timers: BTreeSet<Timestamp>,
    rng: ChaCha12Rng,
    /// The run's seed, which task seeds derive from.
    seed: u64,
    stats: CoordinatorStats,
    evict_after_failures: u32,
    /// The most samples a client's declaration counts for.
    max_samples_per_client: u64,
    /// How long a task may run before it fails (`[algorithm] task_timeout_s`), in microseconds.
    task_timeout: Option<u64>,
    /// Every client that ever registered (leaving does not remove one), the population `N`, with
    /// the number of tasks it was given (the ordinal of its next task's seed).
    population: BTreeMap<ClientId, u64>,
    /// The population when the last aggregation was made.
    population_at_last_aggregate: usize,
    out: Vec<Command>,
}

impl Core {
    fn new(seed: u64, evict_after_failures: u32) -> Self {
        Self {
            now: Timestamp::ZERO,
            version: ModelVersion(0),
            clients: BTreeMap::new(),
            idle: IdleSet::default(),
            total_samples: 0,
            running: BTreeMap::new(),
            held: BTreeMap::new(),
            next_task: 0,
            pending_folds: 0,
            timers: BTreeSet::new(),
            rng: ChaCha12Rng::seed_from_u64(seed),
            seed,
            stats: CoordinatorStats::default(),
            evict_after_failures,
            max_samples_per_client: u64::MAX,
            task_timeout: None,
            population: BTreeMap::new(),
            population_at_last_aggregate: 0,
            out: Vec::new(),
        }
    }

    /// The time of the event being handled.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// The current global version.
    pub fn version(&self) -> ModelVersion {
        self.version
    }

    /// Registered clients (connected now).
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// The population `N`: every client that registered in the run, connected or not.
    pub fn population(&self) -> usize {
        self.population.len()
    }

    /// A registered client's record.
    pub fn client(&self, client: ClientId) -> Option<&ClientRecord> {
        self.clients.get(&client)
    }

    /// Training samples of all registered clients.
    pub fn total_samples(&self) -> u64 {
        self.total_samples
    }

    /// Registered clients without a running task, in id order.
    pub fn idle_clients(&self) -> Vec<ClientId> {
        let mut idle = self.idle.members.clone();
        idle.sort_unstable();
        idle
    }

    /// How many registered clients have no running task.
    pub fn idle_count(&self) -> usize {
        self.idle.members.len()
    }

    /// Tasks running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Up to `k` idle clients chosen uniformly at random (seeded), in the order drawn; O(k).
    pub fn sample_idle(&mut self, k: usize) -> Vec<ClientId> {
        let idle = &self.idle.members;
        let k = k.min(idle.len());
        rand::seq::index::sample(&mut self.rng, idle.len(), k)
            .into_iter()
            .map(|i| idle[i])
            .collect()
    }

    /// Gives `client` a task on the current version; `None` if it is unknown or busy.
    pub fn assign(&mut self, client: ClientId, local_steps: u32) -> Option<TaskId> {
        let record = self.clients.get_mut(&client)?;
        if record.task.is_some() {
            return None;
        }
        let task = TaskId(self.next_task);
        self.next_task += 1;
        record.task = Some(task);
        let ordinal = self.population.entry(client).or_insert(0);
        let seed = crate::seed::task_seed(self.seed, client, *ordinal);
        *ordinal += 1;
        self.idle.remove(client);
        self.running.insert(
            task,
            TaskRecord {
                task,
                client,
                version: self.version,
                local_steps,
                assigned_at: self.now,
                seed,
            },
        );
        self.stats.assigned += 1;
        if let Some(timeout) = self.task_timeout {
            self.wake_at(self.now.after_micros(timeout));
        }
        self.out.push(Command::Train {
            client,
            task,
            version: self.version,
            local_steps,
            seed,
        });
        Some(task)
    }

    /// Folds a held update into the aggregation in progress.
    pub fn fold(&mut self, task: TaskId, weight: f64) {
        if let Some(record) = self.held.remove(&task) {
            self.pending_folds += 1;
            self.stats.folded += 1;
            self.out.push(Command::Fold {
                task,
                client: record.client,
                weight,
                staleness: record.version.staleness(self.version),
            });
        }
    }

    /// Drops a held update.
    pub fn discard(&mut self, task: TaskId, reason: DiscardReason) {
        if let Some(record) = self.held.remove(&task) {
            self.stats.discarded += 1;
            self.out.push(Command::Discard {
                task,
                client: record.client,
                reason,
            });
        }
    }

    /// Updates folded since the last aggregation.
    pub fn pending_folds(&self) -> usize {
        self.pending_folds
    }

    /// Applies what was folded and advances the version.
    pub fn aggregate(&mut self) {
        self.version = self.version.next();
        self.stats.aggregations += 1;
        let population = self.population.len();
        self.out.push(Command::Aggregate {
            version: self.version,
            updates: std::mem::take(&mut self.pending_folds),
            num_clients: population,
            previous_num_clients: std::mem::replace(&mut self.population_at_last_aggregate, population),
        });
    }

    /// Stops a running task; its client becomes idle.
    pub fn cancel(&mut self, task: TaskId) {
        if let Some(record) = self.running.remove(&task) {
            if let Some(c) = self.clients.get_mut(&record.client) {
                c.task = None;
                self.idle.insert(record.client);
            }
            self.stats.cancelled += 1;
            self.out.push(Command::Cancel {
                client: record.client,
                task,
            });
        }
    }

    /// Asks the driver for an [`Event::Timer`] at `at` (once per distinct instant).
    pub fn wake_at(&mut self, at: Timestamp) {
        if self.timers.insert(at) {
            self.out.push(Command::WakeAt(at));
        }
    }

    /// Frees a client's running task as failed; returns its record.
    fn fail_running(&mut self, task: TaskId) -> Option<TaskRecord> {
        let record = self.running.remove(&task)?;
        if let Some(c) = self.clients.get_mut(&record.client) {
            c.task = None;
            c.failures_in_a_row = c.failures_in_a_row.saturating_add(1);
            self.idle.insert(record.client);
        }
        self.stats.failed += 1;
        Some(record)
    }

    /// Removes a client; returns its running task, now lost.
    fn remove_client(&mut self, client: ClientId) -> Option<TaskRecord> {
        let record = self.clients.get(&client)?;
        let lost = record.task.and_then(|t| self.fail_running(t));
        if let Some(removed) = self.clients.remove(&client) {
            self.total_samples = self.total_samples.saturating_sub(removed.num_samples);
        }
        self.idle.remove(client);
        lost
    }
}

/// The Coordinator: [`Core`] bookkeeping driven by a scheduler.
#[derive(Debug)]
pub struct Coordinator {
    core: Core,
    scheduler: Box<dyn Scheduler>,
}

impl Coordinator {
    /// A Coordinator running `scheduler`, with the run's seed for every random choice. A client that
    /// fails `evict_after_failures` tasks in a row is evicted (0 never evicts).
    pub(crate) fn new(scheduler: Box<dyn Scheduler>, seed: u64, evict_after_failures: u32) -> Self {
        Self {
            core: Core::new(seed, evict_after_failures),
            scheduler,
        }
    }

    /// Counts a client's declared samples as at most `cap` (see `[algorithm] max_samples_per_client`).
    pub(crate) fn with_sample_cap(mut self, cap: u64) -> Self {
        self.core.max_samples_per_client = cap.max(1);
        self
    }

    /// Fails a task still running `timeout_s` after it was assigned (see `[algorithm]
    /// task_timeout_s`): a client that takes a task and never answers holds no round for longer.
    pub(crate) fn with_task_timeout(mut self, timeout_s: Option<f64>) -> Self {
        self.core.task_timeout = timeout_s.map(|s| shoal_core::micros_from_secs(s).max(1));
        self
    }

    /// The task failed (reported, or past its timeout): the client may be evicted, the scheduler
    /// moves on.
    fn task_failed(&mut self, task: TaskId) {
        let core = &mut self.core;
        if let Some(record) = core.fail_running(task) {
            let failures = core
                .clients
                .get(&record.client)
                .map_or(0, |c| c.failures_in_a_row);
            if core.evict_after_failures > 0 && failures >= core.evict_after_failures {
                core.remove_client(record.client);
                core.stats.evicted += 1;
                core.out.push(Command::Evict {
                    client: record.client,
                    reason: format!("{failures} failed tasks in a row"),
                });
                self.scheduler.on_left(core, record.client, Some(record));
            } else {
                self.scheduler.on_failed(core, record);
            }
        }
    }

    /// Handles one event at `now` and returns the commands to carry out, in order.
    pub fn handle(&mut self, now: Timestamp, event: Event) -> Result<Vec<Command>, CoordinatorError> {
        if now < self.core.now {
            return Err(CoordinatorError::TimeWentBackwards {
                now,
                last: self.core.now,
            });
        }
        self.validate(&event)?;
        self.core.now = now;
        let core = &mut self.core;
        match event {
            Event::Joined { client, num_samples } => {
                let num_samples = num_samples.min(core.max_samples_per_client);
                if let Some(record) = core.clients.get_mut(&client) {
                    core.total_samples = core
                        .total_samples
                        .saturating_sub(record.num_samples)
                        .saturating_add(num_samples);
                    record.num_samples = num_samples;
                } else {
                    core.population.entry(client).or_insert(0);
                    core.total_samples = core.total_samples.saturating_add(num_samples);
                    core.idle.insert(client);
                    core.clients.insert(
                        client,
                        ClientRecord {
                            num_samples,
                            task: None,
                            joined_at: now,
                            delivered: 0,
                            failures_in_a_row: 0,
                        },
                    );
                    self.scheduler.on_joined(core, client);
                }
            }
            Event::Left { client } => {
                let lost = core.remove_client(client);
                self.scheduler.on_left(core, client, lost);
            }
            Event::UpdateArrived(mut meta) => {
                meta.num_samples = meta.num_samples.min(core.max_samples_per_client);
                if let Some(record) = core.running.remove(&meta.task) {
                    if let Some(c) = core.clients.get_mut(&record.client) {
                        c.task = None;
                        c.delivered += 1;
                        c.failures_in_a_row = 0;
                        core.idle.insert(record.client);
                    }
                    core.held.insert(meta.task, record);
                    core.stats.arrived += 1;
                    self.scheduler.on_arrival(core, Arrival { record, meta });
                }
            }
            Event::TaskFailed { task } => self.task_failed(task),
            Event::Timer => {
                let later = core.timers.split_off(&now.after_micros(1));
                core.timers = later;
                if let Some(timeout) = core.task_timeout {
                    let overdue: Vec<TaskRecord> = core
                        .running
                        .values()
                        .filter(|r| r.assigned_at.after_micros(timeout) <= now)
                        .copied()
                        .collect();
                    for record in overdue {
                        // The device is told to drop it; an upload for it is refused from now on.
                        self.core.out.push(Command::Cancel {
                            client: record.client,
                            task: record.task,
                        });
                        self.core.stats.timed_out += 1;
                        self.task_failed(record.task);
                    }
                }
                self.scheduler.on_timer(&mut self.core);
            }
        }
        Ok(std::mem::take(&mut self.core.out))
    }

    /// Refuses events that name unknown clients or tasks, before anything changes.
    fn validate(&self, event: &Event) -> Result<(), CoordinatorError> {
        match event {
            Event::Left { client } if !self.core.clients.contains_key(client) => {
                Err(CoordinatorError::UnknownClient(*client))
            }
            Event::UpdateArrived(meta) => {
                let record = self
                    .core
                    .running
                    .get(&meta.task)
                    .ok_or(CoordinatorError::TaskNotRunning(meta.task))?;
                if record.client != meta.client {
                    return Err(CoordinatorError::WrongClient {
                        task: meta.task,
                        expected: record.client,
                        actual: meta.client,
                    });
                }
                if record.version != meta.base_version {
                    return Err(CoordinatorError::WrongVersion {
                        task: meta.task,
                        expected: record.version,
                        actual: meta.base_version,
                    });
                }
                Ok(())
            }
            Event::TaskFailed { task } if !self.core.running.contains_key(task) => {
                Err(CoordinatorError::TaskNotRunning(*task))
            }
            _ => Ok(()),
        }
    }

    /// The current global version.
    pub fn version(&self) -> ModelVersion {
        self.core.version
    }

    /// Training samples of all registered clients (each counted up to the cap).
    pub fn total_samples(&self) -> u64 {
        self.core.total_samples
    }

    /// The earliest time the Coordinator asked to be woken at, if any.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        self.core.timers.first().copied()
    }

    /// Registered clients and their records, in id order.
    pub fn clients(&self) -> impl Iterator<Item = (ClientId, &ClientRecord)> {
        self.core.clients.iter().map(|(&id, r)| (id, r))
    }

    /// Tasks running, in id order.
    pub fn running_tasks(&self) -> impl Iterator<Item = &TaskRecord> {
        self.core.running.values()
    }

    /// The record of a registered client.
    pub fn client(&self, client: ClientId) -> Option<&ClientRecord> {
        self.core.clients.get(&client)
    }

    /// The running task `task`, if it is running.
    pub fn running_task(&self, task: TaskId) -> Option<&TaskRecord> {
        self.core.running.get(&task)
    }

    /// Whether `task` was ever assigned (running or not): an id past the last one assigned was
    /// made up by whoever names it.
    pub fn has_assigned(&self, task: TaskId) -> bool {
        task.0 < self.core.next_task
    }

    /// Whether a refused update could not have come from an honest client: it names a task never
    /// assigned, another client's task, or its own task with a base version it was never sent.
    /// (An honest client's late upload for a task that ended is refused as `TaskNotRunning` of an
    /// assigned task and is not counted against it.)
    pub fn is_forged(&self, refusal: &CoordinatorError) -> bool {
        match refusal {
            CoordinatorError::TaskNotRunning(task) => !self.has_assigned(*task),
            CoordinatorError::WrongClient { .. } | CoordinatorError::WrongVersion { .. } => true,
            CoordinatorError::TimeWentBackwards { .. } | CoordinatorError::UnknownClient(_) => false,
        }
    }

    /// Accepted updates not yet folded or discarded.
    pub fn held_updates(&self) -> usize {
        self.core.held.len()
    }

    /// Updates folded into the aggregation in progress.
    pub fn pending_folds(&self) -> usize {
        self.core.pending_folds
    }

    /// Counters over the run.
    pub fn stats(&self) -> CoordinatorStats {
        self.core.stats
    }

    /// The scheduler's name, as in the configuration.
    pub fn scheduler_name(&self) -> &'static str {
        self.scheduler.name()
    }

    /// Its whole state (not its configuration) as bytes: see [`crate::snapshot`].
    pub fn snapshot(&self) -> Vec<u8> {
        let core = &self.core;
        let state = CoreState {
            now: core.now,
            version: core.version,
            clients: core.clients.clone(),
            idle: core.idle.members.clone(),
            total_samples: core.total_samples,
            running: core.running.clone(),
            held: core.held.clone(),
            next_task: core.next_task,
            pending_folds: core.pending_folds,
            timers: core.timers.clone(),
            rng: SavedRng::save(&core.rng),
            stats: core.stats,
            population: core.population.clone(),
            population_at_last_aggregate: core.population_at_last_aggregate,
        };
        let snapshot = Snapshot::new(self.scheduler.name(), state, self.scheduler.save_state());
        crate::snapshot::encode_state(&snapshot)
    }

    /// Takes the state of a [`Coordinator::snapshot`] of a Coordinator of the same configuration;
    /// nothing changes when it is refused.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let snapshot = Snapshot::decode(bytes, self.scheduler.name())?;
        self.scheduler.load_state(&snapshot.scheduler_state)?;
        let state = snapshot.core;
        let core = &mut self.core;
        core.now = state.now;
        core.version = state.version;
        core.clients = state.clients;
        core.idle = IdleSet::from_members(state.idle);
        core.total_samples = state.total_samples;
        core.running = state.running;
        core.held = state.held;
        core.next_task = state.next_task;
        core.pending_folds = state.pending_folds;
        core.timers = state.timers;
        core.rng = state.rng.restore();
        core.stats = state.stats;
        core.population = state.population;
        core.population_at_last_aggregate = state.population_at_last_aggregate;
        core.out.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;
    use rand::rngs::StdRng;
    use std::collections::BTreeSet;

    #[test]
    fn the_idle_set_matches_a_plain_set_under_random_operations() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut idle = IdleSet::default();
        let mut model = BTreeSet::new();
        for _ in 0..20_000 {
            let client = ClientId(rng.random_range(0..64));
            if rng.random::<bool>() {
                idle.insert(client);
                model.insert(client);
            } else {
                idle.remove(client);
                model.remove(&client);
            }
            assert_eq!(idle.members.len(), model.len());
            assert_eq!(idle.position.len(), model.len());
        }
        let mut members = idle.members.clone();
        members.sort_unstable();
        assert_eq!(members, model.into_iter().collect::<Vec<_>>());
        for (i, c) in idle.members.iter().enumerate() {
            assert_eq!(idle.position[c], i);
        }
    }
}
