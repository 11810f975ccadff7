//! Split learning in the simulator: SplitFed V1/V2 tasks that really train a cut model, with the
//! sizes of every message they send charged on the virtual clock by the engine.
//!
//! A task starts from the global head (downloaded as dense f32) and, under V1, a private copy of
//! the global tail taken at that moment; it runs its local steps through
//! [`shoal_split::run_task`] — every forward and gradient message through the real cut codec —
//! and uploads its head update with the experiment's codec. V1 tasks are independent, so the ones
//! that have started are computed together, in parallel, when the first is needed; V2 tasks share
//! the server's one tail and are computed one at a time, when the server takes them. Folding and
//! aggregation average heads (and V1 tails) with the scheduler's weights.

use crate::engine::{Finished, SimError, SplitServing, SplitSteps, Workload};
use crate::server::ServerModel;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_compression::CodecSpec;
use shoal_core::{Params, TaskId};
use shoal_model::Model;
use shoal_model::data::{Dataset, DatasetName};
use shoal_model::split::SplitModel;
use shoal_split::inference::{self, SplitEvaluation, SplitProfile};
use shoal_split::{BatchOrder, SplitConfig, SplitServer, SplitVariant, TailSession, TaskTrace, run_task};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Bytes of one raw input sample: 1 per pixel for MNIST images, 4 per f32 feature otherwise.
pub fn raw_input_bytes(dataset: DatasetName, input_shape: &[usize]) -> f64 {
    let per_value = if dataset == DatasetName::Mnist { 1.0 } else { 4.0 };
    per_value * input_shape.iter().product::<usize>() as f64
}

struct Started {
    client: usize,
    local_steps: u32,
    head: Vec<f32>,
    session: Option<TailSession>,
    /// The task's seed, as the Coordinator gave it.
    seed: u64,
}

struct Computed {
    head_delta: Vec<f32>,
    session: Option<TailSession>,
    trace: TaskTrace,
    upload_bytes: u64,
}

/// Traffic and work of the split tasks folded so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitTraffic {
    /// Samples trained by folded tasks.
    pub samples: u64,
    /// Forward-message bytes of those tasks.
    pub forward_bytes: u64,
    /// Gradient-message bytes of those tasks.
    pub gradient_bytes: u64,
}

/// What a split run is made of.
pub struct SplitSetup {
    /// The whole network (cut by `split`).
    pub model: Arc<Model>,
    /// Training samples, shared by all clients.
    pub train: Arc<Dataset>,
    /// Each client's sample indices.
    pub partition: Vec<Vec<usize>>,
    /// Local minibatch size.
    pub batch_size: usize,
    /// Learning rate of both sides.
    pub lr: f32,
    /// The `[split]` table.
    pub split: SplitConfig,
    /// Codec of the head updates.
    pub codec: CodecSpec,
    /// The simulated server.
    pub server: ServerModel,
    /// Seed of the initial model and of every task.
    pub seed: u64,
}

/// What every task of a run shares.
struct Context {
    split: Arc<SplitModel>,
    config: SplitConfig,
    train: Arc<Dataset>,
    partition: Vec<Vec<usize>>,
    batch_size: usize,
    lr: f32,
    codec: CodecSpec,
}

/// Real SplitFed training of a cut model on partitioned data.
pub struct SplitWorkload {
    ctx: Context,
    server: SplitServer,
    serving: SplitServing,
    started: BTreeMap<TaskId, Started>,
    computed: HashMap<TaskId, Computed>,
    traffic: SplitTraffic,
}

impl SplitWorkload {
    /// Cuts the model initialised with `setup.seed` as `[split]` says.
    pub fn new(setup: SplitSetup) -> Result<Self, SimError> {
        let split = Arc::new(setup.split.cut_model(&setup.model)?);
        let whole: Params = setup.model.init_params(setup.seed);
        let (head, tail) = split.params_from_whole(&whole, setup.seed);
        let server = SplitServer::new(
            split.clone(),
            head.into_vec(),
            tail.into_vec(),
            &setup.split,
            setup.lr,
            setup.batch_size,
        )?;
        let profile = SplitProfile::of(&split);
        let whole_flops = setup.model.training_flops_per_sample().max(1) as f64;
        let b = setup.batch_size as f64;
        let serving = SplitServing {
            head_forward: profile.head_forward_flops as f64 / whole_flops,
            head_backward: profile
                .head_training_flops
                .saturating_sub(profile.head_forward_flops) as f64
                / whole_flops,
            server_step_s: profile.tail_training_flops as f64 * b / (setup.server.gflops * 1e9),
            lanes: setup.server.lanes.max(1),
            in_turn: setup.split.variant == SplitVariant::V2,
        };
        Ok(Self {
            ctx: Context {
                split,
                config: setup.split,
                train: setup.train,
                partition: setup.partition,
                batch_size: setup.batch_size,
                lr: setup.lr,
                codec: setup.codec,
            },
            server,
            serving,
            started: BTreeMap::new(),
            computed: HashMap::new(),
            traffic: SplitTraffic::default(),
        })
    }

    /// The cut model.
    pub fn split_model(&self) -> &Arc<SplitModel> {
        &self.ctx.split
    }

    /// The global head and tail.
    pub fn params(&self) -> (&[f32], &[f32]) {
        (self.server.head(), self.server.tail())
    }

    /// How the engine charges split steps.
    pub fn serving(&self) -> SplitServing {
        self.serving
    }

    /// Traffic of the tasks folded so far.
    pub fn traffic(&self) -> SplitTraffic {
        self.traffic
    }

    /// Split inference of the global model on `data`, through the activation codec.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<SplitEvaluation, SimError> {
        Ok(inference::evaluate(
            &self.ctx.split,
            self.server.head(),
            self.server.tail(),
            &self.ctx.config.activations,
            data,
            batch_size,
        )?)
    }

    fn compute_started(&mut self) -> Result<(), SimError> {
        let started = std::mem::take(&mut self.started);
        let ctx = &self.ctx;
        let results: Vec<(TaskId, Result<Computed, SimError>)> = started
            .into_iter()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(task, s)| (task, ctx.compute(task, s, None)))
            .collect();
        for (task, result) in results {
            self.computed.insert(task, result?);
        }
        Ok(())
    }
}

impl Context {
    fn compute(
        &self,
        task: TaskId,
        started: Started,
        tail: Option<&mut TailSession>,
    ) -> Result<Computed, SimError> {
        let seed = started.seed;
        let mut head = self
            .config
            .head_runner(self.split.clone(), started.head, self.lr, self.batch_size);
        let mut order = BatchOrder::new(self.partition[started.client].clone(), self.batch_size, seed);
        let mut own = started.session;
        let session = match (own.as_mut(), tail) {
            (Some(s), _) => s,
            (None, Some(shared)) => shared,
            (None, None) => return Err(SimError::UnknownTask(task)),
        };
        let trace = run_task(
            &mut head,
            session,
            &self.train,
            &mut order,
            started.local_steps,
            self.config.pipeline,
        )?;
        let payload = head.encode_update(&self.codec, seed)?;
        let layout = self.split.head.layout();
        // One part announced, so one part decoded.
        let mut decoded = shoal_engine::decode_upload(&payload, &[payload.len() as u64], layout)?;
        Ok(Computed {
            head_delta: decoded.swap_remove(0),
            session: own,
            trace,
            upload_bytes: payload.len() as u64,
        })
    }
}

impl Workload for SplitWorkload {
    fn download_bytes(&self) -> u64 {
        (self.server.head().len() * 4) as u64
    }

    fn start(&mut self, task: TaskId, client: usize, local_steps: u32, seed: u64) -> Result<(), SimError> {
        if client >= self.ctx.partition.len() {
            return Err(SimError::UnknownTask(task));
        }
        self.started.insert(
            task,
            Started {
                client,
                local_steps,
                head: self.server.head().to_vec(),
                session: self.server.session(),
                seed,
            },
        );
        Ok(())
    }

    fn split_serving(&self) -> Option<SplitServing> {
        Some(self.serving)
    }

    fn split_steps(&mut self, task: TaskId) -> Result<SplitSteps, SimError> {
        if !self.computed.contains_key(&task) {
            match self.ctx.config.variant {
                SplitVariant::V1 => self.compute_started()?,
                SplitVariant::V2 => {
                    let started = self.started.remove(&task).ok_or(SimError::UnknownTask(task))?;
                    let computed = self.ctx.compute(task, started, self.server.shared_session())?;
                    self.computed.insert(task, computed);
                }
            }
        }
        let done = self.computed.get(&task).ok_or(SimError::UnknownTask(task))?;
        Ok(SplitSteps {
            up: done.trace.up_bytes.clone(),
            down: done.trace.down_bytes.clone(),
        })
    }

    fn finish(&mut self, task: TaskId) -> Result<Finished, SimError> {
        let done = self.computed.get(&task).ok_or(SimError::UnknownTask(task))?;
        Ok(Finished {
            upload_bytes: done.upload_bytes,
            loss: done.trace.mean_loss,
        })
    }

    fn delivered(&mut self, _: TaskId) -> Result<(), SimError> {
        Ok(())
    }

    fn forget(&mut self, task: TaskId) {
        self.started.remove(&task);
        self.computed.remove(&task);
    }

    fn fold(&mut self, task: TaskId, weight: f64) -> Result<(), SimError> {
        let done = self.computed.remove(&task).ok_or(SimError::UnknownTask(task))?;
        self.server
            .fold(&done.head_delta, done.session.as_ref(), weight)?;
        self.traffic.samples += done.trace.samples;
        self.traffic.forward_bytes += done.trace.up_bytes.iter().sum::<u64>();
        self.traffic.gradient_bytes += done.trace.down_bytes.iter().sum::<u64>();
        Ok(())
    }

    fn aggregate(&mut self, _: usize, _: usize) -> Result<(), SimError> {
        self.server.aggregate();
        Ok(())
    }
}
