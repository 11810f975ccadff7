//! The workloads the engine runs: real federated training ([`TrainingWorkload`]) and sizes only
//! ([`SystemsWorkload`], for fleets of 10⁵–10⁶ devices).
//!
//! In a training run every task really trains: the client rule runs its local steps on the
//! device's partition through a [`ModelOracle`], the upload is encoded with the experiment's codec,
//! and the server folds what it decodes from those bytes — so accuracy and bytes are both real.
//! Tasks that have started are computed together, in parallel, when the first of them is needed;
//! each depends only on the broadcast it started from, its client's state at that moment, and a
//! seed the Coordinator gave it, so the result is the same whatever the batching or thread count.
//! A client's persistent state (control variates, momentum) moves only when its upload is
//! delivered; a cancelled or lost task leaves it as it was.

use crate::engine::{Finished, SimError, Workload};
use rayon::prelude::*;
use shoal_aggregators::{Algorithm, AlgorithmConfig, Broadcast, ServerState};
use shoal_compression::CodecSpec;
use shoal_compression::feedback::Feedback;
use shoal_core::{Layout, TaskId};
use shoal_engine::{Contribution, DeviceState, DeviceTask, InPlace, Population, ServerCore, run_task};
use shoal_model::data::Dataset;
use shoal_model::train::{Evaluation, evaluate};
use shoal_model::{Model, ModelOracle};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A started task waiting to be computed.
struct Started {
    client: usize,
    local_steps: u32,
    broadcast: Broadcast,
    state: DeviceState,
    /// The task's seed, as the Coordinator gave it.
    seed: u64,
}

/// A computed task: what the server decodes, and the client's state if it is delivered.
struct Computed {
    client: usize,
    parts: Vec<Vec<f32>>,
    bytes: u64,
    loss: f32,
    state: DeviceState,
}

/// What every task of a run shares.
struct Shared {
    model: Arc<Model>,
    train: Arc<Dataset>,
    partition: Vec<Vec<usize>>,
    batch_size: usize,
    algorithm: Algorithm,
    config: AlgorithmConfig,
    codec: CodecSpec,
    feedback: Feedback,
    layout: Arc<Layout>,
}

impl Shared {
    fn compute(&self, started: Started) -> Result<Computed, SimError> {
        let seed = started.seed;
        let mut oracle = ModelOracle::new(
            self.model.clone(),
            self.train.clone(),
            self.partition[started.client].clone(),
            self.batch_size,
            seed,
        );
        let mut state = started.state;
        let device = DeviceTask {
            rule: self.algorithm.client.as_ref(),
            local: self.config.local_task(started.local_steps),
            broadcast: &started.broadcast,
            codec: &self.codec,
            feedback: self.feedback,
            layout: &self.layout,
            seed,
        };
        let update = run_task(&device, &mut state, &mut oracle)?;
        Ok(Computed {
            client: started.client,
            bytes: update.bytes(),
            parts: update.decoded,
            loss: update.mean_loss,
            state,
        })
    }
}

/// Real federated training of a model on partitioned data.
pub struct TrainingWorkload {
    shared: Shared,
    /// The server side: the rule's state and the aggregation in progress.
    core: ServerCore<InPlace>,
    clients: Vec<DeviceState>,
    broadcast: Broadcast,
    download_bytes: u64,
    started: BTreeMap<TaskId, Started>,
    computed: HashMap<TaskId, Computed>,
}

/// What a training run is made of.
pub struct TrainingSetup {
    /// The network.
    pub model: Arc<Model>,
    /// Training samples, shared by all clients.
    pub train: Arc<Dataset>,
    /// Each client's sample indices.
    pub partition: Vec<Vec<usize>>,
    /// Local minibatch size.
    pub batch_size: usize,
    /// The method.
    pub config: AlgorithmConfig,
    /// The upload codec.
    pub codec: CodecSpec,
    /// Error feedback around it; each simulated client keeps its own memory across its tasks.
    pub feedback: Feedback,
    /// Seed of the initial model and of every task.
    pub seed: u64,
}

impl TrainingWorkload {
    /// Starts from the model initialised with `setup.seed`.
    pub fn new(setup: TrainingSetup) -> Result<Self, SimError> {
        let (algorithm, _) = setup.config.build(setup.seed)?;
        let x0 = setup.model.init_params(setup.seed).as_slice().to_vec();
        let state = algorithm.server.init_state(x0);
        let core = ServerCore::new(algorithm.server.clone(), setup.config.clone(), state, InPlace);
        let broadcast = core.broadcast();
        let clients = vec![DeviceState::default(); setup.partition.len()];
        Ok(Self {
            download_bytes: broadcast.bytes(),
            broadcast,
            core,
            clients,
            shared: Shared {
                layout: setup.model.layout().clone(),
                model: setup.model,
                train: setup.train,
                partition: setup.partition,
                batch_size: setup.batch_size,
                algorithm,
                config: setup.config,
                codec: setup.codec,
                feedback: setup.feedback,
            },
            started: BTreeMap::new(),
            computed: HashMap::new(),
        })
    }

    /// The global model.
    pub fn model_params(&self) -> &[f32] {
        &self.core.state().x
    }

    /// The network.
    pub fn model(&self) -> &Model {
        &self.shared.model
    }

    /// The server rule's state: the model and the global vectors the rule keeps.
    pub fn server_state(&self) -> &ServerState {
        self.core.state()
    }

    /// The network, shared.
    pub fn shared_model(&self) -> Arc<Model> {
        self.shared.model.clone()
    }

    /// Accuracy and loss of the global model on `data`.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<Evaluation, SimError> {
        Ok(evaluate(
            &self.shared.model,
            &self.core.state().x,
            data,
            batch_size,
        )?)
    }

    /// Computes every started task, in parallel.
    fn compute_started(&mut self) -> Result<(), SimError> {
        let started = std::mem::take(&mut self.started);
        let shared = &self.shared;
        let results: Vec<(TaskId, Result<Computed, SimError>)> = started
            .into_iter()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(task, s)| (task, shared.compute(s)))
            .collect();
        for (task, result) in results {
            self.computed.insert(task, result?);
        }
        Ok(())
    }
}

impl Workload for TrainingWorkload {
    fn download_bytes(&self) -> u64 {
        self.download_bytes
    }

    fn start(&mut self, task: TaskId, client: usize, local_steps: u32, seed: u64) -> Result<(), SimError> {
        let state = self
            .clients
            .get(client)
            .cloned()
            .ok_or(SimError::UnknownTask(task))?;
        self.started.insert(
            task,
            Started {
                client,
                local_steps,
                broadcast: self.broadcast.clone(),
                state,
                seed,
            },
        );
        Ok(())
    }

    fn finish(&mut self, task: TaskId) -> Result<Finished, SimError> {
        if !self.computed.contains_key(&task) {
            self.compute_started()?;
        }
        let done = self.computed.get(&task).ok_or(SimError::UnknownTask(task))?;
        Ok(Finished {
            upload_bytes: done.bytes,
            loss: done.loss,
        })
    }

    fn delivered(&mut self, task: TaskId) -> Result<(), SimError> {
        let done = self.computed.remove(&task).ok_or(SimError::UnknownTask(task))?;
        self.clients[done.client] = done.state;
        self.core
            .hold(task, Contribution::Upload(Arc::from(done.parts)), done.loss);
        Ok(())
    }

    fn forget(&mut self, task: TaskId) {
        self.started.remove(&task);
        self.computed.remove(&task);
        self.core.discard(task);
    }

    fn fold(&mut self, task: TaskId, weight: f64) -> Result<(), SimError> {
        match self.core.fold(task, weight, 0)? {
            Some(_) => Ok(()),
            None => Err(SimError::UnknownTask(task)),
        }
    }

    fn aggregate(&mut self, num_clients: usize, previous_num_clients: usize) -> Result<(), SimError> {
        self.core.aggregate(Population {
            num_clients,
            previous_num_clients,
        })?;
        self.core.take_folded();
        self.broadcast = self.core.broadcast();
        self.download_bytes = self.broadcast.bytes();
        Ok(())
    }
}

/// Sizes only: every download is the dense model, every upload the size the codec gives a
/// typical update of the model; nothing is trained or folded.
#[derive(Debug, Clone, Copy)]
pub struct SystemsWorkload {
    /// Bytes per download.
    pub download_bytes: u64,
    /// Bytes per upload.
    pub upload_bytes: u64,
}

impl SystemsWorkload {
    /// Sizes for `layout` under `codec`: the upload is a real encoding of a Gaussian vector with the
    /// model's layout (what a dense update looks like to a codec).
    pub fn for_model(layout: &Arc<Layout>, codec: &CodecSpec, seed: u64) -> Result<Self, SimError> {
        Ok(Self {
            download_bytes: (layout.len() * 4) as u64,
            upload_bytes: shoal_engine::device::typical_upload_bytes(layout, codec, seed)?,
        })
    }
}

impl Workload for SystemsWorkload {
    fn download_bytes(&self) -> u64 {
        self.download_bytes
    }
    fn start(&mut self, _: TaskId, _: usize, _: u32, _: u64) -> Result<(), SimError> {
        Ok(())
    }
    fn finish(&mut self, _: TaskId) -> Result<Finished, SimError> {
        Ok(Finished {
            upload_bytes: self.upload_bytes,
            loss: 0.0,
        })
    }
    fn delivered(&mut self, _: TaskId) -> Result<(), SimError> {
        Ok(())
    }
    fn forget(&mut self, _: TaskId) {}
    fn fold(&mut self, _: TaskId, _: f64) -> Result<(), SimError> {
        Ok(())
    }
    fn aggregate(&mut self, _: usize, _: usize) -> Result<(), SimError> {
        Ok(())
    }
}
