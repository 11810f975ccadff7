//! The serverless aggregation runtime (ALGORITHMS.md §6, LIFL): aggregation functions on a pool of
//! long-lived worker threads, invoked per event, elastic, arranged per aggregation as a
//! leaf → middle → top tree.
//!
//! - An **instance** is a worker thread waiting on its own job queue. Per aggregation it takes a
//!   role: a *leaf* owns a model-sized f64 [`Accumulator`] and folds each upload sent to it as it
//!   arrives (eagerly; `mode = "lazy"` keeps the uploads and folds them when the aggregation
//!   closes); a *middle* merges its leaves' partial sums as they come; the *top* merges the middles
//!   and hands the sums to the caller, which applies the server rule. Uploads travel as
//!   [`SharedUpload`] (`Arc`), decoded once and never copied; partial accumulators move between
//!   stages by ownership, and the first partial a node receives is adopted rather than added.
//! - The **pool** keeps finished instances warm for `keep_alive_s` and reuses them for any role in
//!   later aggregations; only when none is idle does it spawn one (a cold start: thread spawn plus
//!   allocating and faulting in the accumulator, both counted and timed). An instance idle past its
//!   keep-alive retires, and its accumulator memory is released with it.
//! - **Elasticity**: [`Runtime::begin`] plans the tree with [`shoal_aggregators::hierarchy::plan`]
//!   from the expected number of updates, the arrival rate measured in the last aggregation and the
//!   measured fold cost (`⌈U/k⌉`, `⌈r·a⌉`, bounded by `max_leaves` and `memory_mb`). While updates
//!   arrive, a leaf joins when every leaf has `scale_up_queue` updates waiting — a burst the plan
//!   did not foresee.
//!
//! The runtime knows nothing of the method: it folds with the rule's `fold`, so every rule of
//! Shoal runs on it unchanged. It is the engine's [`FoldExecutor`] for fl-server: the engine's
//! server core decides what is folded with which weight and applies the merged sums; the runtime
//! decides only on which threads the folds run.

use serde::{Deserialize, Serialize};
use shoal_aggregators::hierarchy::{CostModel, Demand, PlanLimits, TreePlan, plan};
use shoal_aggregators::{Accumulator, FoldError, RuleError, ServerRule};
use shoal_core::TaskId;
use shoal_engine::{ExecutorError, FoldExecutor, OpenFolds};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;

pub use shoal_engine::SharedUpload;

/// When a leaf folds what it is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FoldMode {
    /// As each upload arrives, overlapping aggregation with the arrival tail.
    #[default]
    Eager,
    /// All at once when the aggregation closes (for rules that must see every upload together).
    Lazy,
}

/// The `[runtime]` table of `server.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// `eager` (default) or `lazy`.
    #[serde(default)]
    pub mode: FoldMode,
    /// Most leaves folding at once; 0: the cores of this machine.
    #[serde(default)]
    pub max_leaves: usize,
    /// Memory the leaves' accumulators may take (MiB).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Updates one leaf is planned to fold (`k`).
    #[serde(default = "default_fan_in")]
    pub fan_in: usize,
    /// Leaves whose partial sums one middle merges.
    #[serde(default = "default_leaves_per_middle")]
    pub leaves_per_middle: usize,
    /// How long a finished instance stays warm before it retires (s).
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: f64,
    /// A leaf joins an aggregation when every leaf has this many updates waiting.
    #[serde(default = "default_scale_up_queue")]
    pub scale_up_queue: usize,
}

fn default_memory_mb() -> u64 {
    2048
}
fn default_fan_in() -> usize {
    32
}
fn default_leaves_per_middle() -> usize {
    4
}
fn default_keep_alive_s() -> f64 {
    60.0
}
fn default_scale_up_queue() -> usize {
    2
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            mode: FoldMode::Eager,
            max_leaves: 0,
            memory_mb: default_memory_mb(),
            fan_in: default_fan_in(),
            leaves_per_middle: default_leaves_per_middle(),
            keep_alive_s: default_keep_alive_s(),
            scale_up_queue: default_scale_up_queue(),
        }
    }
}

impl RuntimeConfig {
    /// Checks the values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        self.limits().check()?;
        if !(self.keep_alive_s.is_finite() && (0.0..=crate::config::MAX_SECONDS).contains(&self.keep_alive_s))
        {
            return Err(format!(
                "keep_alive_s = {} must be between 0 and {} s",
                self.keep_alive_s,
                crate::config::MAX_SECONDS
            ));
        }
        if self.memory_mb == 0 {
            return Err("memory_mb must be at least 1 (the leaves' accumulators need memory)".into());
        }
        if self.scale_up_queue == 0 {
            return Err("scale_up_queue must be at least 1".into());
        }
        Ok(())
    }

    /// The planner's limits: `max_leaves` resolved against this machine's cores.
    pub fn limits(&self) -> PlanLimits {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        PlanLimits {
            max_leaves: if self.max_leaves == 0 {
                cores
            } else {
                self.max_leaves
            },
            memory_bytes: self.memory_mb.saturating_mul(1 << 20),
            fan_in: self.fan_in,
            leaves_per_middle: self.leaves_per_middle,
        }
    }
}

/// Why an aggregation failed.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The rule refused an upload.
    #[error("folding update {tag}: {source}")]
    Fold {
        /// The caller's tag of the upload.
        tag: u64,
        /// Why.
        source: RuleError,
    },
    /// Partial sums of different shapes met (a bug, never a peer's doing).
    #[error("merging partial sums: {0}")]
    Merge(#[from] FoldError),
    /// A worker could not be started.
    #[error("starting an aggregation worker: {0}")]
    Spawn(std::io::Error),
    /// A worker went away in the middle of an aggregation.
    #[error("an aggregation worker stopped before it answered")]
    WorkerLost,
}

/// A role of an instance in one aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leaf,
    Middle,
    Top,
}

/// Where a node sends its partial sums when it closes.
enum Parent {
    Node(Sender<Job>),
    Caller(Sender<Partial>),
    /// The aggregation was abandoned: the sums go back to the pool.
    Discard,
}

/// A partial sum moving up the tree, with the first error met below.
struct Partial {
    acc: Accumulator,
    error: Option<RuntimeError>,
}

enum Job {
    Start {
        role: Role,
        rule: Arc<dyn ServerRule>,
        parts: usize,
        dim: usize,
        mode: FoldMode,
    },
    Fold {
        tag: u64,
        upload: SharedUpload,
        weight: f64,
        sent: Instant,
    },
    Partial(Partial),
    /// A partial aggregate from elsewhere (a leaf fl-server), merged into a leaf like an update.
    Absorb {
        tag: u64,
        sums: Accumulator,
    },
    Close {
        children: usize,
        parent: Parent,
    },
}

/// Counters of the pool (monotone) and gauges (current).
#[derive(Default)]
struct Counters {
    invocations: AtomicU64,
    folds: AtomicU64,
    merges: AtomicU64,
    cold_starts: AtomicU64,
    warm_reuses: AtomicU64,
    retired: AtomicU64,
    buffers_allocated: AtomicU64,
    cold_start_ns: AtomicU64,
    fold_ns: AtomicU64,
    folded_values: AtomicU64,
    merge_ns: AtomicU64,
    merged_values: AtomicU64,
    alloc_ns: AtomicU64,
    allocated_values: AtomicU64,
    queue_wait_ns: AtomicU64,
    queued: AtomicUsize,
    max_queued: AtomicUsize,
    aggregations: AtomicU64,
}

struct Idle {
    id: u64,
    jobs: Sender<Job>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Idle>,
    live: usize,
    next_id: u64,
    /// Warm accumulators: (buffer, holds sums that must be zeroed before reuse).
    stash: Vec<(Accumulator, bool)>,
    roles: [usize; 3],
    /// Arrivals per second measured in the last aggregation with two or more updates.
    arrival_rate: f64,
    last: Option<AggregationFigures>,
}

struct Shared {
    config: RuntimeConfig,
    limits: PlanLimits,
    keep_alive: Duration,
    state: Mutex<PoolState>,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A worker that panicked while holding the lock left counts, not broken sums: go on.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// An accumulator of this shape: a warm one from the stash (zeroed if used), else a new one
    /// faulted in now (a cold allocation, timed).
    fn take_buffer(&self, parts: usize, dim: usize) -> Accumulator {
        let found = {
            let mut state = self.lock();
            let at = state
                .stash
                .iter()
                .position(|(acc, _)| acc.parts() == parts && acc.dim() == dim);
            at.map(|i| state.stash.swap_remove(i))
        };
        match found {
            Some((mut acc, dirty)) => {
                if dirty {
                    acc.reset();
                }
                acc
            }
            None => {
                let started = Instant::now();
                let mut acc = Accumulator::new(parts, dim);
                // Touch every page now so the first fold does not pay for it.
                acc.reset();
                let took = nanos(started.elapsed());
                self.count(&self.counters.buffers_allocated, 1);
                self.count(&self.counters.cold_start_ns, took);
                self.count(&self.counters.alloc_ns, took);
                self.count(&self.counters.allocated_values, (parts * dim) as u64);
                acc
            }
        }
    }

    fn give_buffer(&self, acc: Accumulator) {
        self.lock().stash.push((acc, true));
    }

    /// An instance for `first`: an idle one when there is one (warm), else a new thread (cold).
    fn acquire(self: &Arc<Self>, first: Job) -> Result<Sender<Job>, RuntimeError> {
        let (id, warm) = {
            let mut state = self.lock();
            if let Some(Idle { id, jobs }) = state.idle.pop() {
                (id, Some(jobs))
            } else {
                state.live += 1;
                state.next_id += 1;
                (state.next_id, None)
            }
        };
        if let Some(jobs) = warm {
            self.count(&self.counters.warm_reuses, 1);
            // An idle instance leaves the idle list only under the lock, so it is still listening.
            jobs.send(first).map_err(|_| RuntimeError::WorkerLost)?;
            return Ok(jobs);
        }
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let shared = self.clone();
        let own = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fl-aggregate-{id}"))
            .spawn(move || instance(shared, id, rx, own, first));
        if let Err(e) = spawned {
            self.lock().live -= 1;
            return Err(RuntimeError::Spawn(e));
        }
        self.count(&self.counters.cold_starts, 1);
        self.count(&self.counters.cold_start_ns, nanos(started.elapsed()));
        tracing::debug!(instance = id, "aggregation instance started (cold)");
        Ok(tx)
    }

    /// An instance whose keep-alive ran out: it retires unless it was just taken for new work.
    fn retire(&self, id: u64) -> bool {
        let mut state = self.lock();
        let Some(at) = state.idle.iter().position(|i| i.id == id) else {
            return false;
        };
        state.idle.swap_remove(at);
        state.live -= 1;
        // Its share of warm memory goes with it.
        if state.stash.len() > state.live {
            state.stash.pop();
        }
        self.count(&self.counters.retired, 1);
        tracing::debug!(instance = id, "aggregation instance retired after its keep-alive");
        true
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What one node of a tree holds while its aggregation runs.
struct Node {
    role: Role,
    rule: Arc<dyn ServerRule>,
    mode: FoldMode,
    acc: Option<Accumulator>,
    waiting: Vec<(u64, SharedUpload, f64)>,
    received: usize,
    close: Option<(usize, Parent)>,
    error: Option<RuntimeError>,
}

impl Node {
    #[expect(
        clippy::disallowed_methods,
        reason = "a leaf is the engine's fold executor: it runs the rule's fold on its worker thread"
    )]
    fn fold(&mut self, shared: &Shared, tag: u64, upload: &[Vec<f32>], weight: f64) {
        let started = Instant::now();
        let views: Vec<&[f32]> = upload.iter().map(Vec::as_slice).collect();
        if let Some(acc) = self.acc.as_mut()
            && let Err(source) = self.rule.fold(acc, &views, weight)
        {
            self.error.get_or_insert(RuntimeError::Fold { tag, source });
        }
        let c = &shared.counters;
        shared.count(&c.fold_ns, nanos(started.elapsed()));
        shared.count(&c.folded_values, upload.iter().map(|v| v.len() as u64).sum());
        shared.count(&c.folds, 1);
        shared.count(&c.invocations, 1);
        c.queued.fetch_sub(1, Ordering::Relaxed);
    }

    fn merge(&mut self, shared: &Shared, partial: Partial) {
        if let Some(e) = partial.error {
            self.error.get_or_insert(e);
        }
        match self.acc.as_mut() {
            None => self.acc = Some(partial.acc),
            Some(acc) => {
                let started = Instant::now();
                if let Err(e) = acc.merge(&partial.acc) {
                    self.error.get_or_insert(e.into());
                }
                let c = &shared.counters;
                shared.count(&c.merge_ns, nanos(started.elapsed()));
                shared.count(&c.merged_values, (acc.parts() * acc.dim()) as u64);
                shared.count(&c.merges, 1);
                shared.give_buffer(partial.acc);
            }
        }
        shared.count(&shared.counters.invocations, 1);
        self.received += 1;
    }

    /// Merges a partial aggregate that arrived as an input (not from a child of the tree).
    fn absorb(&mut self, shared: &Shared, tag: u64, sums: Accumulator) {
        let started = Instant::now();
        if let Some(acc) = self.acc.as_mut()
            && let Err(e) = acc.merge(&sums)
        {
            self.error.get_or_insert(RuntimeError::Fold {
                tag,
                source: RuleError::Fold(e),
            });
        }
        let c = &shared.counters;
        shared.count(&c.merge_ns, nanos(started.elapsed()));
        shared.count(&c.merged_values, (sums.parts() * sums.dim()) as u64);
        shared.count(&c.merges, 1);
        shared.count(&c.invocations, 1);
        c.queued.fetch_sub(1, Ordering::Relaxed);
        shared.give_buffer(sums);
    }

    /// All inputs are in: the sums and the first error, and where they go.
    fn closed(&mut self) -> Option<(Partial, Parent)> {
        let children = self.close.as_ref()?.0;
        if self.received < children {
            return None;
        }
        let (_, parent) = self.close.take()?;
        let acc = self.acc.take()?;
        Some((
            Partial {
                acc,
                error: self.error.take(),
            },
            parent,
        ))
    }
}

/// The body of an instance thread: one node per aggregation, then idle until the next or until its
/// keep-alive runs out.
fn instance(shared: Arc<Shared>, id: u64, jobs: Receiver<Job>, own: Sender<Job>, first: Job) {
    let mut node: Option<Node> = None;
    let mut next = Some(first);
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match jobs.recv_timeout(shared.keep_alive) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) if node.is_none() => {
                    if shared.retire(id) {
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        match job {
            Job::Start {
                role,
                rule,
                parts,
                dim,
                mode,
            } => {
                let acc = (role == Role::Leaf).then(|| shared.take_buffer(parts, dim));
                shared.lock().roles[role as usize] += 1;
                node = Some(Node {
                    role,
                    rule,
                    mode,
                    acc,
                    waiting: Vec::new(),
                    received: 0,
                    close: None,
                    error: None,
                });
            }
            Job::Fold {
                tag,
                upload,
                weight,
                sent,
            } => {
                let Some(n) = node.as_mut() else { continue };
                shared.count(&shared.counters.queue_wait_ns, nanos(sent.elapsed()));
                match n.mode {
                    FoldMode::Eager => n.fold(&shared, tag, &upload, weight),
                    FoldMode::Lazy => n.waiting.push((tag, upload, weight)),
                }
            }
            Job::Partial(partial) => {
                if let Some(n) = node.as_mut() {
                    n.merge(&shared, partial);
                }
            }
            Job::Absorb { tag, sums } => {
                if let Some(n) = node.as_mut() {
                    n.absorb(&shared, tag, sums);
                }
            }
            Job::Close { children, parent } => {
                let Some(n) = node.as_mut() else { continue };
                for (tag, upload, weight) in std::mem::take(&mut n.waiting) {
                    n.fold(&shared, tag, &upload, weight);
                }
                n.close = Some((children, parent));
            }
        }
        let Some(n) = node.as_mut() else { continue };
        let Some((partial, parent)) = n.closed() else {
            continue;
        };
        // Idle before the sums move up, so that when the caller has the result every instance of
        // the tree is back in the pool.
        {
            let mut state = shared.lock();
            state.roles[n.role as usize] -= 1;
            state.idle.push(Idle {
                id,
                jobs: own.clone(),
            });
        }
        node = None;
        let undelivered = match parent {
            Parent::Node(up) => match up.send(Job::Partial(partial)) {
                Err(mpsc::SendError(Job::Partial(p))) => Some(p.acc),
                _ => None,
            },
            Parent::Caller(up) => up.send(partial).err().map(|e| e.0.acc),
            Parent::Discard => Some(partial.acc),
        };
        if let Some(acc) = undelivered {
            shared.give_buffer(acc);
        }
    }
}

/// Figures of one finished aggregation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AggregationFigures {
    /// Updates folded.
    pub updates: u64,
    /// Leaves, middles of the final tree.
    pub leaves: usize,
    /// Middles of the final tree.
    pub middles: usize,
    /// Leaves the plan started with (the rest joined as updates queued).
    pub planned_leaves: usize,
    /// From the last update's submission to the merged sums (s): what the eager runtime leaves
    /// after the arrivals.
    pub after_last_arrival_s: f64,
    /// From `finish` to the merged sums (s).
    pub finish_s: f64,
}

/// A snapshot of the runtime's figures (admin status, metrics, summaries).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeStats {
    /// Function invocations: folds plus merges.
    pub invocations: u64,
    /// Uploads folded.
    pub folds: u64,
    /// Partial sums merged (adoptions of a node's first partial are free and not counted).
    pub merges: u64,
    /// Instances started because none was idle.
    pub cold_starts: u64,
    /// Roles served by an idle instance.
    pub warm_reuses: u64,
    /// Instances retired after their keep-alive.
    pub retired: u64,
    /// Model-sized accumulators allocated.
    pub buffers_allocated: u64,
    /// Time spent in cold starts: spawns and first allocations (s).
    pub cold_start_s: f64,
    /// Instances alive (active or warm).
    pub instances: usize,
    /// Instances warm and idle.
    pub idle: usize,
    /// Instances serving as leaves now.
    pub leaves: usize,
    /// Instances serving as middles now.
    pub middles: usize,
    /// Instances serving as top now.
    pub tops: usize,
    /// Updates waiting for or in a fold now.
    pub queue_depth: usize,
    /// The deepest that queue has been.
    pub max_queue_depth: usize,
    /// Mean time of one fold (s).
    pub fold_mean_s: f64,
    /// Mean time an update waited in a leaf's queue (s).
    pub queue_wait_mean_s: f64,
    /// Aggregations finished.
    pub aggregations: u64,
    /// The last one.
    pub last: Option<AggregationFigures>,
}

/// The aggregation runtime: a pool of instances shared by the aggregations of a run.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Runtime {
    /// A runtime with no instances yet; they start on demand.
    pub fn new(config: RuntimeConfig) -> Result<Self, String> {
        config.check()?;
        Ok(Self {
            shared: Arc::new(Shared {
                limits: config.limits(),
                keep_alive: Duration::from_secs_f64(config.keep_alive_s),
                config,
                state: Mutex::new(PoolState::default()),
                counters: Counters::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// The cost model as measured so far: each cost from the work of its kind done, the default
    /// where none was.
    pub fn cost(&self) -> CostModel {
        let c = &self.shared.counters;
        let measured = |ns: &AtomicU64, values: &AtomicU64, default: f64| {
            let values = values.load(Ordering::Relaxed);
            if values == 0 {
                default
            } else {
                ns.load(Ordering::Relaxed) as f64 / values as f64
            }
        };
        let default = CostModel::default();
        CostModel {
            fold_ns_per_value: measured(&c.fold_ns, &c.folded_values, default.fold_ns_per_value),
            merge_ns_per_value: measured(&c.merge_ns, &c.merged_values, default.merge_ns_per_value),
            alloc_ns_per_value: measured(&c.alloc_ns, &c.allocated_values, default.alloc_ns_per_value),
            spawn_us: default.spawn_us,
        }
    }

    /// Opens an aggregation of uploads of `parts` vectors of `dim` values for `rule`, expecting
    /// about `expected` updates: plans its tree and starts its leaves.
    pub fn begin(
        &self,
        rule: Arc<dyn ServerRule>,
        parts: usize,
        dim: usize,
        expected: usize,
    ) -> Result<Aggregation, RuntimeError> {
        let rate = self.shared.lock().arrival_rate;
        let demand = Demand {
            updates: expected,
            arrival_rate: rate,
            values: parts * dim,
        };
        let tree = plan(&demand, &self.shared.limits, &self.cost());
        self.begin_tree(rule, parts, dim, tree)
    }

    /// Opens an aggregation with a given tree (tests and benchmarks choose shapes themselves).
    pub fn begin_tree(
        &self,
        rule: Arc<dyn ServerRule>,
        parts: usize,
        dim: usize,
        tree: TreePlan,
    ) -> Result<Aggregation, RuntimeError> {
        let mut aggregation = Aggregation {
            runtime: self.clone(),
            rule,
            parts,
            dim,
            planned_leaves: tree.leaves(),
            tree: TreePlan { groups: Vec::new() },
            leaves: Vec::new(),
            submitted: 0,
            first_arrival: None,
            last_arrival: None,
            open: true,
        };
        for (middle, &n) in tree.groups.iter().enumerate() {
            for _ in 0..n {
                aggregation.add_leaf(Some(middle))?;
            }
        }
        aggregation.tree = tree;
        Ok(aggregation)
    }

    /// The figures now.
    pub fn stats(&self) -> RuntimeStats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let folds = load(&c.folds);
        let per_fold = |ns: u64| {
            if folds == 0 {
                0.0
            } else {
                ns as f64 * 1e-9 / folds as f64
            }
        };
        let state = self.shared.lock();
        RuntimeStats {
            invocations: load(&c.invocations),
            folds,
            merges: load(&c.merges),
            cold_starts: load(&c.cold_starts),
            warm_reuses: load(&c.warm_reuses),
            retired: load(&c.retired),
            buffers_allocated: load(&c.buffers_allocated),
            cold_start_s: load(&c.cold_start_ns) as f64 * 1e-9,
            instances: state.live,
            idle: state.idle.len(),
            leaves: state.roles[Role::Leaf as usize],
            middles: state.roles[Role::Middle as usize],
            tops: state.roles[Role::Top as usize],
            queue_depth: c.queued.load(Ordering::Relaxed),
            max_queue_depth: c.max_queued.load(Ordering::Relaxed),
            fold_mean_s: per_fold(load(&c.fold_ns)),
            queue_wait_mean_s: per_fold(load(&c.queue_wait_ns)),
            aggregations: load(&c.aggregations),
            last: state.last.clone(),
        }
    }
}

struct Leaf {
    jobs: Sender<Job>,
    middle: usize,
    /// Updates sent to it and not yet folded.
    depth: Arc<AtomicUsize>,
}

/// One aggregation in progress: submit uploads, then [`finish`](Self::finish) for the sums.
pub struct Aggregation {
    runtime: Runtime,
    rule: Arc<dyn ServerRule>,
    parts: usize,
    dim: usize,
    planned_leaves: usize,
    tree: TreePlan,
    leaves: Vec<Leaf>,
    submitted: u64,
    first_arrival: Option<Instant>,
    last_arrival: Option<Instant>,
    open: bool,
}

impl Aggregation {
    /// Leaves now.
    pub fn leaves(&self) -> usize {
        self.leaves.len()
    }

    /// The tree as it stands (it grows while updates queue).
    pub fn tree(&self) -> &TreePlan {
        &self.tree
    }

    fn add_leaf(&mut self, middle: Option<usize>) -> Result<(), RuntimeError> {
        let jobs = self.runtime.shared.acquire(Job::Start {
            role: Role::Leaf,
            rule: self.rule.clone(),
            parts: self.parts,
            dim: self.dim,
            mode: self.runtime.shared.config.mode,
        })?;
        let middle = middle.unwrap_or_else(|| self.tree.grow(self.runtime.shared.limits.leaves_per_middle));
        self.leaves.push(Leaf {
            jobs,
            middle,
            depth: Arc::new(AtomicUsize::new(0)),
        });
        Ok(())
    }

    /// Whether one more leaf is due: every leaf has `scale_up_queue` updates waiting, which is how
    /// arrivals faster than the leaves fold (`r·a` above the leaves there are) show while they come.
    fn wants_leaf(&self) -> bool {
        let shared = &self.runtime.shared;
        self.leaves.len() < shared.limits.leaf_cap(self.parts * self.dim)
            && self
                .leaves
                .iter()
                .all(|l| l.depth.load(Ordering::Relaxed) >= shared.config.scale_up_queue)
    }

    /// Hands an upload to the leaf with the shortest queue, adding a leaf first when the load asks
    /// for one. `tag` names the upload in errors.
    pub fn submit(&mut self, tag: u64, upload: SharedUpload, weight: f64) -> Result<(), RuntimeError> {
        let now = Instant::now();
        self.route(Job::Fold {
            tag,
            upload,
            weight,
            sent: now,
        })
    }

    /// Hands a partial aggregate from elsewhere (a leaf fl-server's sums and total weight) to the
    /// leaf with the shortest queue, which merges it as it comes.
    pub fn absorb(&mut self, tag: u64, sums: Accumulator) -> Result<(), RuntimeError> {
        self.route(Job::Absorb { tag, sums })
    }

    fn route(&mut self, job: Job) -> Result<(), RuntimeError> {
        let now = Instant::now();
        if self.wants_leaf() {
            self.add_leaf(None)?;
        }
        self.first_arrival.get_or_insert(now);
        self.last_arrival = Some(now);
        self.submitted += 1;
        let leaf = self
            .leaves
            .iter()
            .min_by_key(|l| l.depth.load(Ordering::Relaxed))
            .ok_or(RuntimeError::WorkerLost)?;
        leaf.depth.fetch_add(1, Ordering::Relaxed);
        let c = &self.runtime.shared.counters;
        let queued = c.queued.fetch_add(1, Ordering::Relaxed) + 1;
        c.max_queued.fetch_max(queued, Ordering::Relaxed);
        leaf.jobs.send(job).map_err(|_| RuntimeError::WorkerLost)
    }

    /// Closes the aggregation: the leaves finish their queues, the middles and the top (warm
    /// instances when there are, whatever role they served before) merge, and the merged sums come
    /// back for the server rule.
    pub fn finish(mut self) -> Result<Merged, RuntimeError> {
        let started = Instant::now();
        let shared = self.runtime.shared.clone();
        let start = |role| Job::Start {
            role,
            rule: self.rule.clone(),
            parts: self.parts,
            dim: self.dim,
            mode: shared.config.mode,
        };
        let (result_tx, result_rx) = mpsc::channel();
        let top = shared.acquire(start(Role::Top))?;
        let mut middles = Vec::with_capacity(self.tree.middles());
        for _ in 0..self.tree.middles() {
            middles.push(shared.acquire(start(Role::Middle))?);
        }
        let send = |to: &Sender<Job>, job| to.send(job).map_err(|_| RuntimeError::WorkerLost);
        send(
            &top,
            Job::Close {
                children: middles.len(),
                parent: Parent::Caller(result_tx),
            },
        )?;
        for (middle, jobs) in middles.iter().enumerate() {
            send(
                jobs,
                Job::Close {
                    children: self.tree.groups[middle],
                    parent: Parent::Node(top.clone()),
                },
            )?;
        }
        self.open = false;
        for leaf in &self.leaves {
            send(
                &leaf.jobs,
                Job::Close {
                    children: 0,
                    parent: Parent::Node(middles[leaf.middle].clone()),
                },
            )?;
        }
        let partial = result_rx.recv().map_err(|_| RuntimeError::WorkerLost)?;
        let done = Instant::now();
        let figures = AggregationFigures {
            updates: self.submitted,
            leaves: self.leaves.len(),
            middles: self.tree.middles(),
            planned_leaves: self.planned_leaves,
            after_last_arrival_s: self
                .last_arrival
                .map_or(0.0, |t| done.duration_since(t).as_secs_f64()),
            finish_s: done.duration_since(started).as_secs_f64(),
        };
        shared.count(&shared.counters.aggregations, 1);
        {
            let mut state = shared.lock();
            if let (Some(first), Some(last)) = (self.first_arrival, self.last_arrival)
                && self.submitted >= 2
                && last > first
            {
                state.arrival_rate = (self.submitted - 1) as f64 / last.duration_since(first).as_secs_f64();
            }
            state.last = Some(figures);
        }
        let merged = Merged {
            acc: Some(partial.acc),
            shared,
        };
        match partial.error {
            Some(e) => Err(e),
            None => Ok(merged),
        }
    }
}

impl FoldExecutor for Runtime {
    type Open = Aggregation;
    fn open(
        &mut self,
        rule: &Arc<dyn ServerRule>,
        parts: usize,
        dim: usize,
        expected: usize,
    ) -> Result<Aggregation, ExecutorError> {
        let opened = self.begin(rule.clone(), parts, dim, expected)?;
        tracing::debug!(leaves = opened.leaves(), expected, "aggregation opened");
        Ok(opened)
    }
}

impl OpenFolds for Aggregation {
    type Merged = Merged;
    fn submit(&mut self, task: TaskId, upload: SharedUpload, weight: f64) -> Result<(), ExecutorError> {
        Ok(Aggregation::submit(self, task.0, upload, weight)?)
    }
    fn absorb(&mut self, task: TaskId, sums: Accumulator) -> Result<(), ExecutorError> {
        Ok(Aggregation::absorb(self, task.0, sums)?)
    }
    fn finish(self) -> Result<Merged, ExecutorError> {
        Ok(Aggregation::finish(self)?)
    }
}

impl Drop for Aggregation {
    fn drop(&mut self) {
        if self.open {
            // Abandoned: the leaves finish their queues and give their sums back to the pool.
            for leaf in &self.leaves {
                let _ = leaf.jobs.send(Job::Close {
                    children: 0,
                    parent: Parent::Discard,
                });
            }
        }
    }
}

/// The merged sums of a finished aggregation; its memory returns to the pool when dropped.
pub struct Merged {
    acc: Option<Accumulator>,
    shared: Arc<Shared>,
}

impl std::ops::Deref for Merged {
    type Target = Accumulator;
    fn deref(&self) -> &Accumulator {
        self.acc.as_ref().expect("present until dropped")
    }
}

impl Drop for Merged {
    fn drop(&mut self) {
        if let Some(acc) = self.acc.take() {
            self.shared.give_buffer(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use shoal_aggregators::RuleConfig;

    fn rule() -> Arc<dyn ServerRule> {
        RuleConfig::FedAvg { server_lr: 1.0 }.build().unwrap().server
    }

    fn config() -> RuntimeConfig {
        RuntimeConfig {
            max_leaves: 8,
            ..RuntimeConfig::default()
        }
    }

    fn uploads(rng: &mut StdRng, n: usize, dim: usize) -> Vec<(SharedUpload, f64)> {
        (0..n)
            .map(|_| {
                let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                (Arc::from(vec![v]), rng.random_range(1.0..600.0))
            })
            .collect()
    }

    fn flat(updates: &[(SharedUpload, f64)], dim: usize) -> Accumulator {
        let mut acc = Accumulator::new(1, dim);
        for (u, w) in updates {
            acc.fold(&[&u[0]], *w).unwrap();
        }
        acc
    }

    fn assert_same_sums(tree: &Accumulator, flat: &Accumulator) {
        assert_eq!(tree.count(), flat.count());
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-300);
        assert!(rel(tree.total_weight(), flat.total_weight()) < 1e-12);
        let scale = flat.sum(0).iter().fold(0.0f64, |m, s| m.max(s.abs()));
        for (a, b) in tree.sum(0).iter().zip(flat.sum(0)) {
            assert!((a - b).abs() <= 1e-9 * scale, "{a} vs {b}");
        }
    }

    #[test]
    fn random_trees_give_the_flat_sums_in_either_mode() {
        let mut rng = StdRng::seed_from_u64(7);
        for mode in [FoldMode::Eager, FoldMode::Lazy] {
            let runtime = Runtime::new(RuntimeConfig { mode, ..config() }).unwrap();
            for _ in 0..12 {
                let dim = rng.random_range(1..3000);
                let n = rng.random_range(0..40);
                let updates = uploads(&mut rng, n, dim);
                let middles = rng.random_range(1..4);
                let tree = TreePlan {
                    groups: (0..middles).map(|_| rng.random_range(1..4)).collect(),
                };
                let mut agg = runtime.begin_tree(rule(), 1, dim, tree).unwrap();
                for (tag, (u, w)) in updates.iter().enumerate() {
                    agg.submit(tag as u64, u.clone(), *w).unwrap();
                }
                let merged = agg.finish().unwrap();
                assert_same_sums(&merged, &flat(&updates, dim));
            }
        }
    }

    #[test]
    fn a_second_round_with_the_same_plan_starts_no_instance() {
        // Queues never grow the tree here: the plan alone decides.
        let runtime = Runtime::new(RuntimeConfig {
            scale_up_queue: 1000,
            ..config()
        })
        .unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let updates = uploads(&mut rng, 10, 100);
        let tree = TreePlan { groups: vec![2, 3] };
        let round = |runtime: &Runtime| {
            let mut agg = runtime.begin_tree(rule(), 1, 100, tree.clone()).unwrap();
            for (tag, (u, w)) in updates.iter().enumerate() {
                agg.submit(tag as u64, u.clone(), *w).unwrap();
            }
            assert_same_sums(&agg.finish().unwrap(), &flat(&updates, 100));
        };
        round(&runtime);
        let first = runtime.stats();
        // 5 leaves, then 2 middles and a top taken at the close while the leaves still fold.
        assert_eq!(first.cold_starts, tree.instances() as u64);
        assert_eq!(first.idle, tree.instances());
        round(&runtime);
        let second = runtime.stats();
        assert_eq!(second.cold_starts, first.cold_starts, "no new instance");
        // A leaf that starts late may reuse a buffer its round already merged, so the first round
        // can allocate fewer than one per leaf; never more in both rounds together.
        assert!(
            second.buffers_allocated <= tree.leaves() as u64,
            "no accumulator beyond one per leaf"
        );
        assert_eq!(second.warm_reuses, tree.instances() as u64);
        assert_eq!(second.aggregations, 2);
        assert_eq!((second.leaves, second.middles, second.tops), (0, 0, 0));
    }

    #[test]
    fn the_pool_grows_under_a_burst_and_shrinks_when_idle() {
        let runtime = Runtime::new(RuntimeConfig {
            keep_alive_s: 0.5,
            max_leaves: 4,
            ..config()
        })
        .unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let dim = 400_000;
        let updates = uploads(&mut rng, 40, dim);
        let mut agg = runtime.begin(rule(), 1, dim, 1).unwrap();
        assert_eq!(agg.leaves(), 1, "one update expected: one leaf planned");
        for (tag, (u, w)) in updates.iter().enumerate() {
            agg.submit(tag as u64, u.clone(), *w).unwrap();
        }
        let grown = agg.leaves();
        assert!(
            grown > 1,
            "a burst of 40 updates queued behind one leaf adds leaves"
        );
        assert!(grown <= 4, "never past max_leaves");
        let merged = agg.finish().unwrap();
        assert_same_sums(&merged, &flat(&updates, dim));
        drop(merged);
        let busy = runtime.stats();
        assert!(busy.max_queue_depth >= 2);
        assert_eq!(busy.instances, busy.idle);
        // (On a stalled machine some may already have retired since the aggregation ended.)
        assert!(busy.instances + busy.retired as usize > 2);
        // Idle past the keep-alive: every instance retires and its memory with it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while runtime.stats().instances > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let idle = runtime.stats();
        assert_eq!(idle.instances, 0, "instances retire after their keep-alive");
        assert_eq!(idle.retired, busy.retired + busy.instances as u64);
        assert!(
            runtime.shared.lock().stash.is_empty(),
            "warm accumulators are released"
        );
        // The next aggregation starts cold again and still sums right.
        let mut agg = runtime.begin(rule(), 1, dim, 1).unwrap();
        agg.submit(0, updates[0].0.clone(), updates[0].1).unwrap();
        assert_same_sums(&agg.finish().unwrap(), &flat(&updates[..1], dim));
        assert!(runtime.stats().cold_starts > busy.cold_starts);
    }

    #[test]
    fn partials_absorbed_from_other_processes_give_the_flat_sums() {
        let mut rng = StdRng::seed_from_u64(11);
        let dim = 500;
        let updates = uploads(&mut rng, 30, dim);
        let runtime = Runtime::new(config()).unwrap();
        // Three "processes": two hold partials of their own share, the third folds the rest here.
        let mut here = runtime
            .begin_tree(rule(), 1, dim, TreePlan::balanced(2, 2))
            .unwrap();
        for (i, chunk) in updates.chunks(10).enumerate() {
            if i < 2 {
                here.absorb(100 + i as u64, flat(chunk, dim)).unwrap();
            } else {
                for (tag, (u, w)) in chunk.iter().enumerate() {
                    here.submit(tag as u64, u.clone(), *w).unwrap();
                }
            }
        }
        assert_same_sums(&here.finish().unwrap(), &flat(&updates, dim));
    }

    #[test]
    fn a_refused_upload_fails_the_aggregation_with_its_tag() {
        let scaffold = RuleConfig::Scaffold {
            global_lr: 1.0,
            uplink: Default::default(),
        }
        .build()
        .unwrap()
        .server;
        let parts = scaffold.upload_parts();
        let runtime = Runtime::new(config()).unwrap();
        let mut agg = runtime
            .begin_tree(scaffold, parts, 3, TreePlan::balanced(2, 1))
            .unwrap();
        let upload: SharedUpload = Arc::from(vec![vec![1.0f32; 3]; parts]);
        agg.submit(4, upload.clone(), 1.0).unwrap();
        agg.submit(5, upload, 2.0).unwrap();
        let err = agg.finish().err().unwrap();
        assert!(matches!(err, RuntimeError::Fold { tag: 5, .. }), "{err}");
    }

    #[test]
    fn an_abandoned_aggregation_returns_its_instances() {
        let runtime = Runtime::new(config()).unwrap();
        let mut agg = runtime
            .begin_tree(rule(), 1, 10, TreePlan::balanced(3, 2))
            .unwrap();
        agg.submit(0, Arc::from(vec![vec![1.0f32; 10]]), 1.0).unwrap();
        drop(agg);
        let deadline = Instant::now() + Duration::from_secs(20);
        while runtime.stats().idle < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(runtime.stats().idle, 3);
        assert_eq!(runtime.stats().leaves, 0);
    }
}
