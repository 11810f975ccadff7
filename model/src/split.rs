//! Split points: cutting a model into a device-side head and a server-side tail, optionally with a
//! bottleneck encoder/decoder pair at the cut.
//!
//! The head holds the layers up to and including the cut layer (plus the bottleneck encoder); the
//! tail holds the bottleneck decoder and the remaining layers. Layer and segment names are kept, so
//! weights move between the whole model and its halves by name
//! ([`shoal_core::Params::copy_matching_segments`]).

use crate::error::ModelError;
use crate::layers::{Conv2d, Dense, Layer, Relu};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use shoal_core::Params;

/// A learned bottleneck at the cut (BottleFit-style): the encoder runs on the device and reduces
/// the cut tensor to `channels` channels (features, for a flat cut); the decoder on the server
/// restores the original width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckSpec {
    /// Channels (or features) of the tensor that crosses the wire.
    pub channels: usize,
    /// Whether a ReLU follows the decoder (right when the cut tensor is a post-ReLU activation).
    #[serde(default = "default_decoder_relu")]
    pub decoder_relu: bool,
}

fn default_decoder_relu() -> bool {
    true
}

/// A model cut in two.
#[derive(Debug, Clone)]
pub struct SplitModel {
    /// Device side: input → cut (→ encoder).
    pub head: Model,
    /// Server side: (decoder →) rest → logits.
    pub tail: Model,
    /// Name of the cut layer in the whole model.
    pub cut_layer: String,
    /// The bottleneck, if any.
    pub bottleneck: Option<BottleneckSpec>,
}

/// Name of the bottleneck encoder layer in a head.
pub const ENCODER_LAYER: &str = "bottleneck_encoder";
/// Name of the bottleneck decoder layer in a tail.
pub const DECODER_LAYER: &str = "bottleneck_decoder";

impl Model {
    /// Cuts the model after the layer named `cut_layer`.
    pub fn split(
        &self,
        cut_layer: &str,
        bottleneck: Option<&BottleneckSpec>,
    ) -> Result<SplitModel, ModelError> {
        let fail = |reason: String| ModelError::Split {
            model: self.name().to_string(),
            layer: cut_layer.to_string(),
            reason,
        };
        let index = self
            .layer_index(cut_layer)
            .ok_or_else(|| fail("no layer has that name".into()))?;
        if index + 1 == self.layers().len() {
            return Err(fail("it is the last layer, so the tail would be empty".into()));
        }
        let cut_shape = self.layer_output_shapes()[index].clone();
        let mut head_layers = self.layers()[..=index].to_vec();
        let mut tail_layers = Vec::new();
        let mut tail_input = cut_shape.clone();
        if let Some(spec) = bottleneck {
            // A bottleneck narrows the cut: at most as many channels (features) as it has.
            let width = cut_shape.last().copied().unwrap_or(0);
            if spec.channels == 0 || spec.channels > width {
                return Err(fail(format!(
                    "a bottleneck has between 1 and the cut's {width} channels, got {}",
                    spec.channels
                )));
            }
            let (encoder, decoder, wire_shape) = match cut_shape.as_slice() {
                &[h, w, c] => (
                    Layer::Conv2d(Conv2d::new(ENCODER_LAYER, c, spec.channels, 1, 1, 0)),
                    Layer::Conv2d(Conv2d::new(DECODER_LAYER, spec.channels, c, 1, 1, 0)),
                    vec![h, w, spec.channels],
                ),
                &[d] => (
                    Layer::Dense(Dense::new(ENCODER_LAYER, d, spec.channels)),
                    Layer::Dense(Dense::new(DECODER_LAYER, spec.channels, d)),
                    vec![spec.channels],
                ),
                other => return Err(fail(format!("no bottleneck for a cut tensor of shape {other:?}"))),
            };
            head_layers.push(encoder);
            tail_layers.push(decoder);
            if spec.decoder_relu {
                tail_layers.push(Layer::Relu(Relu::new("bottleneck_decoder_relu")));
            }
            tail_input = wire_shape;
        }
        tail_layers.extend_from_slice(&self.layers()[index + 1..]);
        let head = Model::new(format!("{}.head", self.name()), self.input_shape(), head_layers)?;
        let tail = Model::new(format!("{}.tail", self.name()), &tail_input, tail_layers)?;
        Ok(SplitModel {
            head,
            tail,
            cut_layer: cut_layer.to_string(),
            bottleneck: bottleneck.cloned(),
        })
    }
}

impl SplitModel {
    /// Per-sample shape of the tensor that crosses the wire (the head's output).
    pub fn wire_shape(&self) -> &[usize] {
        self.head.output_shape()
    }

    /// Head and tail parameters taken from the whole model's; bottleneck layers, which the whole
    /// model does not have, are initialised from `seed`.
    pub fn params_from_whole(&self, whole: &Params, seed: u64) -> (Params, Params) {
        let mut head = self.head.init_params(seed);
        let mut tail = self.tail.init_params(seed.wrapping_add(1));
        head.copy_matching_segments(whole);
        tail.copy_matching_segments(whole);
        (head, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::softmax_cross_entropy;
    use crate::zoo;
    use ndarray::{ArrayD, IxDyn};

    fn batch(n: usize, shape: &[usize], seed: u32) -> ArrayD<f32> {
        let mut full = vec![n];
        full.extend_from_slice(shape);
        let len: usize = full.iter().product();
        let values =
            (0..len).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0);
        ArrayD::from_shape_vec(IxDyn(&full), values.collect()).unwrap()
    }

    #[test]
    fn head_then_tail_equals_the_whole_forward() {
        let model = zoo::build("lenet5", &[16, 16, 1], 10).unwrap();
        let whole = model.init_params(1);
        for cut in ["conv1", "pool1", "relu2", "flatten", "fc2"] {
            let split = model.split(cut, None).unwrap();
            let (head, tail) = split.params_from_whole(&whole, 9);
            let x = batch(3, &[16, 16, 1], 5);
            let expected = model
                .forward(whole.as_slice(), x.clone(), &mut model.workspace(), false)
                .unwrap();
            let a = split
                .head
                .forward(head.as_slice(), x, &mut split.head.workspace(), false)
                .unwrap();
            let y = split
                .tail
                .forward(tail.as_slice(), a, &mut split.tail.workspace(), false)
                .unwrap();
            assert_eq!(y, expected, "cut at {cut}");
        }
    }

    #[test]
    fn cut_gradient_fed_into_the_head_reproduces_whole_gradients() {
        let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
        let whole = model.init_params(2);
        let x = batch(4, &[12, 12, 1], 7);
        let labels = [1, 3, 5, 9];
        let mut expected = vec![0.0; model.num_params()];
        model
            .loss_and_gradient(
                whole.as_slice(),
                x.clone(),
                &labels,
                &mut model.workspace(),
                &mut expected,
            )
            .unwrap();

        let split = model.split("pool1", None).unwrap();
        let (head, tail) = split.params_from_whole(&whole, 0);
        let (mut head_ws, mut tail_ws) = (split.head.workspace(), split.tail.workspace());
        let cut = split
            .head
            .forward(head.as_slice(), x, &mut head_ws, true)
            .unwrap();
        let logits = split
            .tail
            .forward(tail.as_slice(), cut, &mut tail_ws, true)
            .unwrap();
        let (_, grad) = softmax_cross_entropy(&logits, &labels, true);
        let mut tail_grads = vec![0.0; split.tail.num_params()];
        let at_cut = split
            .tail
            .backward(
                tail.as_slice(),
                &mut tail_ws,
                grad.unwrap(),
                &mut tail_grads,
                true,
            )
            .unwrap()
            .unwrap();
        assert_eq!(at_cut.shape()[1..], *split.wire_shape());
        let mut head_grads = vec![0.0; split.head.num_params()];
        split
            .head
            .backward(head.as_slice(), &mut head_ws, at_cut, &mut head_grads, false)
            .unwrap();

        let joined: Vec<f32> = head_grads.into_iter().chain(tail_grads).collect();
        assert_eq!(joined.len(), expected.len());
        for (a, b) in joined.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn bottleneck_narrows_the_wire_and_keeps_the_other_weights() {
        let model = zoo::build("cnn", &[12, 12, 1], 10).unwrap();
        let whole = model.init_params(3);
        let spec = BottleneckSpec {
            channels: 4,
            decoder_relu: true,
        };
        let split = model.split("pool1", Some(&spec)).unwrap();
        assert_eq!(split.wire_shape(), &[6, 6, 4]);
        assert_eq!(split.tail.input_shape(), &[6, 6, 4]);
        let (head, tail) = split.params_from_whole(&whole, 11);
        assert_eq!(
            head.segment("conv1.weight").unwrap(),
            whole.segment("conv1.weight").unwrap()
        );
        assert_eq!(
            tail.segment("fc2.bias").unwrap(),
            whole.segment("fc2.bias").unwrap()
        );
        assert!(
            head.segment("bottleneck_encoder.weight")
                .unwrap()
                .iter()
                .any(|&v| v != 0.0)
        );
        let logits = split
            .tail
            .forward(
                tail.as_slice(),
                split
                    .head
                    .forward(
                        head.as_slice(),
                        batch(2, &[12, 12, 1], 1),
                        &mut split.head.workspace(),
                        false,
                    )
                    .unwrap(),
                &mut split.tail.workspace(),
                false,
            )
            .unwrap();
        assert_eq!(logits.shape(), &[2, 10]);

        let flat = model
            .split(
                "relu3",
                Some(&BottleneckSpec {
                    channels: 16,
                    decoder_relu: false,
                }),
            )
            .unwrap();
        assert_eq!(flat.wire_shape(), &[16]);
    }

    #[test]
    fn impossible_cuts_are_errors() {
        let model = zoo::build("mlp", &[8], 3).unwrap();
        assert!(matches!(model.split("nope", None), Err(ModelError::Split { .. })));
        assert!(matches!(model.split("fc3", None), Err(ModelError::Split { .. })));
        let zero = BottleneckSpec {
            channels: 0,
            decoder_relu: true,
        };
        assert!(matches!(
            model.split("relu1", Some(&zero)),
            Err(ModelError::Split { .. })
        ));
        // relu1 has 200 features: a bottleneck of 201 would widen the cut.
        let wider = BottleneckSpec {
            channels: 201,
            decoder_relu: true,
        };
        assert!(matches!(
            model.split("relu1", Some(&wider)),
            Err(ModelError::Split { .. })
        ));
        let full = BottleneckSpec {
            channels: 200,
            decoder_relu: true,
        };
        assert!(model.split("relu1", Some(&full)).is_ok());
    }
}
