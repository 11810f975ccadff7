//! One federated run as fl-server drives it: the Coordinator fed with real time, the engine's
//! server core ([`ServerCore`]: hold, fold, merge, apply) carrying out its decisions on the
//! serverless runtime, and every step made durable through [`Store`] before anyone is told. The
//! run itself decides no number: it orders the steps, persists them and evaluates. A leaf of a
//! federation's exchange with its top is in `leaf`; the metrics and summary it writes in
//! `record`.
//!
//! This is the server's counterpart of fl-sim's engine and has no networking: the daemon hands it
//! events and decoded updates and carries out the [`Outgoing`] messages it returns. On
//! [`Run::open`] it restores the last committed version and replays the event log into a fresh
//! Coordinator (same configuration, same seed, so the same decisions): acknowledged updates that
//! no committed version holds are folded again from their files; nothing is folded twice.

use crate::config::{FederationConfig, ServerConfig};
use crate::ef21_memory::Ef21Memories;
use crate::runtime::{Runtime, RuntimeStats};
use crate::split::SplitRun;
use crate::store::{PendingUpdate, RunSnapshot, Store, StoreError, task_ranges, tasks_in};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_aggregators::{Accumulator, Broadcast, Command, Coordinator, CoordinatorError, Event, TaskRecord};
use shoal_compression::feedback::Feedback;
use shoal_core::{ClientId, Layout, ModelVersion, TaskId, Timestamp, UpdateMeta};
use shoal_engine::metrics::{FoldWindow, RunTotals, VersionRecord};
use shoal_engine::{Contribution, Population, ServerCore, decode_contribution};
use shoal_model::Model;
use shoal_model::data::{Dataset, resolve_data_root};
use shoal_model::train::evaluate;
use shoal_net::protocol::{BroadcastVector, RunDescription};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

mod leaf;
mod record;

use leaf::LeafLink;
pub use leaf::{LeafUpload, OwedPartial};
pub use record::{ProcessFigures, RunSummary, VersionMetrics};

/// What the daemon must tell clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// Send `client` a task and the broadcast of `version`.
    Task {
        /// The client.
        client: ClientId,
        /// The task.
        task: TaskId,
        /// The version to train from (the current one).
        version: ModelVersion,
        /// Local steps.
        local_steps: u32,
        /// The task's seed (the Coordinator's).
        seed: u64,
    },
    /// Tell `client` to drop `task`.
    Cancel {
        /// The client.
        client: ClientId,
        /// The task.
        task: TaskId,
    },
    /// Disconnect `client`.
    Evict {
        /// The client.
        client: ClientId,
        /// Why.
        reason: String,
    },
    /// The run is over: tell every client and stop.
    Finished,
}

/// The broadcast of the current version, shared by every transfer of it.
#[derive(Debug, Clone)]
pub struct SharedBroadcast {
    /// The version.
    pub version: ModelVersion,
    /// Which vectors, in order.
    pub vectors: Vec<BroadcastVector>,
    /// The vectors.
    pub data: Vec<Arc<[f32]>>,
}

impl SharedBroadcast {
    /// The broadcast of `b`; a split run (`head` = the head's length) sends the head alone.
    fn new(version: ModelVersion, b: &Broadcast, head: Option<usize>) -> Self {
        if let Some(h) = head {
            return Self {
                version,
                vectors: vec![BroadcastVector::Model],
                data: vec![Arc::from(&b.x[..h])],
            };
        }
        let mut vectors = vec![BroadcastVector::Model];
        let mut data = vec![b.x.clone()];
        for (kind, v) in [
            (BroadcastVector::ControlVariate, &b.c),
            (BroadcastVector::Direction, &b.g),
            (BroadcastVector::PreviousModel, &b.x_prev),
        ] {
            if let Some(v) = v {
                vectors.push(kind);
                data.push(v.clone());
            }
        }
        Self {
            version,
            vectors,
            data,
        }
    }

    /// Bytes on a model stream (without its header).
    pub fn bytes(&self) -> u64 {
        self.data.iter().map(|v| v.len() as u64 * 4).sum()
    }
}

/// What became of an offered update.
#[derive(Debug, PartialEq)]
pub enum Offer {
    /// Durable and handed to the Coordinator: acknowledge it.
    Accepted(Vec<Outgoing>),
    /// Accepted before (a resend after a lost acknowledgement): acknowledge it again.
    Duplicate,
    /// Not for a running task of this client, or the run is over.
    Refused(CoordinatorError),
}

/// Why an offered update was not taken.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// Storing it failed before it was accepted: nothing changed, and the client may send it again.
    #[error("{0:#}")]
    NotStored(anyhow::Error),
    /// It was accepted and logged, but what followed failed (a commit on a full disk, say): the run
    /// in memory is behind its log, so fl-server must stop; the next start replays the log.
    #[error("{0:#}")]
    RunFailed(anyhow::Error),
}

impl From<anyhow::Error> for OfferError {
    fn from(e: anyhow::Error) -> Self {
        OfferError::NotStored(e)
    }
}

/// An update as a connection received it: decoded, checked, and written to a file.
#[derive(Debug)]
pub struct ReceivedUpdate {
    /// Its metadata, as the client sent it.
    pub meta: UpdateMeta,
    /// Bytes the client sent for it.
    pub wire_bytes: u64,
    /// Bytes of each encoded part.
    pub part_bytes: Vec<u64>,
    /// Hash of the payload file.
    pub hash: u64,
    /// What it contributes to the aggregation.
    pub contribution: Contribution,
}

/// A run in progress.
pub struct Run {
    config: ServerConfig,
    model: Arc<Model>,
    coordinator: Coordinator,
    /// The engine's server core: the rule's state and the aggregation in progress, folding on the
    /// serverless runtime.
    core: ServerCore<Runtime>,
    /// A leaf: client updates in the round whose version it waits for.
    last_round_updates: usize,
    broadcast: SharedBroadcast,
    store: Store,
    /// Every task whose update was acknowledged (resends are acknowledged again, never re-folded).
    accepted: HashSet<TaskId>,
    committed: ModelVersion,
    /// The store's run id.
    run_id: u64,
    eval: Option<Dataset>,
    metrics_path: PathBuf,
    summary_path: PathBuf,
    clock_base: Timestamp,
    clock_start: Instant,
    bytes_up: u64,
    bytes_down: u64,
    updates_folded: u64,
    initial_accuracy: Option<f64>,
    last_accuracy: Option<f64>,
    best_accuracy: Option<f64>,
    /// The updates folded since the last record (every committed version is one).
    window: FoldWindow,
    finished: bool,
    /// Versions committed since the last [`Run::take_committed`] (for the admin metrics stream).
    committed_metrics: Vec<VersionMetrics>,
    /// Split learning: the cut model and its tails.
    split: Option<Arc<SplitRun>>,
    /// A leaf of a federation: its exchange with the top.
    leaf: Option<LeafLink>,
    /// `feedback = "ef21"`: every client's memory `h_i`.
    ef21: Option<Ef21Memories>,
    /// The newest version metrics.jsonl has a line for (from earlier starts).
    recorded_through: Option<ModelVersion>,
    /// Versions committed since the last snapshot (see [`Run::snapshot_when_due`]).
    since_snapshot: u64,
}

impl Run {
    /// Opens the run stored under `state_dir` (creating it on first start), restoring the last
    /// committed version and replaying the event log.
    pub fn open(config: ServerConfig, run_dir: &Path, data_dir: Option<&Path>) -> Result<Self> {
        let state_dir = run_dir.join("state");
        let store = Store::open(&state_dir, config.fingerprint())?;
        let (shape, classes) = config.data.dataset.shape(&config.data.synthetic);
        let model = Arc::new(
            config
                .model
                .build(&shape, classes)
                .with_context(|| format!("[model] `{}`", config.model.name))?,
        );
        let (algorithm, coordinator) = config.algorithm.build(config.seed).context("[algorithm]")?;
        let split = match &config.split {
            Some(split) => Some(Arc::new(
                SplitRun::new(
                    &model,
                    split.clone(),
                    config.algorithm.local_lr,
                    config.model.batch_size,
                )
                .context("[split]")?,
            )),
            None => None,
        };
        let dim = split.as_ref().map_or(model.num_params(), |s| s.layout().len());
        let eval = if config.eval.enabled {
            let root = data_dir
                .map(Path::to_path_buf)
                .or_else(|| config.data.data_dir.clone());
            let root = match config.data.dataset {
                shoal_model::data::DatasetName::Mnist => Some(resolve_data_root(root.as_deref())?),
                shoal_model::data::DatasetName::Synthetic => None,
            };
            let data = config
                .data
                .dataset
                .load(root.as_deref(), &config.data.synthetic)
                .context("loading the held-out set for [eval] (set enabled = false to run without)")?;
            Some(match config.eval.test_samples {
                Some(n) => data.test.head(n),
                None => data.test,
            })
        } else {
            None
        };
        let mut committed = store.committed_version()?;
        let initial = || {
            let x0 = match &split {
                Some(split) => split.initial(&model, config.seed),
                None => model.init_params(config.seed).as_slice().to_vec(),
            };
            algorithm.server.init_state(x0)
        };
        let state = match committed {
            Some(v) => match store.load_version(v) {
                Ok(state) => state,
                Err(damage @ StoreError::File(_)) if v == ModelVersion(0) => {
                    tracing::warn!(error = %damage, "the initial version's file is damaged; it is made again from the seed");
                    let state = initial();
                    store.commit_version(v, &state, Timestamp::ZERO, Vec::new())?;
                    state
                }
                Err(damage @ StoreError::File(_)) => {
                    let undone = store.undo_damaged_commit(v, &damage)?;
                    tracing::warn!(
                        error = %damage,
                        from = %undone.previous,
                        updates = undone.updates,
                        "the latest version's file is damaged (kept beside it as .damaged); it is made \
                         again from the version before and the updates folded into it"
                    );
                    committed = Some(undone.previous);
                    undone.state
                }
                Err(e) => return Err(anyhow::Error::from(e).context(format!("restoring {v}"))),
            },
            None => {
                let state = initial();
                store.commit_version(ModelVersion(0), &state, Timestamp::ZERO, Vec::new())?;
                state
            }
        };
        if state.x.len() != dim {
            bail!(
                "the stored model has {} parameters, `{}` has {dim}",
                state.x.len(),
                config.model.name,
            );
        }
        if let Some(split) = &split {
            split.adopt(&state.x, true);
        }
        let swept = store.sweep_orphans()?;
        if swept > 0 {
            tracing::info!(files = swept, "removed update files that were never acknowledged");
        }
        let fresh = committed.is_none();
        let committed = committed.unwrap_or(ModelVersion(0));
        let head = split.as_ref().map(|s| s.head_dim());
        let broadcast = SharedBroadcast::new(committed, &state.broadcast(), head);
        let finished = store.is_finished()?;
        let run_id = store.run_id()?;
        let leaf = matches!(config.federation, Some(FederationConfig::Leaf { .. })).then(LeafLink::default);
        let runtime = Runtime::new(config.runtime.clone()).map_err(|e| anyhow::anyhow!("[runtime]: {e}"))?;
        let core = ServerCore::new(algorithm.server, config.algorithm.clone(), state, runtime);
        let mut run = Self {
            core,
            last_round_updates: 0,
            metrics_path: run_dir.join("metrics.jsonl"),
            summary_path: run_dir.join("summary.json"),
            config,
            model,
            coordinator,
            broadcast,
            store,
            accepted: HashSet::new(),
            committed,
            run_id,
            eval,
            clock_base: Timestamp::ZERO,
            clock_start: Instant::now(),
            bytes_up: 0,
            bytes_down: 0,
            updates_folded: 0,
            initial_accuracy: None,
            last_accuracy: None,
            best_accuracy: None,
            window: FoldWindow::default(),
            finished,
            committed_metrics: Vec::new(),
            recorded_through: None,
            since_snapshot: 0,
            split,
            leaf,
            ef21: None,
        };
        run.restore_metrics();
        run.replay()?;
        if run.config.feedback == Feedback::Ef21 {
            run.ef21 = Some(Ef21Memories::open(run.store.dir(), &run.accepted)?);
        }
        if fresh {
            run.record_version(ModelVersion(0), 0)?;
        }
        Ok(run)
    }

    /// Feeds the logged events to the fresh Coordinator, carrying out only what is not yet
    /// durable (folds of uncommitted updates, aggregations after the committed version).
    fn replay(&mut self) -> Result<()> {
        let mut last = Timestamp::ZERO;
        // Every accepted update's bytes, from the log: the metrics of the starts before miss those
        // accepted after their last record.
        let mut bytes_up = 0u64;
        let mut from = 0;
        if let Some(snapshot) = self.store.snapshot(self.committed)? {
            self.coordinator
                .restore(&snapshot.coordinator)
                .context("restoring the Coordinator from its snapshot")?;
            self.accepted.extend(tasks_in(&snapshot.accepted));
            bytes_up = snapshot.bytes_up;
            self.bytes_down = self.bytes_down.max(snapshot.bytes_down);
            last = snapshot.at;
            from = snapshot.through;
        }
        let events: Vec<(Timestamp, Event, u64)> =
            self.store.events_from(from).collect::<Result<_, StoreError>>()?;
        let count = events.len();
        for (at, event, bytes) in events {
            last = at;
            bytes_up = bytes_up.saturating_add(bytes);
            if let Event::UpdateArrived(meta) = &event {
                self.accepted.insert(meta.task);
            }
            match self.coordinator.handle(at, event) {
                Ok(commands) => {
                    self.carry_out(commands, true)?;
                }
                Err(e) => tracing::debug!(error = %e, "a logged event was refused again on replay"),
            }
        }
        self.bytes_up = self.bytes_up.max(bytes_up);
        self.clock_base = last;
        self.clock_start = Instant::now();
        if count > 0 || from > 0 {
            tracing::info!(
                events = count,
                snapshot_through = from,
                version = %self.coordinator.version(),
                committed = %self.committed,
                pending = self.coordinator.held_updates() + self.coordinator.pending_folds(),
                "restored the run from its log"
            );
        }
        Ok(())
    }

    /// Run time: the time of the last logged event before this start, plus time since.
    pub fn now(&self) -> Timestamp {
        self.clock_base.after(self.clock_start.elapsed())
    }

    /// When the Coordinator wants an [`Event::Timer`].
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        self.coordinator.next_wakeup()
    }

    /// Whether the run has finished.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The current global version.
    pub fn version(&self) -> ModelVersion {
        self.coordinator.version()
    }

    /// The broadcast of the current version.
    pub fn broadcast(&self) -> &SharedBroadcast {
        &self.broadcast
    }

    /// The layout of the global vector, which stored updates are decoded against (a split run's
    /// is the head's segments, then the tail's).
    pub fn layout(&self) -> Arc<Layout> {
        match &self.split {
            Some(split) => split.layout().clone(),
            None => self.model.layout().clone(),
        }
    }

    /// The split run, if this is one.
    pub fn split(&self) -> Option<&Arc<SplitRun>> {
        self.split.as_ref()
    }

    /// The current global vector (a split run's: head and tail).
    pub fn global_model(&self) -> Arc<[f32]> {
        Arc::from(self.core.state().x.as_slice())
    }

    /// The state directory (update files are written there by connections).
    pub fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    /// What a client must know to take part.
    pub fn description(&self) -> RunDescription {
        RunDescription {
            run_id: self.run_id,
            model: self.config.model.name.clone(),
            dim: self
                .split
                .as_ref()
                .map_or(self.model.num_params(), |s| s.head_dim()) as u64,
            batch_size: self.config.model.batch_size as u32,
            rule_json: serde_json::to_string(&self.config.algorithm.rule).unwrap_or_default(),
            split_json: self
                .split
                .as_ref()
                .and_then(|s| serde_json::to_string(s.config()).ok()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The Coordinator (read-only), for status.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// The stable id of a client name.
    pub fn client_id(&self, name: &str) -> Result<ClientId> {
        Ok(self.store.client_id(name)?)
    }

    /// Whether the Coordinator knows the client (it is registered and has not left).
    pub fn is_registered(&self, client: ClientId) -> bool {
        self.coordinator.client(client).is_some()
    }

    /// The task `client` is running, if any.
    pub fn running_task_of(&self, client: ClientId) -> Option<TaskRecord> {
        self.coordinator
            .client(client)
            .and_then(|r| r.task)
            .and_then(|t| self.coordinator.running_task(t).copied())
    }

    /// Counts model bytes sent.
    pub fn count_download(&mut self, bytes: u64) {
        self.bytes_down += bytes;
    }

    /// Logs `event` and hands it to the Coordinator; returns what to tell clients.
    pub fn handle(&mut self, event: Event) -> Result<Vec<Outgoing>> {
        if self.finished {
            return Ok(Vec::new());
        }
        let now = self.now();
        self.store.log_event(now, &event)?;
        match self.coordinator.handle(now, event) {
            Ok(commands) => {
                let out = self.carry_out(commands, false)?;
                self.snapshot_when_due();
                Ok(out)
            }
            Err(e) => {
                tracing::warn!(error = %e, "event refused by the Coordinator");
                Ok(Vec::new())
            }
        }
    }

    /// Snapshots the Coordinator (and what the run counts from the log) once `[storage]
    /// snapshot_every` versions were committed since the last, at an event after which no fold
    /// is open (a snapshot then holds everything the events before it decided), and lets the
    /// log drop what the snapshot before covers. A failure leaves the log whole, so it is only
    /// logged. A federation leaf's exchange with its top is not in a snapshot: a leaf replays
    /// its whole log.
    fn snapshot_when_due(&mut self) {
        let every = self.config.storage.snapshot_every;
        if every == 0
            || self.since_snapshot < every
            || self.coordinator.pending_folds() > 0
            || self.leaf.is_some()
            || self.finished
        {
            return;
        }
        let snapshot = RunSnapshot {
            through: self.store.next_event(),
            at: self.now(),
            version: self.coordinator.version(),
            coordinator: self.coordinator.snapshot(),
            accepted: task_ranges(&self.accepted),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
        };
        match self.store.save_snapshot(&snapshot) {
            Ok(()) => {
                self.since_snapshot = 0;
                tracing::debug!(version = %snapshot.version, through = snapshot.through, "snapshot of the run");
            }
            Err(e) => tracing::warn!(error = %e, "could not snapshot the run; its event log stays whole"),
        }
    }

    /// Offers a decoded update whose payload file is written at `incoming`: checks it answers a
    /// running task of its client, makes it durable, and hands it to the Coordinator. A refused or
    /// duplicate update's file is removed.
    pub fn offer_update(&mut self, upload: ReceivedUpdate, incoming: &Path) -> Result<Offer, OfferError> {
        let offer = self.decide(upload, incoming);
        if !matches!(offer, Ok(Offer::Accepted(_)) | Err(OfferError::RunFailed(_))) {
            let _ = std::fs::remove_file(incoming);
        }
        offer
    }

    fn decide(&mut self, upload: ReceivedUpdate, incoming: &Path) -> Result<Offer, OfferError> {
        let ReceivedUpdate {
            meta,
            wire_bytes,
            part_bytes,
            hash,
            contribution,
        } = upload;
        let task = meta.task;
        if self.accepted.contains(&task) {
            return Ok(Offer::Duplicate);
        }
        let Some(record) = self.coordinator.running_task(task) else {
            return Ok(Offer::Refused(CoordinatorError::TaskNotRunning(task)));
        };
        if record.client != meta.client {
            return Ok(Offer::Refused(CoordinatorError::WrongClient {
                task,
                expected: record.client,
                actual: meta.client,
            }));
        }
        if record.version != meta.base_version {
            return Ok(Offer::Refused(CoordinatorError::WrongVersion {
                task,
                expected: record.version,
                actual: meta.base_version,
            }));
        }
        if self.finished {
            return Ok(Offer::Refused(CoordinatorError::TaskNotRunning(task)));
        }
        let (contribution, part_bytes, hash, moved) = match (&self.ef21, contribution) {
            (Some(memories), Contribution::Upload(message)) => {
                let prepared = memories
                    .prepare(meta.client, task, &message)
                    .with_context(|| format!("the EF21 memory of {}", meta.client))?;
                let (part_bytes, hash) = self.store_dense(incoming, prepared.folded())?;
                let folded = Contribution::Upload(Arc::from(prepared.folded().to_vec()));
                (folded, part_bytes, hash, Some(prepared))
            }
            (_, contribution) => (contribution, part_bytes, hash, None),
        };
        let now = self.now();
        let bytes = wire_bytes;
        let pending = PendingUpdate {
            meta: meta.clone(),
            part_bytes,
            hash,
        };
        self.store
            .accept_update(now, &pending, incoming, bytes)
            .map_err(anyhow::Error::from)?;
        if let (Some(memories), Some(moved)) = (self.ef21.as_mut(), moved) {
            memories.adopt(moved);
        }
        tracing::info!(%task, client = %meta.client, bytes, "update stored");
        self.accepted.insert(task);
        self.bytes_up += bytes;
        if let Some(leaf) = &mut self.leaf {
            leaf.report_loss(meta.loss);
        }
        self.core.hold(task, contribution, meta.loss);
        // Accepted and logged: from here a failure leaves the run in memory behind its log.
        let commands = self
            .coordinator
            .handle(now, Event::UpdateArrived(meta))
            .map_err(|e| OfferError::RunFailed(e.into()))?;
        let out = self.carry_out(commands, false).map_err(OfferError::RunFailed)?;
        self.snapshot_when_due();
        Ok(Offer::Accepted(out))
    }

    /// Rewrites the update file at `incoming` as the dense `parts` it folds (identity payloads,
    /// one per part): a replay folds what the file holds. Returns the parts' sizes and the hash.
    fn store_dense(&self, incoming: &Path, parts: &[Vec<f32>]) -> Result<(Vec<u64>, u64)> {
        let layout = self.layout();
        let payloads = parts
            .iter()
            .map(|p| shoal_compression::encode(&shoal_compression::CodecSpec::identity(), &layout, p, 0))
            .collect::<Result<Vec<_>, _>>()
            .context("encoding the folded update")?;
        let views: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        crate::files::write_atomic(incoming, &views)?;
        Ok((
            payloads.iter().map(|p| p.len() as u64).collect(),
            crate::files::content_hash(&views),
        ))
    }

    fn carry_out(&mut self, commands: Vec<Command>, replaying: bool) -> Result<Vec<Outgoing>> {
        let mut out = Vec::new();
        for command in commands {
            match command {
                Command::Train {
                    client,
                    task,
                    version,
                    local_steps,
                    seed,
                } => {
                    if !replaying {
                        out.push(Outgoing::Task {
                            client,
                            task,
                            version,
                            local_steps,
                            seed,
                        });
                    }
                }
                Command::Fold {
                    task,
                    weight,
                    staleness,
                    ..
                } => self.fold(task, weight, staleness)?,
                Command::Discard { task, .. } => {
                    self.core.discard(task);
                    self.store.discard_update(task)?;
                }
                Command::Aggregate {
                    version,
                    num_clients,
                    previous_num_clients,
                    ..
                } => {
                    if version <= self.committed {
                        // Replaying an aggregation that is already committed: its folds were skipped.
                        self.core.abandon();
                        continue;
                    }
                    self.aggregate(
                        version,
                        Population {
                            num_clients,
                            previous_num_clients,
                        },
                    )?;
                    if self.should_stop(version) {
                        self.finish()?;
                        out.push(Outgoing::Finished);
                        return Ok(out);
                    }
                }
                Command::WakeAt(_) => {}
                Command::Cancel { client, task } => {
                    if !replaying {
                        out.push(Outgoing::Cancel { client, task });
                    }
                }
                Command::Evict { client, reason } => {
                    if !replaying {
                        out.push(Outgoing::Evict { client, reason });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Folds the update of `task` on the aggregation runtime: held in memory when it just arrived,
    /// read from its file when replaying; absent from both when a committed version already holds
    /// it. The first fold of an aggregation opens it, planned for as many updates as the last one
    /// had or as there are tasks running.
    fn fold(&mut self, task: TaskId, weight: f64, staleness: u64) -> Result<()> {
        if !self.core.holds(task) {
            let Some(pending) = self.store.pending_update(task)? else {
                return Ok(());
            };
            let bytes = self.store.read_update(&pending).with_context(|| {
                format!(
                    "reading the acknowledged update of {task} (if its file is lost for good, `fl-server \
                     drop-update DIR --task {}` drops it and the version is made without it)",
                    task.0
                )
            })?;
            let partial = self.is_top() && shoal_compression::partial::is_partial(&bytes);
            let contribution = decode_contribution(
                &bytes,
                &pending.part_bytes,
                &self.layout(),
                self.core.upload_parts(),
                partial,
            )
            .with_context(|| {
                format!(
                    "stored update {task} (if it is damaged for good, `fl-server drop-update DIR --task {}` \
                     drops it and the version is made without it)",
                    task.0
                )
            })?;
            self.core.hold(task, contribution, pending.meta.loss);
        }
        let running = self.coordinator.running_tasks().count();
        if let Some(loss) = self.core.fold(task, weight, running)? {
            self.window.fold(staleness, loss);
        }
        Ok(())
    }

    /// Vectors per upload of the rule.
    pub fn upload_parts(&self) -> usize {
        self.core.upload_parts()
    }

    /// Whether this server is the top of a federation (its leaves upload partial aggregates).
    pub fn is_top(&self) -> bool {
        matches!(self.config.federation, Some(FederationConfig::Top { .. }))
    }

    /// Whether `name` is one of this top's leaves.
    pub fn is_leaf_name(&self, name: &str) -> bool {
        matches!(&self.config.federation, Some(FederationConfig::Top { leaves }) if leaves.iter().any(|l| l == name))
    }

    /// Finishes the aggregation of `version`; `population` is `N` now and at the aggregation before.
    fn aggregate(&mut self, version: ModelVersion, population: Population) -> Result<()> {
        let merged = self
            .core
            .merge()
            .with_context(|| format!("aggregating {version}"))?;
        let updates = usize::try_from(merged.count()).unwrap_or(usize::MAX);
        if self.leaf.is_some() {
            self.last_round_updates = updates;
            return self.owe_partial(version, &merged);
        }
        self.core
            .apply(&merged, population)
            .with_context(|| format!("applying {version}"))?;
        drop(merged);
        self.commit(version, updates)
    }

    /// Commits the state as `version` with the updates folded into it, and records it.
    fn commit(&mut self, version: ModelVersion, updates: usize) -> Result<()> {
        if let Some(split) = &self.split {
            split.write_shared_tail(self.core.model_mut());
            split.adopt(&self.core.state().x, false);
            let coordinator = &self.coordinator;
            split.retain(|task| coordinator.running_task(task).is_some());
        }
        let folded = self.core.take_folded();
        if self.config.storage.keep_updates {
            self.store
                .keep_folded(version, &folded)
                .with_context(|| format!("keeping the updates of {version}"))?;
        }
        let tasks: Vec<TaskId> = folded.into_iter().map(|(task, _)| task).collect();
        self.updates_folded += tasks.len() as u64;
        self.store
            .commit_version(version, self.core.state(), self.now(), tasks)
            .with_context(|| format!("committing {version}"))?;
        self.committed = version;
        self.since_snapshot += 1;
        self.store.prune_versions(self.config.storage.keep_versions)?;
        let head = self.split.as_ref().map(|s| s.head_dim());
        self.broadcast = SharedBroadcast::new(version, &self.core.broadcast(), head);
        self.record_version(version, updates)
    }

    /// The aggregation runtime's figures.
    pub fn runtime_stats(&self) -> RuntimeStats {
        self.core.executor().stats()
    }

    fn should_stop(&self, version: ModelVersion) -> bool {
        if self.leaf.is_some() {
            // The top decides when the run ends.
            return false;
        }
        let rounds = self.config.stop.rounds.is_some_and(|r| version.0 >= r);
        let target = match (self.config.stop.target_accuracy, self.last_accuracy) {
            (Some(t), Some(a)) => a >= t,
            _ => false,
        };
        rounds || target
    }

    /// Every client name the run has seen, with its id.
    pub fn client_names(&self) -> Result<Vec<(ClientId, String)>> {
        Ok(self.store.client_names()?)
    }

    /// Flushes the state index.
    pub fn flush(&self) -> Result<()> {
        Ok(self.store.flush()?)
    }
}
