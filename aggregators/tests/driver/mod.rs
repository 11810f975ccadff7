//! A small deterministic driver of the Coordinator for tests: a discrete-event loop over integer
//! microseconds in which client `i` needs `step_time(i, job) × local_steps` per task. With a problem
//! attached, clients really train (least squares) and the server really folds and applies; without
//! one, only metadata flows (systems-only), for long scheduler runs.
//!
//! The driver checks the Coordinator's accounting on every command: a task goes to an idle,
//! registered client; every accepted update is folded or discarded exactly once; every fold is
//! counted by the next aggregation; versions advance by one.

#![allow(dead_code)]

use shoal_aggregators::problems::{LeastSquaresOracle, LeastSquaresProblem};
use shoal_aggregators::{
    Accumulator, Algorithm, AlgorithmConfig, ApplyContext, ClientState, Command, Coordinator, Event,
    ServerState, Upload,
};
use shoal_core::{ClientId, IdentityCompressor, ModelVersion, TaskId, Timestamp, UpdateMeta};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// Per-step time of client `i` on its `job`-th task, in microseconds.
pub type StepTime = Box<dyn FnMut(usize, u64) -> u64>;

/// Real training on a least-squares problem.
pub struct Training {
    pub algorithm: Algorithm,
    pub state: ServerState,
    acc: Accumulator,
    /// Every client's persistent state (what it would keep on its device).
    pub clients: Vec<ClientState>,
    oracles: Vec<LeastSquaresOracle>,
    /// Each trained task's upload, with its client and the state the client keeps once the
    /// update is folded (a discarded or lost task leaves the client's state as it was).
    held: BTreeMap<TaskId, (Upload, usize, ClientState)>,
    /// The server state after every aggregation, with the number of updates it folded.
    pub history: Vec<(ServerState, usize)>,
}

/// What the driver saw.
#[derive(Debug, Default)]
pub struct Log {
    /// Every command batch, with the time and the event that produced it.
    pub batches: Vec<(Timestamp, Event, Vec<Command>)>,
    /// Fold weight and staleness per task.
    pub folds: BTreeMap<TaskId, (ClientId, f64, u64)>,
    /// Local steps per task assigned.
    pub trains: BTreeMap<TaskId, (ClientId, ModelVersion, u32, Timestamp)>,
    pub discards: BTreeSet<TaskId>,
    pub arrivals: BTreeSet<TaskId>,
    pub aggregations: Vec<(Timestamp, ModelVersion, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Pending {
    /// A task's update arrives (or the task fails, if `fails`).
    Finish { task: TaskId, fails: bool },
    /// A requested wake-up.
    Wake,
}

pub struct Driver {
    pub config: AlgorithmConfig,
    pub coordinator: Coordinator,
    pub training: Option<Training>,
    pub log: Log,
    step_time: StepTime,
    /// Probability-free failure pattern: job numbers (per client) that fail.
    failing: Box<dyn FnMut(usize, u64) -> bool>,
    samples: Vec<u64>,
    /// The run's seed, which task seeds derive from.
    seed: u64,
    jobs: Vec<u64>,
    queue: BinaryHeap<Reverse<(Timestamp, u8, u64, Pending)>>,
    seq: u64,
    now: Timestamp,
    running: BTreeMap<TaskId, (ClientId, ModelVersion, u32, Timestamp)>,
    cancelled: BTreeSet<TaskId>,
    held: BTreeSet<TaskId>,
    pending_folds: usize,
    registered: BTreeSet<ClientId>,
}

impl Driver {
    /// A driver for `samples.len()` clients with the given sample counts.
    pub fn new(config: AlgorithmConfig, seed: u64, samples: Vec<u64>, step_time: StepTime) -> Self {
        let (_, coordinator) = config.build(seed).expect("test configurations are valid");
        let n = samples.len();
        Self {
            config,
            coordinator,
            training: None,
            log: Log::default(),
            step_time,
            failing: Box::new(|_, _| false),
            samples,
            seed,
            jobs: vec![0; n],
            queue: BinaryHeap::new(),
            seq: 0,
            now: Timestamp::ZERO,
            running: BTreeMap::new(),
            cancelled: BTreeSet::new(),
            held: BTreeSet::new(),
            pending_folds: 0,
            registered: BTreeSet::new(),
        }
    }

    /// Attaches real training on `problem` (full-batch oracles) from the zero model.
    pub fn with_training(mut self, problem: &LeastSquaresProblem) -> Self {
        let (algorithm, _) = self.config.build(0).expect("valid");
        let dim = problem.dim();
        let n = self.samples.len();
        self.training = Some(Training {
            state: algorithm.server.init_state(vec![0.0; dim]),
            acc: algorithm.server.accumulator(dim),
            algorithm,
            clients: vec![ClientState::default(); n],
            oracles: (0..n).map(|i| problem.full_batch_oracle(i)).collect(),
            held: BTreeMap::new(),
            history: Vec::new(),
        });
        self
    }

    /// Makes `failing(client, job)` tasks fail instead of delivering.
    pub fn with_failures(mut self, failing: impl FnMut(usize, u64) -> bool + 'static) -> Self {
        self.failing = Box::new(failing);
        self
    }

    fn push(&mut self, at: Timestamp, pending: Pending) {
        // Client events sort before timers at the same instant.
        let class = match pending {
            Pending::Finish { .. } => 0,
            Pending::Wake => 1,
        };
        self.seq += 1;
        self.queue.push(Reverse((at, class, self.seq, pending)));
    }

    /// Registers every client at time 0.
    pub fn join_all(&mut self) {
        for i in 0..self.samples.len() {
            self.join(i);
        }
    }

    pub fn join(&mut self, i: usize) {
        let event = Event::Joined {
            client: ClientId(i as u64),
            num_samples: self.samples[i],
        };
        self.registered.insert(ClientId(i as u64));
        self.deliver(event);
    }

    pub fn leave(&mut self, i: usize) {
        let client = ClientId(i as u64);
        self.registered.remove(&client);
        // Its running task is lost with it.
        self.running.retain(|_, r| r.0 != client);
        self.deliver(Event::Left {
            client: ClientId(i as u64),
        });
    }

    /// Hands `event` to the Coordinator at the current time and carries out its commands.
    pub fn deliver(&mut self, event: Event) -> Vec<Command> {
        let commands = self
            .coordinator
            .handle(self.now, event.clone())
            .unwrap_or_else(|e| panic!("the coordinator refused {event:?}: {e}"));
        for command in &commands {
            self.carry_out(command);
        }
        self.log.batches.push((self.now, event, commands.clone()));
        commands
    }

    fn carry_out(&mut self, command: &Command) {
        match *command {
            Command::Train {
                client,
                task,
                version,
                local_steps,
                seed,
            } => {
                assert!(
                    self.registered.contains(&client),
                    "{task} for unregistered {client}"
                );
                assert!(
                    !self.running.values().any(|r| r.0 == client),
                    "{client} given {task} while busy"
                );
                assert_eq!(
                    version,
                    self.coordinator.version(),
                    "tasks go out on the current version"
                );
                let i = client.0 as usize;
                let job = self.jobs[i];
                self.jobs[i] += 1;
                // A task's seed depends on its client and that client's task count alone, never on
                // the order in which other clients' updates arrived.
                assert_eq!(
                    seed,
                    shoal_aggregators::task_seed(self.seed, client, job),
                    "{task}, the task {job} of {client}, has another seed"
                );
                let per_step = (self.step_time)(i, job);
                let finish = self.now.after_micros(per_step * u64::from(local_steps));
                let fails = (self.failing)(i, job);
                if let Some(t) = self.training.as_mut()
                    && !fails
                {
                    let task_spec = self.config.local_task(local_steps);
                    let mut next = t.clients[i].clone();
                    let upload = t
                        .algorithm
                        .client
                        .train(
                            &task_spec,
                            &t.state.broadcast(),
                            &mut next,
                            &mut t.oracles[i],
                            &mut IdentityCompressor,
                        )
                        .expect("local training succeeds");
                    t.held.insert(task, (upload, i, next));
                }
                self.running
                    .insert(task, (client, version, local_steps, self.now));
                self.log
                    .trains
                    .insert(task, (client, version, local_steps, self.now));
                self.push(finish, Pending::Finish { task, fails });
            }
            Command::Fold {
                task,
                client,
                weight,
                staleness,
            } => {
                assert!(
                    self.held.remove(&task),
                    "{task} folded but not held (twice, or never arrived)"
                );
                assert!(weight.is_finite() && weight >= 0.0, "weight {weight}");
                self.log.folds.insert(task, (client, weight, staleness));
                self.pending_folds += 1;
                if let Some(t) = self.training.as_mut() {
                    let (upload, i, next) = t.held.remove(&task).expect("uploads are held until folded");
                    t.clients[i] = next;
                    t.algorithm
                        .server
                        .fold(&mut t.acc, &upload.views(), weight)
                        .expect("uploads fold");
                }
            }
            Command::Discard { task, .. } => {
                assert!(self.held.remove(&task), "{task} discarded but not held");
                self.log.discards.insert(task);
                if let Some(t) = self.training.as_mut() {
                    t.held.remove(&task);
                }
            }
            Command::Aggregate {
                version,
                updates,
                num_clients,
                previous_num_clients,
            } => {
                assert_eq!(
                    updates, self.pending_folds,
                    "an aggregation counts exactly the folds before it"
                );
                self.pending_folds = 0;
                assert_eq!(version, self.coordinator.version());
                self.log.aggregations.push((self.now, version, updates));
                if let Some(t) = self.training.as_mut() {
                    let ctx = ApplyContext {
                        num_clients,
                        previous_num_clients,
                        task: self.config.local_task(self.config.local_steps),
                    };
                    t.algorithm
                        .server
                        .apply(&mut t.state, &t.acc, &ctx)
                        .expect("apply succeeds");
                    t.acc.reset();
                    t.history.push((t.state.clone(), updates));
                }
            }
            Command::WakeAt(at) => self.push(at, Pending::Wake),
            Command::Cancel { task, .. } => {
                assert!(
                    self.running.remove(&task).is_some(),
                    "{task} cancelled but not running"
                );
                self.cancelled.insert(task);
                if let Some(t) = self.training.as_mut() {
                    t.held.remove(&task);
                }
            }
            Command::Evict { client, .. } => {
                self.registered.remove(&client);
            }
        }
    }

    /// Runs events until virtual time `until` or until `aggregations` aggregations happened.
    pub fn run(&mut self, until: Timestamp, aggregations: usize) {
        while self.log.aggregations.len() < aggregations {
            let Some(Reverse((at, _, _, pending))) = self.queue.pop() else {
                break;
            };
            if at > until {
                self.queue.push(Reverse((at, 0, 0, pending)));
                break;
            }
            assert!(at >= self.now);
            self.now = at;
            match pending {
                Pending::Wake => {
                    self.deliver(Event::Timer);
                }
                Pending::Finish { task, fails } => {
                    if self.cancelled.remove(&task) {
                        continue;
                    }
                    let Some((client, version, local_steps, started)) = self.running.remove(&task) else {
                        continue; // lost with a client that left
                    };
                    if fails {
                        self.deliver(Event::TaskFailed { task });
                        continue;
                    }
                    let i = client.0 as usize;
                    let meta = UpdateMeta {
                        client,
                        task,
                        base_version: version,
                        num_samples: self.samples[i],
                        local_steps,
                        loss: 0.0,
                        duration_s: self.now.micros_since(started) as f64 * 1e-6,
                    };
                    self.held.insert(task);
                    self.log.arrivals.insert(task);
                    self.deliver(Event::UpdateArrived(meta));
                }
            }
        }
    }

    /// The driver's clock.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Updates accepted and not yet folded or discarded.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Checks that every accepted update was folded or discarded exactly once, or is still held.
    pub fn assert_exactly_once(&self) {
        for task in &self.log.arrivals {
            let folded = self.log.folds.contains_key(task);
            let discarded = self.log.discards.contains(task);
            let held = self.held.contains(task);
            assert_eq!(
                u8::from(folded) + u8::from(discarded) + u8::from(held),
                1,
                "{task}: folded {folded}, discarded {discarded}, held {held}"
            );
        }
        assert_eq!(self.coordinator.held_updates(), self.held.len());
        let stats = self.coordinator.stats();
        assert_eq!(stats.folded as usize, self.log.folds.len());
        assert_eq!(stats.arrived as usize, self.log.arrivals.len());
    }
}
