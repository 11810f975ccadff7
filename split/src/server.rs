//! The server side of split learning: tails that answer forward messages with gradients, and the
//! SplitFed main server + fed server that average what a round trained.
//!
//! - [`TailSession`]: one tail and its optimiser. [`TailSession::serve`] decodes a forward message,
//!   runs the tail, takes one SGD step and returns the encoded gradient at the cut.
//! - [`SplitServer`]: the global head and tail. SplitFed V1 hands every task a private
//!   [`TailSession`] copied from the global tail; when the task is folded, its head update and its
//!   tail's movement enter two accumulators with the same weight, and [`SplitServer::aggregate`]
//!   moves both to their weighted means. SplitFed V2 keeps one shared session that every task uses
//!   in turn; only heads are averaged. Sums are f64 ([`shoal_aggregators::Accumulator`]): heads and
//!   tails may be folded eagerly, in any order, on any number of workers.

use crate::config::{SplitConfig, SplitVariant};
use crate::error::SplitError;
use ndarray::{ArrayD, IxDyn};
use shoal_aggregators::Accumulator;
use shoal_compression::cut::{CutCodec, CutLimits, decode_cut, encode_cut};
use shoal_model::Workspace;
use shoal_model::loss::{BatchLoss, softmax_cross_entropy};
use shoal_model::split::SplitModel;
use shoal_model::train::{Sgd, SgdConfig};
use std::sync::Arc;

/// One server-side tail and its optimiser.
pub struct TailSession {
    model: Arc<SplitModel>,
    params: Vec<f32>,
    start: Vec<f32>,
    sgd: Sgd,
    workspace: Workspace,
    grads: Vec<f32>,
    gradients: CutCodec,
    limits: CutLimits,
    steps: u64,
}

/// What serving one forward message produced.
#[derive(Debug, Clone)]
pub struct Served {
    /// The encoded gradient at the cut, for the device.
    pub gradient: Vec<u8>,
    /// Loss and correct predictions of the batch.
    pub loss: BatchLoss,
    /// Samples in the batch.
    pub batch: usize,
}

impl TailSession {
    /// A tail starting from `params`, training with `sgd`, answering with `gradients`-encoded
    /// messages, for minibatches of at most `max_batch` samples.
    pub fn new(
        model: Arc<SplitModel>,
        params: Vec<f32>,
        sgd: SgdConfig,
        gradients: CutCodec,
        max_batch: usize,
    ) -> Self {
        let limits = CutLimits::for_batches(max_batch, model.wire_shape().iter().product());
        Self {
            sgd: Sgd::new(sgd, model.tail.layout()),
            workspace: model.tail.workspace(),
            grads: vec![0.0; model.tail.num_params()],
            start: params.clone(),
            params,
            model,
            gradients,
            limits,
            steps: 0,
        }
    }

    /// The tail's current weights.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Minibatches served.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Limits on the forward messages this tail accepts.
    pub fn limits(&self) -> CutLimits {
        self.limits
    }

    /// Serves one forward message: decodes the activations and labels, runs the tail, steps the
    /// optimiser, and returns the gradient at the cut encoded with the gradient codec.
    pub fn serve(&mut self, message: &[u8]) -> Result<Served, SplitError> {
        let forward = decode_cut(message, &self.limits)?;
        let wire = self.model.wire_shape();
        if forward.shape.len() != wire.len() + 1 || forward.shape[1..] != *wire {
            return Err(SplitError::Shape {
                expected: wire.to_vec(),
                actual: forward.shape.get(1..).unwrap_or_default().to_vec(),
            });
        }
        let batch = forward.shape[0];
        if forward.labels.len() != batch {
            return Err(SplitError::Labels {
                labels: forward.labels.len(),
                batch,
            });
        }
        let tail = &self.model.tail;
        tail.check_labels(&forward.labels, batch)?;
        let a = ArrayD::from_shape_vec(IxDyn(&forward.shape), forward.values)
            .map_err(|e| SplitError::Config(e.to_string()))?;
        let logits = tail.forward(&self.params, a, &mut self.workspace, true)?;
        let (loss, grad) = softmax_cross_entropy(&logits, &forward.labels, true);
        if !loss.mean_loss.is_finite() {
            return Err(SplitError::Diverged(loss.mean_loss));
        }
        let grad = grad.ok_or_else(|| SplitError::Config("the loss returned no gradient".into()))?;
        let at_cut = tail
            .backward(&self.params, &mut self.workspace, grad, &mut self.grads, true)?
            .ok_or_else(|| SplitError::Config("the tail returned no gradient at the cut".into()))?;
        self.sgd.step(tail.layout(), &mut self.params, &self.grads);
        self.steps += 1;
        let at_cut = at_cut.as_standard_layout();
        let values = at_cut
            .as_slice()
            .ok_or_else(|| SplitError::Config("gradient not contiguous".into()))?;
        let gradient = encode_cut(&self.gradients, at_cut.shape(), values, &[])?;
        Ok(Served {
            gradient,
            loss,
            batch,
        })
    }

    /// How far the tail moved since the session began.
    pub fn delta(&self) -> Vec<f32> {
        self.params.iter().zip(&self.start).map(|(p, s)| p - s).collect()
    }
}

/// SplitFed's main server (tails) and fed server (heads).
pub struct SplitServer {
    model: Arc<SplitModel>,
    config: SplitConfig,
    lr: f32,
    max_batch: usize,
    head: Vec<f32>,
    tail: Vec<f32>,
    shared: Option<TailSession>,
    head_sum: Accumulator,
    tail_sum: Accumulator,
}

impl SplitServer {
    /// A server starting from `head` and `tail`, training tails at learning rate `lr`, accepting
    /// minibatches of at most `max_batch` samples.
    pub fn new(
        model: Arc<SplitModel>,
        head: Vec<f32>,
        tail: Vec<f32>,
        config: &SplitConfig,
        lr: f32,
        max_batch: usize,
    ) -> Result<Self, SplitError> {
        config.validate()?;
        if head.len() != model.head.num_params() || tail.len() != model.tail.num_params() {
            return Err(SplitError::Config(format!(
                "initial weights of {} + {} values for a head of {} and a tail of {}",
                head.len(),
                tail.len(),
                model.head.num_params(),
                model.tail.num_params()
            )));
        }
        let shared = (config.variant == SplitVariant::V2)
            .then(|| config.tail_session(model.clone(), tail.clone(), lr, max_batch));
        Ok(Self {
            head_sum: Accumulator::new(1, head.len()),
            tail_sum: Accumulator::new(1, tail.len()),
            model,
            config: config.clone(),
            lr,
            max_batch,
            head,
            tail,
            shared,
        })
    }

    /// The cut model.
    pub fn model(&self) -> &Arc<SplitModel> {
        &self.model
    }

    /// SplitFed V1 or V2.
    pub fn variant(&self) -> SplitVariant {
        self.config.variant
    }

    /// The global head: what a device downloads to start a task.
    pub fn head(&self) -> &[f32] {
        &self.head
    }

    /// The global tail (V2: the shared tail as it is now).
    pub fn tail(&self) -> &[f32] {
        self.shared.as_ref().map_or(&self.tail, |s| &s.params)
    }

    /// V1: a private tail for one task, copied from the global tail. `None` under V2, whose tasks
    /// use [`SplitServer::shared_session`].
    pub fn session(&self) -> Option<TailSession> {
        (self.config.variant == SplitVariant::V1).then(|| {
            self.config
                .tail_session(self.model.clone(), self.tail.clone(), self.lr, self.max_batch)
        })
    }

    /// V2: the one tail every task uses in turn. `None` under V1.
    pub fn shared_session(&mut self) -> Option<&mut TailSession> {
        self.shared.as_mut()
    }

    /// Folds one task's head update and (V1) its tail session with `weight`.
    pub fn fold(
        &mut self,
        head_delta: &[f32],
        tail: Option<&TailSession>,
        weight: f64,
    ) -> Result<(), SplitError> {
        self.head_sum.check(&[head_delta], weight)?;
        let tail_delta = match (self.config.variant, tail) {
            (SplitVariant::V1, Some(session)) => Some(session.delta()),
            (SplitVariant::V1, None) => {
                return Err(SplitError::Config(
                    "a SplitFed V1 task is folded with its tail session".into(),
                ));
            }
            (SplitVariant::V2, _) => None,
        };
        if let Some(delta) = &tail_delta {
            self.tail_sum.check(&[delta], weight)?;
            self.tail_sum.fold(&[delta], weight)?;
        }
        self.head_sum.fold(&[head_delta], weight)?;
        Ok(())
    }

    /// Moves the head (and under V1 the tail) to the weighted mean of what was folded; returns
    /// whether anything was.
    pub fn aggregate(&mut self) -> bool {
        let Some(head_mean) = self.head_sum.weighted_mean(0) else {
            return false;
        };
        for (x, d) in self.head.iter_mut().zip(head_mean) {
            *x += d as f32;
        }
        if let Some(tail_mean) = self.tail_sum.weighted_mean(0) {
            for (x, d) in self.tail.iter_mut().zip(tail_mean) {
                *x += d as f32;
            }
        }
        self.head_sum.reset();
        self.tail_sum.reset();
        true
    }
}
