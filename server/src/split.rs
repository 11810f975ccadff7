//! Split learning in fl-server: the global model is the head and the tail side by side (one flat
//! vector, so the Coordinator, the FedAvg rule, durable versions and the event-log replay work
//! unchanged), devices download the head, and the tails answer their split streams.
//!
//! SplitFed V1: when a task is sent, the task gets a private [`TailSession`] copied from the
//! current global tail; when its split stream ends, the session's movement is kept, and the
//! device's head update is stored together with it as one update `[Δhead | Δtail]`, so averaging
//! updates averages heads and tails with the same weights. SplitFed V2: one shared tail, held by
//! one split stream at a time (clients served in turn); updates carry `[Δhead | 0]` and every
//! committed version takes the shared tail as it is. (A restarted server resumes V2 from the last
//! committed tail: tail steps after it are not durable.)

use anyhow::{Result, bail};
use serde::Serialize;
use shoal_core::{ClientId, Layout, LayoutBuilder, TaskId};
use shoal_model::Model;
use shoal_model::data::Dataset;
use shoal_model::split::SplitModel;
use shoal_model::train::Evaluation;
use shoal_split::inference;
use shoal_split::{SplitConfig, SplitVariant, TailSession};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What crossed the cut, for `summary.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SplitTraffic {
    /// Minibatches served.
    pub steps: u64,
    /// Samples in them.
    pub samples: u64,
    /// Forward-message bytes received (activations and labels).
    pub forward_bytes: u64,
    /// Gradient bytes sent.
    pub gradient_bytes: u64,
    /// Forward bytes per sample.
    pub bytes_up_per_sample: f64,
    /// Gradient bytes per sample.
    pub bytes_down_per_sample: f64,
}

#[derive(Default)]
struct Counters {
    steps: AtomicU64,
    samples: AtomicU64,
    forward_bytes: AtomicU64,
    gradient_bytes: AtomicU64,
}

/// Where a task's tail stands.
enum Stage {
    /// Waiting for its split stream (V1: with the session it will use).
    Ready(Option<TailSession>),
    /// A split stream is serving it.
    Serving,
    /// Its split stream ended after all its steps; V1: how far its tail moved.
    Done(Option<Vec<f32>>),
}

struct Slot {
    client: ClientId,
    local_steps: u32,
    stage: Stage,
}

/// A task's split stream, as the registry hands it out.
pub struct Taken {
    /// What serves it.
    pub serving: Serving,
    /// Minibatches the task trains.
    pub local_steps: u32,
}

struct Tails {
    /// The tail of the current version (V1 sessions start from it).
    global: Vec<f32>,
    /// V2: the shared tail as the last finished split stream left it.
    shared_latest: Option<Vec<f32>>,
    slots: HashMap<TaskId, Slot>,
}

/// What a split stream serves with.
pub enum Serving {
    /// V1: the task's own tail.
    Own(Box<TailSession>),
    /// V2: the shared tail, to hold for the whole stream.
    Shared(Arc<tokio::sync::Mutex<TailSession>>),
}

/// A split-learning run's server side.
pub struct SplitRun {
    model: Arc<SplitModel>,
    config: SplitConfig,
    layout: Arc<Layout>,
    lr: f32,
    max_batch: usize,
    tails: Mutex<Tails>,
    shared: Option<Arc<tokio::sync::Mutex<TailSession>>>,
    counters: Counters,
}

impl SplitRun {
    /// Cuts `whole` as `config` says; the tails train at `lr` on minibatches of at most
    /// `max_batch` samples, starting from the tail part of `x` (`[head | tail]`).
    pub fn new(whole: &Model, config: SplitConfig, lr: f32, max_batch: usize) -> Result<Self> {
        let model = Arc::new(config.cut_model(whole)?);
        let mut builder = LayoutBuilder::new();
        for segment in model
            .head
            .layout()
            .segments()
            .iter()
            .chain(model.tail.layout().segments())
        {
            builder.push(segment.name.clone(), &segment.shape, segment.kind)?;
        }
        let tail_len = model.tail.num_params();
        let shared = (config.variant == SplitVariant::V2).then(|| {
            Arc::new(tokio::sync::Mutex::new(config.tail_session(
                model.clone(),
                vec![0.0; tail_len],
                lr,
                max_batch,
            )))
        });
        Ok(Self {
            layout: Arc::new(builder.build()),
            model,
            config,
            lr,
            max_batch,
            tails: Mutex::new(Tails {
                global: vec![0.0; tail_len],
                shared_latest: None,
                slots: HashMap::new(),
            }),
            shared,
            counters: Counters::default(),
        })
    }

    /// Counts one served minibatch.
    pub fn count(&self, samples: usize, forward_bytes: usize, gradient_bytes: usize) {
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters.samples.fetch_add(samples as u64, Ordering::Relaxed);
        self.counters
            .forward_bytes
            .fetch_add(forward_bytes as u64, Ordering::Relaxed);
        self.counters
            .gradient_bytes
            .fetch_add(gradient_bytes as u64, Ordering::Relaxed);
    }

    /// What crossed the cut since this start.
    pub fn traffic(&self) -> SplitTraffic {
        let c = &self.counters;
        let samples = c.samples.load(Ordering::Relaxed);
        let forward = c.forward_bytes.load(Ordering::Relaxed);
        let gradient = c.gradient_bytes.load(Ordering::Relaxed);
        let per = |b: u64| b as f64 / samples.max(1) as f64;
        SplitTraffic {
            steps: c.steps.load(Ordering::Relaxed),
            samples,
            forward_bytes: forward,
            gradient_bytes: gradient,
            bytes_up_per_sample: per(forward),
            bytes_down_per_sample: per(gradient),
        }
    }

    /// The cut model.
    pub fn model(&self) -> &Arc<SplitModel> {
        &self.model
    }

    /// The `[split]` table.
    pub fn config(&self) -> &SplitConfig {
        &self.config
    }

    /// The layout of the global vector: the head's segments, then the tail's.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Parameters of the head (what devices download and upload).
    pub fn head_dim(&self) -> usize {
        self.model.head.num_params()
    }

    /// The initial global vector `[head | tail]` from the whole model initialised with `seed`
    /// (the bottleneck layers, which it lacks, from `seed` too).
    pub fn initial(&self, whole: &Model, seed: u64) -> Vec<f32> {
        let (head, tail) = self.model.params_from_whole(&whole.init_params(seed), seed);
        head.into_vec().into_iter().chain(tail.into_vec()).collect()
    }

    /// Sets the tail every new V1 session starts from (and, at start, the V2 shared tail) to the
    /// tail part of the global vector `x`.
    pub fn adopt(&self, x: &[f32], starting: bool) {
        let tail = &x[self.head_dim()..];
        if let Ok(mut tails) = self.tails.lock() {
            tails.global.clear();
            tails.global.extend_from_slice(tail);
        }
        if starting && let Some(shared) = &self.shared {
            let mut session = shared.blocking_lock();
            *session = self.fresh_session(tail.to_vec());
        }
    }

    /// V2: writes the shared tail, as the last finished split stream left it, into the tail part
    /// of `x` (before a version is committed). Never waits for a stream in progress.
    pub fn write_shared_tail(&self, x: &mut [f32]) {
        let h = self.head_dim();
        if let Ok(tails) = self.tails.lock()
            && let Some(latest) = &tails.shared_latest
            && latest.len() == x.len() - h
        {
            x[h..].copy_from_slice(latest);
        }
    }

    fn fresh_session(&self, tail: Vec<f32>) -> TailSession {
        self.config
            .tail_session(self.model.clone(), tail, self.lr, self.max_batch)
    }

    /// A task of `local_steps` minibatches was given to `client`: prepare its tail.
    pub fn open(&self, task: TaskId, client: ClientId, local_steps: u32) {
        let Ok(mut tails) = self.tails.lock() else {
            return;
        };
        let session =
            (self.config.variant == SplitVariant::V1).then(|| self.fresh_session(tails.global.clone()));
        tails.slots.insert(
            task,
            Slot {
                client,
                local_steps,
                stage: Stage::Ready(session),
            },
        );
    }

    /// A split stream of `client` for `task` opens: what serves it. A task whose earlier stream
    /// broke or finished starts again from the current global tail.
    pub fn take(&self, task: TaskId, client: ClientId) -> Result<Taken, String> {
        let mut tails = self
            .tails
            .lock()
            .map_err(|_| "the tail registry is poisoned".to_string())?;
        let global = tails.global.clone();
        let slot = tails
            .slots
            .get_mut(&task)
            .filter(|s| s.client == client)
            .ok_or_else(|| format!("{task} is not a split task of this client"))?;
        let local_steps = slot.local_steps;
        let own = match std::mem::replace(&mut slot.stage, Stage::Serving) {
            Stage::Serving => {
                return Err(format!("{task} already has an open split stream"));
            }
            Stage::Ready(session) => session,
            Stage::Done(_) => None,
        };
        let serving = match &self.shared {
            Some(shared) => Serving::Shared(shared.clone()),
            None => Serving::Own(Box::new(own.unwrap_or_else(|| self.fresh_session(global)))),
        };
        Ok(Taken { serving, local_steps })
    }

    /// A split stream ended: `complete` when it served every step. V1 returns its session; V2
    /// passes the shared tail as the stream left it.
    pub fn release(
        &self,
        task: TaskId,
        session: Option<TailSession>,
        shared_tail: Option<&[f32]>,
        complete: bool,
    ) {
        let Ok(mut tails) = self.tails.lock() else {
            return;
        };
        if let Some(tail) = shared_tail {
            tails.shared_latest = Some(tail.to_vec());
        }
        if let Some(slot) = tails.slots.get_mut(&task) {
            slot.stage = if complete {
                Stage::Done(session.map(|s| s.delta()))
            } else {
                Stage::Ready(None)
            };
        }
    }

    /// The full update `[Δhead | Δtail]` of a task whose split stream is done: V1 with its tail's
    /// movement, V2 with zeros. Refused before the task's steps were served.
    pub fn full_update(&self, task: TaskId, head_delta: &[f32]) -> Result<Vec<f32>> {
        if head_delta.len() != self.head_dim() {
            bail!(
                "a head update of {} values, the head has {}",
                head_delta.len(),
                self.head_dim()
            );
        }
        let tails = self
            .tails
            .lock()
            .map_err(|_| anyhow::anyhow!("the tail registry is poisoned"))?;
        let Some(Slot {
            stage: Stage::Done(tail),
            ..
        }) = tails.slots.get(&task)
        else {
            bail!("the head update of {task} arrived before its split steps were served");
        };
        let tail_len = self.model.tail.num_params();
        let mut full = Vec::with_capacity(self.layout.len());
        full.extend_from_slice(head_delta);
        match tail {
            Some(delta) => full.extend_from_slice(delta),
            None => full.resize(self.head_dim() + tail_len, 0.0),
        }
        Ok(full)
    }

    /// Forgets the tails of tasks for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(TaskId) -> bool) {
        if let Ok(mut tails) = self.tails.lock() {
            tails.slots.retain(|task, _| keep(*task));
        }
    }

    /// Split inference of the global vector `x` on `data`, through the activation codec.
    pub fn evaluate(&self, x: &[f32], data: &Dataset, batch_size: usize) -> Result<Evaluation> {
        let h = self.head_dim();
        let e = inference::evaluate(
            &self.model,
            &x[..h],
            &x[h..],
            &self.config.activations,
            data,
            batch_size,
        )?;
        Ok(Evaluation {
            accuracy: e.accuracy,
            loss: e.loss,
            samples: e.samples,
        })
    }
}
