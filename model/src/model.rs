//! A sequential network: layers, the layout of their parameters in one flat buffer, and the
//! forward and backward passes over a batch.

use crate::error::ModelError;
use crate::layers::{Layer, LayerCache};
use crate::loss::{BatchLoss, softmax_cross_entropy};
use ndarray::ArrayD;
use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_core::{Layout, LayoutBuilder, Params, SegmentKind};
use std::ops::Range;
use std::sync::Arc;

/// A sequential network whose parameters live in one flat buffer described by [`Model::layout`].
#[derive(Debug, Clone)]
pub struct Model {
    name: String,
    layers: Vec<Layer>,
    /// `shapes[i]` is the per-sample input shape of layer `i`; the last entry is the output shape.
    shapes: Vec<Vec<usize>>,
    param_ranges: Vec<Range<usize>>,
    layout: Arc<Layout>,
}

/// Per-layer state kept between a forward and a backward pass. Create one per thread with
/// [`Model::workspace`] and reuse it: it holds the large scratch buffers.
#[derive(Debug)]
pub struct Workspace {
    caches: Vec<LayerCache>,
    ready_for_backward: bool,
}

impl Model {
    /// Builds a network from its layers; fails if they do not fit together or names repeat.
    pub fn new(
        name: impl Into<String>,
        input_shape: &[usize],
        layers: Vec<Layer>,
    ) -> Result<Self, ModelError> {
        let name = name.into();
        let arch = |reason: String| ModelError::Architecture {
            model: name.clone(),
            reason,
        };
        if layers.is_empty() {
            return Err(arch("a model needs at least one layer".into()));
        }
        let mut shapes = vec![input_shape.to_vec()];
        let mut builder = LayoutBuilder::new();
        let mut param_ranges = Vec::with_capacity(layers.len());
        let mut names = std::collections::HashSet::new();
        for layer in &layers {
            if !names.insert(layer.name().to_string()) {
                return Err(arch(format!("two layers are named `{}`", layer.name())));
            }
            let input = shapes.last().expect("shapes starts non-empty");
            let output = layer.output_shape(input).map_err(&arch)?;
            let start = builder.len();
            for spec in layer.param_specs() {
                builder.push(
                    format!("{}.{}", layer.name(), spec.suffix),
                    &spec.shape,
                    SegmentKind::Trainable,
                )?;
            }
            param_ranges.push(start..builder.len());
            shapes.push(output);
        }
        Ok(Self {
            name,
            layers,
            shapes,
            param_ranges,
            layout: Arc::new(builder.build()),
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Per-sample input shape (`[height, width, channels]` for images, `[features]` for vectors).
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[0]
    }

    /// Per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        self.shapes.last().expect("a model has at least its input shape")
    }

    /// The layers in order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Per-sample output shape of each layer.
    pub fn layer_output_shapes(&self) -> &[Vec<usize>] {
        &self.shapes[1..]
    }

    /// Range of layer `i`'s parameters in the flat buffer.
    pub fn layer_params(&self, i: usize) -> Range<usize> {
        self.param_ranges[i].clone()
    }

    /// Index of the layer with this name.
    pub fn layer_index(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.name() == name)
    }

    /// The layout of the flat parameter buffer.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.len()
    }

    /// Deterministic initial parameters from a seed: He-uniform weights, zero biases.
    pub fn init_params(&self, seed: u64) -> Params {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Params::zeros(self.layout.clone());
        for (layer, range) in self.layers.iter().zip(&self.param_ranges) {
            layer.init(&mut params.as_mut_slice()[range.clone()], &mut rng);
        }
        params
    }

    /// A fresh workspace for this model.
    pub fn workspace(&self) -> Workspace {
        Workspace {
            caches: self.layers.iter().map(|_| LayerCache::default()).collect(),
            ready_for_backward: false,
        }
    }

    /// FLOPs of one sample's forward pass (2 per multiply-add).
    pub fn forward_flops_per_sample(&self) -> u64 {
        self.layers
            .iter()
            .zip(&self.shapes)
            .map(|(l, s)| l.forward_flops(s))
            .sum()
    }

    /// FLOPs of one sample's training step: forward, weight gradients, and input gradients for every
    /// layer but the first.
    pub fn training_flops_per_sample(&self) -> u64 {
        let per_layer: Vec<u64> = self
            .layers
            .iter()
            .zip(&self.shapes)
            .map(|(l, s)| l.forward_flops(s))
            .collect();
        let first = per_layer.first().copied().unwrap_or(0);
        3 * per_layer.iter().sum::<u64>() - first
    }

    fn check_params(&self, params: &[f32]) -> Result<(), ModelError> {
        Ok(self.layout.check_len(params.len())?)
    }

    /// Forward pass of a batch (`[batch, input_shape…]`). With `train`, the workspace keeps what the
    /// backward pass needs.
    pub fn forward(
        &self,
        params: &[f32],
        input: ArrayD<f32>,
        ws: &mut Workspace,
        train: bool,
    ) -> Result<ArrayD<f32>, ModelError> {
        self.check_params(params)?;
        if input.ndim() == 0 || input.shape()[1..] != self.shapes[0][..] {
            return Err(ModelError::InputShape {
                model: self.name.clone(),
                expected: self.shapes[0].clone(),
                actual: input.shape().to_vec(),
            });
        }
        if input.shape()[0] == 0 {
            return Err(ModelError::EmptyBatch(self.name.clone()));
        }
        let mut x = if input.is_standard_layout() {
            input
        } else {
            input.as_standard_layout().into_owned()
        };
        for ((layer, range), cache) in self.layers.iter().zip(&self.param_ranges).zip(&mut ws.caches) {
            x = layer.forward(&params[range.clone()], x, cache, train);
        }
        ws.ready_for_backward = train;
        Ok(x)
    }

    /// Backward pass after a training forward: writes every parameter gradient into `grads`
    /// (overwritten, same layout as the parameters) and returns the gradient with respect to the
    /// input when `need_input_grad` (a split network's tail returns it to the head).
    pub fn backward(
        &self,
        params: &[f32],
        ws: &mut Workspace,
        grad_out: ArrayD<f32>,
        grads: &mut [f32],
        need_input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, ModelError> {
        self.check_params(params)?;
        self.check_params(grads)?;
        if !ws.ready_for_backward || ws.caches.len() != self.layers.len() {
            return Err(ModelError::NoForwardPass);
        }
        let mut g = Some(grad_out);
        for (i, ((layer, range), cache)) in self
            .layers
            .iter()
            .zip(&self.param_ranges)
            .zip(&mut ws.caches)
            .enumerate()
            .rev()
        {
            let upstream = g
                .take()
                .expect("every layer but the first returns an input gradient");
            let wants_input = i > 0 || need_input_grad;
            g = layer.backward(
                &params[range.clone()],
                cache,
                upstream,
                &mut grads[range.clone()],
                wants_input,
            );
        }
        ws.ready_for_backward = false;
        Ok(g)
    }

    /// Checks that `labels` fit a batch of `batch` samples and the model's classes.
    pub fn check_labels(&self, labels: &[u32], batch: usize) -> Result<(), ModelError> {
        let classes = self.output_shape().iter().product::<usize>();
        let bad = |reason: String| ModelError::Labels {
            model: self.name.clone(),
            reason,
        };
        if labels.len() != batch {
            return Err(bad(format!("{} labels for a batch of {batch}", labels.len())));
        }
        if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(bad(format!("label {l} but the model has {classes} classes")));
        }
        Ok(())
    }

    /// One forward and backward pass with softmax cross-entropy: writes the gradient of the mean
    /// minibatch loss into `grads` and returns the batch statistics.
    pub fn loss_and_gradient(
        &self,
        params: &[f32],
        input: ArrayD<f32>,
        labels: &[u32],
        ws: &mut Workspace,
        grads: &mut [f32],
    ) -> Result<BatchLoss, ModelError> {
        let batch = input.shape().first().copied().unwrap_or(0);
        self.check_labels(labels, batch)?;
        let logits = self.forward(params, input, ws, true)?;
        let (stats, grad) = softmax_cross_entropy(&logits, labels, true);
        self.backward(params, ws, grad.expect("gradient requested"), grads, false)?;
        Ok(stats)
    }

    /// Loss and correct predictions of a batch, without gradients.
    pub fn evaluate_batch(
        &self,
        params: &[f32],
        input: ArrayD<f32>,
        labels: &[u32],
        ws: &mut Workspace,
    ) -> Result<BatchLoss, ModelError> {
        let batch = input.shape().first().copied().unwrap_or(0);
        self.check_labels(labels, batch)?;
        let logits = self.forward(params, input, ws, false)?;
        Ok(softmax_cross_entropy(&logits, labels, false).0)
    }

    /// One line per layer: name, output shape and parameter count.
    pub fn summary(&self) -> String {
        let mut out = format!("model {} (input {:?})\n", self.name, self.shapes[0]);
        for (i, layer) in self.layers.iter().enumerate() {
            out += &format!(
                "  {:<22} out {:<16} params {}\n",
                layer.name(),
                format!("{:?}", self.shapes[i + 1]),
                self.param_ranges[i].len()
            );
        }
        out += &format!("  total parameters: {}", self.num_params());
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::layers::gradient_check::check_coordinates;
    use crate::zoo;
    use ndarray::{ArrayD, IxDyn};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The whole network's gradient, through every layer and the loss, against central differences
    /// of the mean cross-entropy.
    #[test]
    fn whole_model_gradients_match_finite_differences() {
        for (name, shape) in [("lenet5", vec![14, 14, 2]), ("mlp", vec![12])] {
            let model = zoo::build(name, &shape, 4).unwrap();
            let params = model.init_params(5);
            let mut full = vec![3];
            full.extend_from_slice(&shape);
            let n: usize = full.iter().product();
            let x = ArrayD::from_shape_vec(
                IxDyn(&full),
                (0..n).map(|i| ((i * 7919) % 211) as f32 / 105.0 - 1.0).collect(),
            )
            .unwrap();
            let labels = [0, 3, 1];
            let mut grads = vec![0.0; model.num_params()];
            model
                .loss_and_gradient(
                    params.as_slice(),
                    x.clone(),
                    &labels,
                    &mut model.workspace(),
                    &mut grads,
                )
                .unwrap();
            let loss = |p: &[f32]| {
                f64::from(
                    model
                        .evaluate_batch(p, x.clone(), &labels, &mut model.workspace())
                        .unwrap()
                        .mean_loss,
                )
            };
            let mut rng = StdRng::seed_from_u64(9);
            check_coordinates(name, params.as_slice(), &grads, &mut rng, loss);
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let model = zoo::build("mlp", &[4], 3).unwrap();
        let params = model.init_params(0);
        let mut ws = model.workspace();
        let wrong = ArrayD::zeros(IxDyn(&[2, 5]));
        assert!(matches!(
            model.forward(params.as_slice(), wrong, &mut ws, false),
            Err(crate::ModelError::InputShape { .. })
        ));
        let empty = ArrayD::zeros(IxDyn(&[0, 4]));
        assert!(matches!(
            model.forward(params.as_slice(), empty, &mut ws, false),
            Err(crate::ModelError::EmptyBatch(_))
        ));
        let x = ArrayD::zeros(IxDyn(&[2, 4]));
        let mut grads = vec![0.0; model.num_params()];
        assert!(
            model
                .loss_and_gradient(params.as_slice(), x.clone(), &[0, 3], &mut ws, &mut grads)
                .is_err()
        );
        assert!(
            model
                .loss_and_gradient(params.as_slice(), x.clone(), &[0], &mut ws, &mut grads)
                .is_err()
        );
        assert!(
            model
                .forward(&params.as_slice()[1..], x.clone(), &mut ws, false)
                .is_err()
        );
        let g = ArrayD::zeros(IxDyn(&[2, 3]));
        assert!(matches!(
            model.backward(params.as_slice(), &mut model.workspace(), g, &mut grads, false),
            Err(crate::ModelError::NoForwardPass)
        ));
    }
}
