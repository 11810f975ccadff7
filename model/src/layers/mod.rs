//! The layers of Shoal's neural-network engine and what they share.
//!
//! Activations are ndarray arrays with the batch as the first axis; images are NHWC
//! (`[batch, height, width, channels]`). A layer never owns its parameters: it reads them from its
//! slice of the model's flat [`shoal_core::Params`] buffer and writes their gradients into the same
//! range of a flat gradient buffer with the same layout.

mod conv2d;
mod dense;
mod flatten;
mod maxpool;
mod relu;

pub use conv2d::Conv2d;
pub use dense::Dense;
pub use flatten::Flatten;
pub use maxpool::MaxPool2d;
pub use relu::Relu;

use ndarray::ArrayD;
use rand::Rng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};

/// One tensor a layer owns: its name suffix (`weight`, `bias`) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Suffix appended to the layer name, e.g. `weight` gives `conv1.weight`.
    pub suffix: &'static str,
    /// Tensor shape.
    pub shape: Vec<usize>,
}

/// What a layer keeps between its forward and backward pass. One per layer, reused across batches so
/// large scratch buffers (im2col columns) are allocated once.
#[derive(Debug, Default)]
pub struct LayerCache {
    /// The input (dense), or the output (ReLU), of the last forward pass.
    pub(crate) saved: Option<ArrayD<f32>>,
    /// im2col columns of the last convolution forward pass.
    pub(crate) cols: Vec<f32>,
    /// For each max-pool output, the index of the winning input within its sample.
    pub(crate) argmax: Vec<usize>,
    /// Input shape of the last forward pass (batch included).
    pub(crate) input_shape: Vec<usize>,
    /// Scratch for the convolution's column gradients.
    pub(crate) scratch: Vec<f32>,
}

/// A layer of a sequential network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    /// Fully connected.
    Dense(Dense),
    /// 2-D convolution (NHWC) through im2col and a matrix multiply.
    Conv2d(Conv2d),
    /// 2-D max pooling.
    MaxPool2d(MaxPool2d),
    /// Rectified linear unit.
    Relu(Relu),
    /// Collapses all per-sample axes into one.
    Flatten(Flatten),
}

impl Layer {
    /// The layer's unique name within its model.
    pub fn name(&self) -> &str {
        match self {
            Layer::Dense(l) => &l.name,
            Layer::Conv2d(l) => &l.name,
            Layer::MaxPool2d(l) => &l.name,
            Layer::Relu(l) => &l.name,
            Layer::Flatten(l) => &l.name,
        }
    }

    /// The tensors the layer owns, in buffer order.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        match self {
            Layer::Dense(l) => l.param_specs(),
            Layer::Conv2d(l) => l.param_specs(),
            Layer::MaxPool2d(_) | Layer::Relu(_) | Layer::Flatten(_) => Vec::new(),
        }
    }

    /// Per-sample output shape for a per-sample input shape, or why the input does not fit.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        match self {
            Layer::Dense(l) => l.output_shape(input),
            Layer::Conv2d(l) => l.output_shape(input),
            Layer::MaxPool2d(l) => l.output_shape(input),
            Layer::Relu(_) => Ok(input.to_vec()),
            Layer::Flatten(_) => Ok(vec![input.iter().product()]),
        }
    }

    /// Multiply-add FLOPs (2 per multiply-add) of one sample's forward pass.
    pub fn forward_flops(&self, input: &[usize]) -> u64 {
        match self {
            Layer::Dense(l) => 2 * (l.inputs * l.outputs) as u64,
            Layer::Conv2d(l) => match l.output_shape(input) {
                Ok(out) => {
                    2 * (out[0] * out[1] * l.kernel * l.kernel * l.in_channels * l.out_channels) as u64
                }
                Err(_) => 0,
            },
            Layer::MaxPool2d(_) | Layer::Relu(_) | Layer::Flatten(_) => 0,
        }
    }

    /// Writes the layer's initial parameters (He-uniform weights, zero biases) into `params`.
    pub fn init(&self, params: &mut [f32], rng: &mut impl Rng) {
        let fan_in = match self {
            Layer::Dense(l) => l.inputs,
            Layer::Conv2d(l) => l.kernel * l.kernel * l.in_channels,
            Layer::MaxPool2d(_) | Layer::Relu(_) | Layer::Flatten(_) => return,
        };
        let weights = params.len() - self.param_specs().last().map_or(0, |b| b.shape.iter().product());
        let bound = (6.0 / fan_in as f32).sqrt();
        let uniform = Uniform::new_inclusive(-bound, bound).expect("He bound is finite and positive");
        for w in &mut params[..weights] {
            *w = uniform.sample(rng);
        }
        params[weights..].fill(0.0);
    }

    /// Forward pass of a batch. `params` is the layer's slice of the flat buffer. With `train` set,
    /// the layer keeps in `cache` what its backward pass needs.
    pub fn forward(
        &self,
        params: &[f32],
        input: ArrayD<f32>,
        cache: &mut LayerCache,
        train: bool,
    ) -> ArrayD<f32> {
        cache.input_shape.clear();
        cache.input_shape.extend_from_slice(input.shape());
        match self {
            Layer::Dense(l) => l.forward(params, input, cache, train),
            Layer::Conv2d(l) => l.forward(params, input, cache),
            Layer::MaxPool2d(l) => l.forward(input, cache),
            Layer::Relu(l) => l.forward(input, cache, train),
            Layer::Flatten(l) => l.forward(input),
        }
    }

    /// Backward pass: writes parameter gradients into `grads` (the layer's slice of the flat gradient
    /// buffer, overwritten) and returns the gradient with respect to the input when `need_input_grad`.
    pub fn backward(
        &self,
        params: &[f32],
        cache: &mut LayerCache,
        grad_out: ArrayD<f32>,
        grads: &mut [f32],
        need_input_grad: bool,
    ) -> Option<ArrayD<f32>> {
        match self {
            Layer::Dense(l) => l.backward(params, cache, grad_out, grads, need_input_grad),
            Layer::Conv2d(l) => l.backward(params, cache, grad_out, grads, need_input_grad),
            Layer::MaxPool2d(l) => need_input_grad.then(|| l.backward(cache, grad_out)),
            Layer::Relu(l) => need_input_grad.then(|| l.backward(cache, grad_out)),
            Layer::Flatten(l) => need_input_grad.then(|| l.backward(cache, grad_out)),
        }
    }
}

/// The contiguous values of an activation array. Every array the engine passes between layers is
/// in standard (row-major) layout; the model converts its input once at the entry.
pub(crate) fn values(x: &ArrayD<f32>) -> &[f32] {
    x.as_slice().expect("activations are kept in standard layout")
}

/// Column sums of a row-major `rows × cols` matrix, written into `out` (bias gradients).
pub(crate) fn column_sums(x: &[f32], cols: usize, out: &mut [f32]) {
    out.fill(0.0);
    for row in x.chunks_exact(cols) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// Adds `bias` to every row of a row-major matrix with `bias.len()` columns.
pub(crate) fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

#[cfg(test)]
pub(crate) mod gradient_check;
