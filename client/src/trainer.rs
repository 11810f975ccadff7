//! What a device computes for one task: the method's client rule on its local data from the
//! broadcast it received, and the encoded payloads of what the rule uploads, through the engine's
//! `run_task` — the code fl-sim runs for a simulated device.

use anyhow::{Context, Result, ensure};
use shoal_aggregators::{Broadcast, ClientRule, LocalTask, RuleConfig};
use shoal_compression::CodecSpec;
use shoal_compression::feedback::Feedback;
use shoal_core::{ClientId, ModelVersion, TaskId, UpdateMeta};
use shoal_engine::{DeviceState, DeviceTask, run_task};
use shoal_model::split::SplitModel;
use shoal_model::{Model, ModelOracle};
use shoal_net::protocol::RunDescription;
use shoal_split::SplitConfig;
use std::sync::Arc;
use std::time::Instant;

use crate::local_data::LocalData;

/// A task as the server gave it.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// The task.
    pub task: TaskId,
    /// The version trained from.
    pub version: ModelVersion,
    /// Local steps.
    pub local_steps: u32,
    /// Local learning rate.
    pub lr: f32,
    /// Codec chain of the upload.
    pub codec: String,
    /// Error feedback around the codec (`none`, `ef`).
    pub feedback: String,
    /// The task's seed, as the server's Coordinator gave it: minibatches and random codec stages
    /// draw from it, as they do in fl-sim.
    pub seed: u64,
}

/// A finished task, ready to send (and to resend after a reconnection or a restart).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncodedUpdate {
    /// Metadata for the Coordinator.
    pub meta: UpdateMeta,
    /// One encoded payload per uploaded part.
    pub parts: Vec<Vec<u8>>,
    /// The device state (rule state, feedback memory) to keep once the server has the update.
    pub next_state: DeviceState,
}

impl EncodedUpdate {
    /// Total payload bytes.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }
}

/// A split-learning run as the device sees it: the cut model and the `[split]` table.
pub struct SplitRole {
    /// The cut model (the device runs its head).
    pub model: Arc<SplitModel>,
    /// The server's `[split]` table.
    pub config: SplitConfig,
}

/// Trains tasks for one device.
pub struct Trainer {
    client: ClientId,
    model: Arc<Model>,
    rule: Box<dyn ClientRule>,
    data: LocalData,
    batch_size: usize,
    split: Option<SplitRole>,
}

impl Trainer {
    /// A trainer for the run the server described, on `data`; fails when the local data does not
    /// fit the server's model.
    pub fn new(client: ClientId, run: &RunDescription, data: LocalData) -> Result<Self> {
        let rule: RuleConfig =
            serde_json::from_str(&run.rule_json).context("the server's rule is not one this client knows")?;
        let algorithm = rule.build().context("building the client rule")?;
        let model = shoal_model::zoo::build(
            &run.model,
            data.dataset.sample_shape(),
            data.dataset.num_classes(),
        )
        .with_context(|| format!("building `{}`", run.model))?;
        let split = match &run.split_json {
            Some(json) => {
                let config: SplitConfig = serde_json::from_str(json)
                    .context("the server's [split] table is not one this client knows")?;
                let cut = config
                    .cut_model(&model)
                    .context("cutting the model as the server does")?;
                Some(SplitRole {
                    model: Arc::new(cut),
                    config,
                })
            }
            None => None,
        };
        let trained = split
            .as_ref()
            .map_or(model.num_params(), |s| s.model.head.num_params());
        ensure!(
            trained as u64 == run.dim,
            "`{}` on this device's data has {trained} parameters to train, the server's has {}: the local data has another shape",
            run.model,
            run.dim
        );
        ensure!(!data.indices.is_empty(), "this device has no training samples");
        Ok(Self {
            client,
            model: Arc::new(model),
            rule: algorithm.client,
            data,
            batch_size: run.batch_size.max(1) as usize,
            split,
        })
    }

    /// The split role, in a split-learning run.
    pub fn split(&self) -> Option<&SplitRole> {
        self.split.as_ref()
    }

    /// The device's samples.
    pub fn data(&self) -> &LocalData {
        &self.data
    }

    /// Local minibatch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The metadata of an update of `spec` computed since `started`.
    pub fn meta(&self, spec: &TaskSpec, local_steps: u32, loss: f32, started: Instant) -> UpdateMeta {
        UpdateMeta {
            client: self.client,
            task: spec.task,
            base_version: spec.version,
            num_samples: self.num_samples(),
            local_steps,
            loss,
            duration_s: started.elapsed().as_secs_f64(),
        }
    }

    /// Training samples held.
    pub fn num_samples(&self) -> u64 {
        self.data.indices.len() as u64
    }

    /// Parameters the device trains and receives (a split run's: the head's).
    pub fn dim(&self) -> usize {
        self.split
            .as_ref()
            .map_or(self.model.num_params(), |s| s.model.head.num_params())
    }

    /// Runs `spec` from `broadcast` with the client's persistent `state` and encodes the upload;
    /// the state to keep once the server has the update comes back in it.
    pub fn train(
        &self,
        spec: &TaskSpec,
        broadcast: &Broadcast,
        state: &DeviceState,
    ) -> Result<EncodedUpdate> {
        let started = Instant::now();
        let seed = spec.seed;
        let codec: CodecSpec = spec
            .codec
            .parse()
            .with_context(|| format!("the server's codec `{}`", spec.codec))?;
        let feedback: Feedback = spec
            .feedback
            .parse()
            .map_err(|e: String| anyhow::anyhow!("the server's feedback: {e}"))?;
        let mut oracle = ModelOracle::new(
            self.model.clone(),
            self.data.dataset.clone(),
            self.data.indices.clone(),
            self.batch_size,
            seed,
        );
        let mut state = state.clone();
        let layout = self.model.layout().clone();
        let task = DeviceTask {
            rule: self.rule.as_ref(),
            local: LocalTask {
                local_steps: spec.local_steps,
                lr: spec.lr,
            },
            broadcast,
            codec: &codec,
            feedback,
            layout: &layout,
            seed,
        };
        let update = run_task(&task, &mut state, &mut oracle).context("local training")?;
        Ok(EncodedUpdate {
            meta: self.meta(spec, update.local_steps, update.mean_loss, started),
            parts: update.payloads,
            next_state: state,
        })
    }
}
