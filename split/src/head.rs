//! The device side of split learning: the head network, its optimiser, and the batches in flight.
//!
//! [`HeadRunner::forward`] runs the head on a minibatch and returns the forward message
//! (activations + labels, encoded with the activation codec); [`HeadRunner::backward`] takes the
//! server's gradient message for the oldest batch in flight, back-propagates it through the head
//! and steps the optimiser. Several forwards may run before their gradients return (pipelining):
//! each batch keeps its own workspace and, when the head moved since its forward, the weights it
//! used, so its backward pass is the exact gradient of the forward that was sent.

use crate::error::SplitError;
use ndarray::{ArrayD, IxDyn};
use shoal_compression::cut::{CutCodec, CutLimits, decode_cut, encode_cut};
use shoal_compression::{CodecCompressor, CodecSpec};
use shoal_model::split::SplitModel;
use shoal_model::train::{Sgd, SgdConfig};
use shoal_model::{Model, Workspace};
use std::collections::VecDeque;
use std::sync::Arc;

struct InFlight {
    workspace: Workspace,
    /// The head's weights at the forward pass, kept when another batch was in flight then (its
    /// backward pass may move the weights before this batch's gradient returns).
    weights: Option<Vec<f32>>,
    batch: usize,
}

/// What a device holds for split training or inference.
pub struct HeadRunner {
    model: Arc<SplitModel>,
    params: Vec<f32>,
    start: Vec<f32>,
    sgd: Option<Sgd>,
    codec: CutCodec,
    in_flight: VecDeque<InFlight>,
    spare: Vec<Workspace>,
    grads: Vec<f32>,
    max_batch: usize,
}

impl HeadRunner {
    /// A head that trains with `sgd` from `params`, sending activations with `codec`, for
    /// minibatches of at most `max_batch` samples.
    pub fn new(
        model: Arc<SplitModel>,
        params: Vec<f32>,
        sgd: SgdConfig,
        codec: CutCodec,
        max_batch: usize,
    ) -> Self {
        let optimiser = Sgd::new(sgd, model.head.layout());
        let mut runner = Self::frozen(model, params, codec, max_batch);
        runner.sgd = Some(optimiser);
        runner
    }

    /// A head that never trains (split inference, or a frozen encoder).
    pub fn frozen(model: Arc<SplitModel>, params: Vec<f32>, codec: CutCodec, max_batch: usize) -> Self {
        let grads = vec![0.0; model.head.num_params()];
        Self {
            start: params.clone(),
            params,
            model,
            sgd: None,
            codec,
            in_flight: VecDeque::new(),
            spare: Vec::new(),
            grads,
            max_batch: max_batch.max(1),
        }
    }

    fn head(&self) -> &Model {
        &self.model.head
    }

    /// The head's current weights.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// What the head moved since it was created: the update a device uploads for averaging.
    pub fn delta(&self) -> Vec<f32> {
        self.params.iter().zip(&self.start).map(|(p, s)| p - s).collect()
    }

    /// The head update a device uploads for averaging: [`delta`](Self::delta) encoded with the
    /// run's upload `codec`, seeded with the task's seed (fl-client sends these bytes; fl-sim
    /// decodes them as the server would).
    pub fn encode_update(&self, codec: &CodecSpec, seed: u64) -> Result<Vec<u8>, SplitError> {
        let mut compressor = CodecCompressor::new(codec.clone(), self.head().layout().clone(), seed);
        Ok(compressor.encode(&self.delta())?)
    }

    /// Batches sent whose gradient has not come back.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Runs the head on `x` and returns the encoded forward message carrying `labels` (empty for
    /// inference). A training head keeps the batch until its gradient comes back.
    pub fn forward(&mut self, x: ArrayD<f32>, labels: &[u32]) -> Result<Vec<u8>, SplitError> {
        let batch = x.shape().first().copied().unwrap_or(0);
        if !labels.is_empty() && labels.len() != batch {
            return Err(SplitError::Labels {
                labels: labels.len(),
                batch,
            });
        }
        let train = self.sgd.is_some();
        let mut workspace = self.spare.pop().unwrap_or_else(|| self.model.head.workspace());
        let a = self.model.head.forward(&self.params, x, &mut workspace, train)?;
        let a = a.as_standard_layout();
        let values = a
            .as_slice()
            .ok_or_else(|| SplitError::Config("activations not contiguous".into()))?;
        let message = encode_cut(&self.codec, a.shape(), values, labels)?;
        if train {
            let weights = (!self.in_flight.is_empty()).then(|| self.params.clone());
            self.in_flight.push_back(InFlight {
                workspace,
                weights,
                batch,
            });
        } else {
            self.spare.push(workspace);
        }
        Ok(message)
    }

    /// Limits for the gradient messages this head accepts.
    pub fn gradient_limits(&self) -> CutLimits {
        CutLimits::for_batches(self.max_batch, self.model.wire_shape().iter().product())
    }

    /// Back-propagates the server's gradient message through the oldest batch in flight and steps
    /// the optimiser.
    pub fn backward(&mut self, message: &[u8]) -> Result<(), SplitError> {
        let limits = self.gradient_limits();
        let g = decode_cut(message, &limits)?;
        let Some(sgd) = self.sgd.as_mut() else {
            return Err(SplitError::NothingInFlight);
        };
        let mut flight = self.in_flight.pop_front().ok_or(SplitError::NothingInFlight)?;
        let expected: Vec<usize> = std::iter::once(flight.batch)
            .chain(self.model.wire_shape().iter().copied())
            .collect();
        if g.shape != expected {
            return Err(SplitError::Shape {
                expected,
                actual: g.shape,
            });
        }
        let grad = ArrayD::from_shape_vec(IxDyn(&g.shape), g.values)
            .map_err(|e| SplitError::Config(e.to_string()))?;
        let weights = flight.weights.as_deref().unwrap_or(&self.params);
        self.model
            .head
            .backward(weights, &mut flight.workspace, grad, &mut self.grads, false)?;
        sgd.step(self.model.head.layout(), &mut self.params, &self.grads);
        self.spare.push(flight.workspace);
        Ok(())
    }

    /// Parameters of the head.
    pub fn num_params(&self) -> usize {
        self.head().num_params()
    }
}
