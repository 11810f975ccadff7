//! The discrete-event engine: the sans-IO Coordinator driven by a virtual clock and a fleet.
//!
//! One queue holds every pending happening, ordered by virtual time, then class (device events
//! before the Coordinator's timers at the same instant, the Coordinator's convention), then the
//! order in which they were scheduled — so a run is a pure function of its configuration and seed.
//!
//! A task given to device `d` at `t` goes through three phases, each an event:
//! `Downloaded` after `download bytes / downlink(t)`, `Trained` after
//! `local steps × step time × jitter`, `Uploaded` after `upload bytes / uplink(t')` where the upload
//! bytes are the real encoded size of what the device computed. Devices go on and off line with
//! their availability windows (a task running when its device goes offline is lost), and a task is
//! lost with the device's dropout probability before its upload starts.
//!
//! A split-learning task ([`Workload::split_serving`]) replaces the single compute phase with its
//! minibatch exchanges: for each local step the device runs the head forward, uploads the forward
//! message, the server runs the tail (on one of its lanes, first come first served — or, under
//! SplitFed V2, holding its one tail for one task at a time, so clients are served in turn), the
//! gradient comes back over the downlink, and the device runs the head backward. The message sizes
//! are the real encoded sizes of what the task computed.
//!
//! What a task computes is the [`Workload`]'s business: real training (`training`), or nothing but
//! sizes (`systems`). The engine asks for a task's result only when its `Trained` event comes, so a
//! workload may compute every task started so far in parallel at that moment without changing the
//! outcome: each task's result depends only on what it started from and its own seed.

use crate::fleet::Fleet;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use shoal_aggregators::hierarchy::{AggregationTimeline, TimelineStats};
use shoal_aggregators::{Command, ConfigError, Coordinator, CoordinatorError, Event, RuleError};
use shoal_compression::{CodecError, DecodeError};
use shoal_core::{ClientId, CompressError, ModelVersion, TaskId, Timestamp, UpdateMeta, micros_from_secs};
use shoal_model::ModelError;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use thiserror::Error;

/// Why a simulation stopped with an error.
#[derive(Debug, Error)]
pub enum SimError {
    /// The Coordinator refused an event (a bug in the driver, reported rather than hidden).
    #[error("coordinator: {0}")]
    Coordinator(#[from] CoordinatorError),
    /// A client or server rule failed.
    #[error("rule: {0}")]
    Rule(#[from] RuleError),
    /// Encoding or decoding an upload failed.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// The server could not decode an upload.
    #[error("decoding an upload: {0}")]
    Decode(#[from] DecodeError),
    /// A compressor failed.
    #[error("compression: {0}")]
    Compress(#[from] CompressError),
    /// The model failed (evaluation).
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The `[algorithm]` table cannot run.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Split training failed.
    #[error("split learning: {0}")]
    Split(#[from] shoal_split::SplitError),
    /// A device's task failed (its rule, or encoding its upload).
    #[error("device: {0}")]
    Device(#[from] shoal_engine::DeviceError),
    /// An upload does not decode as the server would decode it.
    #[error("upload: {0}")]
    Upload(#[from] shoal_engine::UploadError),
    /// The server core could not carry out a decision (fold, merge, apply).
    #[error("server: {0}")]
    Core(#[from] shoal_engine::CoreError),
    /// A task the workload does not know.
    #[error("the workload has no {0}")]
    UnknownTask(TaskId),
}

/// What a workload reports when a task's local work is done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    /// Bytes of the encoded upload.
    pub upload_bytes: u64,
    /// Mean local training loss (0 when nothing is trained).
    pub loss: f32,
}

/// How split-learning tasks use the server and the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitServing {
    /// Device compute of one step's head forward pass, as a fraction of the device's step time.
    pub head_forward: f64,
    /// Device compute of one step's head backward pass, as a fraction of the device's step time.
    pub head_backward: f64,
    /// Server seconds per step (the tail's forward and backward pass of one minibatch).
    pub server_step_s: f64,
    /// Minibatches the server processes at once.
    pub lanes: usize,
    /// Whether a task holds the server from its first step to its last (SplitFed V2: one tail,
    /// clients in turn).
    pub in_turn: bool,
}

/// The message sizes of a split task's steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplitSteps {
    /// Bytes of each step's forward message.
    pub up: Vec<u64>,
    /// Bytes of each step's gradient message.
    pub down: Vec<u64>,
}

/// What the devices compute and what the server does with it.
pub trait Workload {
    /// Bytes a device downloads to start a task on the current version.
    fn download_bytes(&self) -> u64;
    /// Device `client` starts `task` on the current global state; `seed` is the task's seed, as
    /// the Coordinator gave it.
    fn start(&mut self, task: TaskId, client: usize, local_steps: u32, seed: u64) -> Result<(), SimError>;
    /// The task's local work is done: its upload size and loss.
    fn finish(&mut self, task: TaskId) -> Result<Finished, SimError>;
    /// The task's upload reached the server and was accepted.
    fn delivered(&mut self, task: TaskId) -> Result<(), SimError>;
    /// The task is gone (cancelled, failed, lost, or its update discarded).
    fn forget(&mut self, task: TaskId);
    /// Folds the task's update with `weight`.
    fn fold(&mut self, task: TaskId, weight: f64) -> Result<(), SimError>;
    /// Applies what was folded: a new global version, with the population `N` now and at the
    /// previous aggregation.
    fn aggregate(&mut self, num_clients: usize, previous_num_clients: usize) -> Result<(), SimError>;
    /// Split learning: how tasks use the server; `None` (the default) for federated workloads.
    fn split_serving(&self) -> Option<SplitServing> {
        None
    }
    /// Split learning: the task's step messages. Called when its model download is done, or under
    /// [`SplitServing::in_turn`] when the server takes the task — the moment a workload whose
    /// tasks share server state must compute it.
    fn split_steps(&mut self, task: TaskId) -> Result<SplitSteps, SimError> {
        Err(SimError::UnknownTask(task))
    }
}

/// Counters of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Happenings processed.
    pub events: u64,
    /// Bytes downloaded by devices (models and broadcast vectors).
    pub bytes_down: u64,
    /// Bytes uploaded by devices.
    pub bytes_up: u64,
    /// Tasks given out.
    pub tasks_started: u64,
    /// Updates that reached the server.
    pub tasks_delivered: u64,
    /// Tasks lost to dropout.
    pub tasks_dropped: u64,
    /// Tasks lost because their device went offline.
    pub tasks_lost_offline: u64,
    /// Tasks cancelled by the scheduler.
    pub tasks_cancelled: u64,
    /// Updates folded.
    pub folds: u64,
    /// Updates discarded.
    pub discards: u64,
    /// Global versions produced.
    pub aggregations: u64,
}

/// One aggregation: the new version and what went into it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregated {
    /// The new version.
    pub version: ModelVersion,
    /// When it is ready: the aggregation's call, plus the server's aggregation work when
    /// `[server.aggregation]` charges it.
    pub time: Timestamp,
    /// Updates folded into it.
    pub updates: usize,
    /// Mean staleness of those updates.
    pub staleness_mean: f64,
    /// Largest staleness among them.
    pub staleness_max: u64,
    /// Mean local training loss reported with them.
    pub client_loss: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Happening {
    Online(u32),
    Offline(u32),
    Downloaded(TaskId),
    Trained(TaskId),
    Uploaded(TaskId),
    /// A split step's forward message reached the server.
    StepSent(TaskId),
    /// The server finished a split step.
    StepServed(TaskId),
    /// A split step's gradient reached the device.
    StepReturned(TaskId),
    Wake,
}

impl Happening {
    /// Device and task events come before the Coordinator's timers at the same instant.
    fn class(self) -> u8 {
        match self {
            Happening::Wake => 1,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct TaskRun {
    device: u32,
    version: ModelVersion,
    local_steps: u32,
    started: Timestamp,
    drops: bool,
    jitter: f64,
    loss: f32,
    upload_bytes: u64,
    /// Split tasks: the step in progress.
    step: u32,
}

/// The server of split-learning runs: lanes, what waits for them, and which task holds it.
#[derive(Debug, Default)]
struct SplitServer {
    busy: usize,
    waiting_steps: VecDeque<TaskId>,
    waiting_tasks: VecDeque<TaskId>,
    held_by: Option<TaskId>,
    steps: HashMap<TaskId, SplitSteps>,
}

/// Mixed into a task's seed for the simulated device's own behaviour (dropout, jitter), so it draws
/// from another stream than the task's minibatches and codec stages.
const DEVICE_BEHAVIOUR_STREAM: u64 = 0xd1ce_5eed_0f0f_1ee7;

/// The engine over a fleet and a workload.
pub struct Engine<W> {
    coordinator: Coordinator,
    fleet: Fleet,
    workload: W,
    samples: Vec<u64>,
    queue: BinaryHeap<Reverse<(Timestamp, u8, u64, Happening)>>,
    seq: u64,
    now: Timestamp,
    tasks: HashMap<TaskId, TaskRun>,
    device_task: Vec<Option<TaskId>>,
    registered: Vec<bool>,
    stats: EngineStats,
    ready: VecDeque<Aggregated>,
    /// What was folded since the last aggregation.
    window: shoal_engine::metrics::FoldWindow,
    losses: HashMap<TaskId, f32>,
    split: Option<SplitServing>,
    split_server: SplitServer,
    /// The server's aggregation work on the clock (`[server.aggregation]`), and when the version
    /// it last produced is ready to send.
    aggregation: Option<AggregationTimeline>,
    model_ready: Timestamp,
}

impl<W: Workload> Engine<W> {
    /// An engine in which device `i` holds `samples[i]` training samples. Devices online at time 0
    /// join then; the others when their window opens.
    pub fn new(coordinator: Coordinator, fleet: Fleet, samples: Vec<u64>, workload: W) -> Self {
        let n = fleet.devices.len();
        let split = workload.split_serving();
        let mut engine = Self {
            coordinator,
            fleet,
            workload,
            samples,
            queue: BinaryHeap::new(),
            seq: 0,
            now: Timestamp::ZERO,
            tasks: HashMap::new(),
            device_task: vec![None; n],
            registered: vec![false; n],
            stats: EngineStats::default(),
            ready: VecDeque::new(),
            window: Default::default(),
            losses: HashMap::new(),
            split,
            split_server: SplitServer::default(),
            aggregation: None,
            model_ready: Timestamp::ZERO,
        };
        for i in 0..n {
            let availability = engine.fleet.devices[i].availability;
            if availability.online_at(0.0) {
                engine.push(Timestamp::ZERO, Happening::Online(i as u32));
            } else if let Some(t) = availability.next_window_start(0.0) {
                engine.push(Timestamp::from_secs_f64(t), Happening::Online(i as u32));
            }
        }
        engine
    }

    /// Charges the server's aggregation on the clock: every fold on `timeline`'s leaves as it
    /// arrives, every new version ready (and its tasks' downloads started) when its merges end.
    pub fn charge_aggregation(mut self, timeline: AggregationTimeline) -> Self {
        self.aggregation = Some(timeline);
        self
    }

    /// The server's aggregation figures, when it is charged.
    pub fn aggregation_stats(&self) -> Option<&TimelineStats> {
        self.aggregation.as_ref().map(AggregationTimeline::stats)
    }

    /// A virtual time from seconds, strictly after now.
    fn later(&self, t_s: f64) -> Timestamp {
        Timestamp::from_secs_f64(t_s).max(self.now.after_micros(1))
    }

    fn push(&mut self, at: Timestamp, happening: Happening) {
        self.seq += 1;
        self.queue
            .push(Reverse((at, happening.class(), self.seq, happening)));
    }

    /// The virtual clock.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// The workload (to evaluate the model, for instance).
    pub fn workload(&self) -> &W {
        &self.workload
    }

    /// The Coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Runs until the next aggregation and returns it, or `None` when virtual time would pass
    /// `until` or nothing is left to happen.
    pub fn next_aggregation(&mut self, until: Timestamp) -> Result<Option<Aggregated>, SimError> {
        loop {
            if let Some(done) = self.ready.pop_front() {
                return Ok(Some(done));
            }
            let Some(&Reverse((at, _, _, _))) = self.queue.peek() else {
                return Ok(None);
            };
            if at > until {
                self.now = self.now.max(until);
                return Ok(None);
            }
            let Some(Reverse((at, _, _, happening))) = self.queue.pop() else {
                return Ok(None);
            };
            self.now = at;
            self.stats.events += 1;
            self.happen(happening)?;
            if self.split.is_some_and(|s| s.in_turn) {
                self.admit_in_turn()?;
            }
        }
    }

    fn happen(&mut self, happening: Happening) -> Result<(), SimError> {
        match happening {
            Happening::Online(d) => {
                let i = d as usize;
                if let Some(t) = self.fleet.devices[i]
                    .availability
                    .window_end(self.now.as_secs_f64())
                {
                    let t = self.later(t);
                    self.push(t, Happening::Offline(d));
                }
                if !self.registered[i] {
                    self.registered[i] = true;
                    self.deliver(Event::Joined {
                        client: ClientId(u64::from(d)),
                        num_samples: self.samples[i],
                    })?;
                }
            }
            Happening::Offline(d) => {
                let i = d as usize;
                if let Some(t) = self.fleet.devices[i]
                    .availability
                    .next_window_start(self.now.as_secs_f64())
                {
                    let t = self.later(t);
                    self.push(t, Happening::Online(d));
                }
                if let Some(task) = self.device_task[i].take() {
                    self.tasks.remove(&task);
                    self.workload.forget(task);
                    self.stats.tasks_lost_offline += 1;
                }
                if self.registered[i] {
                    self.registered[i] = false;
                    self.deliver(Event::Left {
                        client: ClientId(u64::from(d)),
                    })?;
                }
            }
            Happening::Downloaded(task) => {
                let Some(run) = self.tasks.get(&task).copied() else {
                    return Ok(());
                };
                self.stats.bytes_down += self.workload.download_bytes();
                if let Some(serving) = self.split {
                    if serving.in_turn {
                        self.split_server.waiting_tasks.push_back(task);
                        return self.admit_in_turn();
                    }
                    let steps = self.workload.split_steps(task)?;
                    self.split_server.steps.insert(task, steps);
                    self.send_step(task, 0.0);
                    return Ok(());
                }
                let step = self.fleet.devices[run.device as usize].step_time_s;
                let compute = f64::from(run.local_steps) * step * run.jitter;
                self.push(
                    self.now.after_micros(micros_from_secs(compute)),
                    Happening::Trained(task),
                );
            }
            Happening::Trained(task) => {
                let Some(run) = self.tasks.get(&task).copied() else {
                    return Ok(());
                };
                if run.drops {
                    self.end_task(task);
                    self.stats.tasks_dropped += 1;
                    return self.deliver(Event::TaskFailed { task });
                }
                let finished = self.workload.finish(task)?;
                if let Some(r) = self.tasks.get_mut(&task) {
                    r.loss = finished.loss;
                    r.upload_bytes = finished.upload_bytes;
                }
                let up = &self.fleet.devices[run.device as usize].up;
                let seconds = up.transfer_s(self.now.as_secs_f64(), finished.upload_bytes);
                self.push(
                    self.now.after_micros(micros_from_secs(seconds)),
                    Happening::Uploaded(task),
                );
            }
            Happening::Uploaded(task) => {
                let Some(run) = self.end_task(task) else {
                    return Ok(());
                };
                self.stats.bytes_up += run.upload_bytes;
                self.stats.tasks_delivered += 1;
                self.workload.delivered(task)?;
                self.losses.insert(task, run.loss);
                self.deliver(Event::UpdateArrived(UpdateMeta {
                    client: ClientId(u64::from(run.device)),
                    task,
                    base_version: run.version,
                    num_samples: self.samples[run.device as usize],
                    local_steps: run.local_steps,
                    loss: run.loss,
                    duration_s: self.now.micros_since(run.started) as f64 * 1e-6,
                }))?;
            }
            Happening::StepSent(task) => {
                let (Some(run), Some(serving)) = (self.tasks.get(&task).copied(), self.split) else {
                    return Ok(());
                };
                self.stats.bytes_up += self.step_bytes(task, run.step).0;
                let done = self.now.after_micros(micros_from_secs(serving.server_step_s));
                if serving.in_turn {
                    self.push(done, Happening::StepServed(task));
                } else if self.split_server.busy < serving.lanes.max(1) {
                    self.split_server.busy += 1;
                    self.push(done, Happening::StepServed(task));
                } else {
                    self.split_server.waiting_steps.push_back(task);
                }
            }
            Happening::StepServed(task) => {
                let Some(serving) = self.split else {
                    return Ok(());
                };
                if !serving.in_turn {
                    self.split_server.busy = self.split_server.busy.saturating_sub(1);
                    while let Some(next) = self.split_server.waiting_steps.pop_front() {
                        if self.tasks.contains_key(&next) {
                            self.split_server.busy += 1;
                            let done = self.now.after_micros(micros_from_secs(serving.server_step_s));
                            self.push(done, Happening::StepServed(next));
                            break;
                        }
                    }
                }
                let Some(run) = self.tasks.get(&task).copied() else {
                    return Ok(());
                };
                let bytes = self.step_bytes(task, run.step).1;
                let down = &self.fleet.devices[run.device as usize].down;
                let seconds = down.transfer_s(self.now.as_secs_f64(), bytes);
                self.push(
                    self.now.after_micros(micros_from_secs(seconds)),
                    Happening::StepReturned(task),
                );
            }
            Happening::StepReturned(task) => {
                let (Some(run), Some(serving)) = (self.tasks.get(&task).copied(), self.split) else {
                    return Ok(());
                };
                self.stats.bytes_down += self.step_bytes(task, run.step).1;
                let step_s = self.fleet.devices[run.device as usize].step_time_s * run.jitter;
                let backward_s = step_s * serving.head_backward;
                let next = run.step + 1;
                if let Some(r) = self.tasks.get_mut(&task) {
                    r.step = next;
                }
                if next < run.local_steps {
                    self.send_step(task, backward_s);
                } else {
                    self.split_server.steps.remove(&task);
                    if self.split_server.held_by == Some(task) {
                        self.split_server.held_by = None;
                        self.admit_in_turn()?;
                    }
                    self.push(
                        self.now.after_micros(micros_from_secs(backward_s)),
                        Happening::Trained(task),
                    );
                }
            }
            Happening::Wake => self.deliver(Event::Timer)?,
        }
        Ok(())
    }

    /// The forward and gradient bytes of a split task's step.
    fn step_bytes(&self, task: TaskId, step: u32) -> (u64, u64) {
        let steps = self.split_server.steps.get(&task);
        let at = |v: Option<&Vec<u64>>| v.and_then(|v| v.get(step as usize)).copied().unwrap_or(0);
        (at(steps.map(|s| &s.up)), at(steps.map(|s| &s.down)))
    }

    /// The device runs `before_s` of other work (the previous step's head backward), the head
    /// forward of its current step, and uploads the forward message.
    fn send_step(&mut self, task: TaskId, before_s: f64) {
        let (Some(run), Some(serving)) = (self.tasks.get(&task).copied(), self.split) else {
            return;
        };
        let profile = &self.fleet.devices[run.device as usize];
        let forward_s = profile.step_time_s * run.jitter * serving.head_forward;
        let ready = self.now.as_secs_f64() + before_s + forward_s;
        let bytes = self.step_bytes(task, run.step).0;
        let seconds = profile.up.transfer_s(ready, bytes);
        let at = self
            .now
            .after_micros(micros_from_secs(before_s + forward_s) + micros_from_secs(seconds));
        self.push(at, Happening::StepSent(task));
    }

    /// SplitFed V2: when the server is free, it takes the next waiting task whose download is
    /// done, and that task's steps are computed against the shared tail as it is now.
    fn admit_in_turn(&mut self) -> Result<(), SimError> {
        if self.split_server.held_by.is_some() {
            return Ok(());
        }
        while let Some(task) = self.split_server.waiting_tasks.pop_front() {
            if self.tasks.contains_key(&task) {
                self.split_server.held_by = Some(task);
                let steps = self.workload.split_steps(task)?;
                self.split_server.steps.insert(task, steps);
                self.send_step(task, 0.0);
                break;
            }
        }
        Ok(())
    }

    /// Forgets a task's run and frees its device.
    fn end_task(&mut self, task: TaskId) -> Option<TaskRun> {
        let run = self.tasks.remove(&task)?;
        self.split_server.steps.remove(&task);
        if self.split_server.held_by == Some(task) {
            // A task lost mid-way frees the server; the next one is taken after this event.
            self.split_server.held_by = None;
        }
        let slot = &mut self.device_task[run.device as usize];
        if *slot == Some(task) {
            *slot = None;
        }
        Some(run)
    }

    fn deliver(&mut self, event: Event) -> Result<(), SimError> {
        let commands = self.coordinator.handle(self.now, event)?;
        for command in commands {
            self.carry_out(command)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, command: Command) -> Result<(), SimError> {
        match command {
            Command::Train {
                client,
                task,
                version,
                local_steps,
                seed,
            } => {
                let device = client.0 as u32;
                let profile = &self.fleet.devices[device as usize];
                // The device's behaviour (dropout, jitter) draws from its own stream of the task's seed.
                let mut rng = StdRng::seed_from_u64(seed ^ DEVICE_BEHAVIOUR_STREAM);
                let drops = profile.dropout > 0.0 && rng.random::<f64>() < profile.dropout;
                let jitter = if self.fleet.jitter > 0.0 {
                    LogNormal::new(0.0, self.fleet.jitter).map_or(1.0, |d| d.sample(&mut rng))
                } else {
                    1.0
                };
                // The model can leave the server only once its aggregation is done.
                let sent = self.now.max(self.model_ready);
                let seconds = profile
                    .down
                    .transfer_s(sent.as_secs_f64(), self.workload.download_bytes());
                self.workload.start(task, device as usize, local_steps, seed)?;
                self.tasks.insert(
                    task,
                    TaskRun {
                        device,
                        version,
                        local_steps,
                        started: self.now,
                        drops,
                        jitter,
                        loss: 0.0,
                        upload_bytes: 0,
                        step: 0,
                    },
                );
                self.device_task[device as usize] = Some(task);
                self.stats.tasks_started += 1;
                self.push(
                    sent.after_micros(micros_from_secs(seconds)),
                    Happening::Downloaded(task),
                );
            }
            Command::Fold {
                task,
                weight,
                staleness,
                ..
            } => {
                self.workload.fold(task, weight)?;
                self.workload.forget(task);
                if let Some(timeline) = &mut self.aggregation {
                    timeline.arrive(self.now.as_secs_f64());
                }
                self.stats.folds += 1;
                // Every folded task was uploaded, which recorded its loss.
                let loss = self.losses.remove(&task).unwrap_or(f32::NAN);
                self.window.fold(staleness, loss);
            }
            Command::Discard { task, .. } => {
                self.workload.forget(task);
                self.losses.remove(&task);
                self.stats.discards += 1;
            }
            Command::Aggregate {
                version,
                updates,
                num_clients,
                previous_num_clients,
            } => {
                self.workload.aggregate(num_clients, previous_num_clients)?;
                self.stats.aggregations += 1;
                let ready = match &mut self.aggregation {
                    Some(timeline) => {
                        Timestamp::from_secs_f64(timeline.aggregate(self.now.as_secs_f64())).max(self.now)
                    }
                    None => self.now,
                };
                self.model_ready = ready;
                let folded = self.window.take();
                self.ready.push_back(Aggregated {
                    version,
                    time: ready,
                    updates,
                    staleness_mean: folded.staleness_mean,
                    staleness_max: folded.staleness_max,
                    // No updates, no loss: a window of none adds nothing to a record.
                    client_loss: folded.client_loss.unwrap_or(0.0),
                });
            }
            Command::WakeAt(at) => self.push(at, Happening::Wake),
            Command::Cancel { task, .. } => {
                if self.end_task(task).is_some() {
                    self.workload.forget(task);
                    self.stats.tasks_cancelled += 1;
                }
            }
            Command::Evict { client, .. } => {
                // It may come back when its device next goes online.
                if let Some(r) = self.registered.get_mut(client.0 as usize) {
                    *r = false;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{ComputeSpec, FleetConfig, LinkSpec};
    use shoal_aggregators::schedulers::sync::SyncConfig;
    use shoal_aggregators::{AlgorithmConfig, RuleConfig, SchedulerConfig};

    /// Fixed sizes, nothing computed: counts what the engine asks for.
    #[derive(Default)]
    struct Counting {
        started: u64,
        folded: u64,
        forgotten: u64,
    }

    impl Workload for Counting {
        fn download_bytes(&self) -> u64 {
            1_000_000
        }
        fn start(&mut self, _: TaskId, _: usize, _: u32, _: u64) -> Result<(), SimError> {
            self.started += 1;
            Ok(())
        }
        fn finish(&mut self, _: TaskId) -> Result<Finished, SimError> {
            Ok(Finished {
                upload_bytes: 250_000,
                loss: 1.0,
            })
        }
        fn delivered(&mut self, _: TaskId) -> Result<(), SimError> {
            Ok(())
        }
        fn forget(&mut self, _: TaskId) {
            self.forgotten += 1;
        }
        fn fold(&mut self, _: TaskId, _: f64) -> Result<(), SimError> {
            self.folded += 1;
            Ok(())
        }
        fn aggregate(&mut self, _: usize, _: usize) -> Result<(), SimError> {
            Ok(())
        }
    }

    /// Split steps of fixed sizes: 1000-byte forward and gradient messages.
    struct SplitCounting {
        serving: SplitServing,
        inner: Counting,
        computed_at: Vec<TaskId>,
    }

    impl Workload for SplitCounting {
        fn download_bytes(&self) -> u64 {
            self.inner.download_bytes()
        }
        fn start(&mut self, task: TaskId, client: usize, steps: u32, seed: u64) -> Result<(), SimError> {
            self.inner.start(task, client, steps, seed)
        }
        fn finish(&mut self, task: TaskId) -> Result<Finished, SimError> {
            self.inner.finish(task)
        }
        fn delivered(&mut self, task: TaskId) -> Result<(), SimError> {
            self.inner.delivered(task)
        }
        fn forget(&mut self, task: TaskId) {
            self.inner.forget(task);
        }
        fn fold(&mut self, task: TaskId, weight: f64) -> Result<(), SimError> {
            self.inner.fold(task, weight)
        }
        fn aggregate(&mut self, n: usize, previous: usize) -> Result<(), SimError> {
            self.inner.aggregate(n, previous)
        }
        fn split_serving(&self) -> Option<SplitServing> {
            Some(self.serving)
        }
        fn split_steps(&mut self, task: TaskId) -> Result<SplitSteps, SimError> {
            self.computed_at.push(task);
            Ok(SplitSteps {
                up: vec![1000; 3],
                down: vec![1000; 3],
            })
        }
    }

    fn split_round(lanes: usize, in_turn: bool) -> (Aggregated, EngineStats, usize) {
        // 1 MB down at 8 Mbit/s = 1 s; 0.25 MB up at 2 Mbit/s = 1 s; 1000-byte step messages take
        // 1 ms each way at 8 Mbit/s. Step time 0.1 s: head forward 0.01 s, backward 0.02 s; the
        // server takes 0.05 s per step.
        let cfg = FleetConfig {
            compute: ComputeSpec::Homogeneous,
            down: LinkSpec::Constant { mbit_s: 8.0 },
            up: LinkSpec::Constant { mbit_s: 8.0 },
            ..FleetConfig::default()
        };
        let fleet = cfg.build(2, 0.1, None, 0).unwrap();
        for d in &fleet.devices {
            assert_eq!(d.step_time_s, 0.1);
        }
        let coordinator = {
            let cfg = AlgorithmConfig {
                local_steps: 3,
                ..AlgorithmConfig::new(
                    RuleConfig::FedAvg { server_lr: 1.0 },
                    SchedulerConfig::Sync(SyncConfig {
                        clients_per_round: Some(2),
                        ..SyncConfig::default()
                    }),
                )
            };
            cfg.build(0).unwrap().1
        };
        let workload = SplitCounting {
            serving: SplitServing {
                head_forward: 0.1,
                head_backward: 0.2,
                server_step_s: 0.05,
                lanes,
                in_turn,
            },
            inner: Counting::default(),
            computed_at: Vec::new(),
        };
        // Uploads of the head update go at 8 Mbit/s too: 250 kB in 0.25 s.
        let mut engine = Engine::new(coordinator, fleet, vec![10; 2], workload);
        let first = engine
            .next_aggregation(Timestamp::from_secs_f64(100.0))
            .unwrap()
            .unwrap();
        (first, engine.stats(), engine.workload().computed_at.len())
    }

    #[test]
    fn split_steps_cross_the_links_and_queue_for_the_server() {
        let close = |a: Timestamp, b: f64| (a.as_secs_f64() - b).abs() < 20e-6;
        // One task: 1 s download, 3 × (0.01 fwd + 0.001 up + 0.05 server + 0.001 down) + 3 × 0.02
        // backward, 0.25 s upload.
        let alone = 1.0 + 3.0 * 0.062 + 3.0 * 0.02 + 0.25;
        let (parallel, stats, computed) = split_round(2, false);
        assert!(close(parallel.time, alone), "{:?} vs {alone}", parallel.time);
        assert_eq!(parallel.updates, 2);
        assert_eq!(computed, 2);
        // Step messages are counted both ways, with the head download and upload.
        assert_eq!(stats.bytes_up, 2 * (3 * 1000 + 250_000));
        assert_eq!(stats.bytes_down, 2 * (1_000_000 + 3 * 1000));
        // One lane: the second device's steps wait for the first's.
        let (one_lane, _, _) = split_round(1, false);
        assert!(one_lane.time.as_secs_f64() > alone + 0.04, "{:?}", one_lane.time);
        // In turn (SplitFed V2): the second task starts its steps when the first has had its
        // last gradient: 3 × 0.062 + 2 × 0.02 later.
        let (in_turn, _, computed) = split_round(4, true);
        assert!(
            close(in_turn.time, alone + 3.0 * 0.062 + 2.0 * 0.02),
            "{:?}",
            in_turn.time
        );
        assert_eq!(computed, 2);
    }

    fn sync_fedavg(clients: usize) -> Coordinator {
        let cfg = AlgorithmConfig::new(
            RuleConfig::FedAvg { server_lr: 1.0 },
            SchedulerConfig::Sync(SyncConfig {
                clients_per_round: Some(clients),
                ..SyncConfig::default()
            }),
        );
        cfg.build(0).unwrap().1
    }

    #[test]
    fn a_synchronous_round_lasts_as_long_as_its_slowest_device() {
        // 1 MB down at 8 Mbit/s = 1 s; 10 steps × step time; 0.25 MB up at 2 Mbit/s = 1 s.
        let cfg = FleetConfig {
            compute: ComputeSpec::Fedfix { x: 50.0 },
            down: LinkSpec::Constant { mbit_s: 8.0 },
            up: LinkSpec::Constant { mbit_s: 2.0 },
            ..FleetConfig::default()
        };
        let fleet = cfg.build(3, 0.1, None, 0).unwrap();
        let mut engine = Engine::new(sync_fedavg(3), fleet, vec![10; 3], Counting::default());
        let first = engine
            .next_aggregation(Timestamp::from_secs_f64(100.0))
            .unwrap()
            .unwrap();
        // Slowest device: 0.1 s per step × 10 steps (the default local_steps).
        assert_eq!(first.time, Timestamp::from_secs_f64(1.0 + 1.0 + 1.0));
        assert_eq!(first.updates, 3);
        assert_eq!(first.staleness_max, 0);
        let second = engine
            .next_aggregation(Timestamp::from_secs_f64(100.0))
            .unwrap()
            .unwrap();
        assert_eq!(second.time, Timestamp::from_secs_f64(6.0));
        let s = engine.stats();
        assert_eq!((s.bytes_down, s.bytes_up), (6_000_000, 1_500_000));
        assert_eq!(engine.workload().folded, 6);
    }

    #[test]
    fn charged_aggregation_delays_each_version_and_the_next_downloads() {
        use crate::server::AggregationModel;
        use shoal_aggregators::hierarchy::CostModel;
        let cfg = FleetConfig {
            compute: ComputeSpec::Homogeneous,
            down: LinkSpec::Constant { mbit_s: 8.0 },
            up: LinkSpec::Constant { mbit_s: 2.0 },
            ..FleetConfig::default()
        };
        let fleet = cfg.build(3, 0.1, None, 0).unwrap();
        // Folds and merges of 0.5 s each on two leaves.
        let server = AggregationModel {
            max_leaves: 2,
            leaves_per_middle: 4,
            memory_mb: 1 << 24,
            cost: CostModel {
                fold_ns_per_value: 1.0,
                merge_ns_per_value: 1.0,
                alloc_ns_per_value: 0.0,
                spawn_us: 0.0,
            },
        };
        let mut engine = Engine::new(sync_fedavg(3), fleet, vec![10; 3], Counting::default())
            .charge_aggregation(server.timeline(500_000_000));
        let until = Timestamp::from_secs_f64(100.0);
        let first = engine.next_aggregation(until).unwrap().unwrap();
        // All three arrive at 3 s: two fold at once, the third after (4 s), then one merge.
        assert_eq!(first.time, Timestamp::from_secs_f64(4.5));
        let second = engine.next_aggregation(until).unwrap().unwrap();
        // The next round's downloads leave at 4.5 s: 3 s of round, then the same 1.5 s.
        assert_eq!(second.time, Timestamp::from_secs_f64(9.0));
        let stats = engine.aggregation_stats().unwrap();
        assert_eq!((stats.folds, stats.aggregations, stats.max_leaves), (6, 2, 2));
        assert!((stats.aggregation_s - 3.0).abs() < 1e-9);
        assert!((stats.queue_wait_s - 1.0).abs() < 1e-9);
    }

    #[test]
    fn dropouts_fail_tasks_and_nothing_is_folded_twice() {
        let cfg = FleetConfig {
            compute: ComputeSpec::Lognormal { sigma: 0.5 },
            dropout: 0.3,
            jitter: 0.2,
            ..FleetConfig::default()
        };
        let fleet = cfg.build(20, 0.01, None, 3).unwrap();
        let coordinator = {
            let cfg = AlgorithmConfig {
                evict_after_failures: 0,
                ..AlgorithmConfig::new(
                    RuleConfig::FedAvg { server_lr: 1.0 },
                    SchedulerConfig::Sync(SyncConfig {
                        clients_per_round: Some(5),
                        ..SyncConfig::default()
                    }),
                )
            };
            cfg.build(0).unwrap().1
        };
        let mut engine = Engine::new(coordinator, fleet, vec![10; 20], Counting::default());
        let mut rounds = 0;
        while let Some(a) = engine.next_aggregation(Timestamp::from_secs_f64(1e6)).unwrap() {
            assert!(a.updates >= 1);
            rounds += 1;
            if rounds == 50 {
                break;
            }
        }
        let s = engine.stats();
        assert_eq!(rounds, 50);
        assert!(s.tasks_dropped > 0, "{s:?}");
        assert_eq!(
            s.folds + s.discards,
            s.tasks_delivered - engine.coordinator().held_updates() as u64
        );
        assert_eq!(engine.workload().folded, s.folds);
    }
}
