//! The model zoo: networks built by name, for any input shape and class count.
//!
//! | name     | architecture |
//! |----------|--------------|
//! | `logreg` | multinomial logistic regression: flatten, dense → classes |
//! | `mlp`    | the FedAvg paper's 2NN: dense 200, ReLU, dense 200, ReLU, dense → classes |
//! | `cnn`    | the FedAvg paper's CNN: conv5×5 32, pool 2, conv5×5 64, pool 2, dense 512, dense → classes ("same" padding, ReLU after every conv and hidden dense) |
//! | `lenet5` | LeNet-5 with ReLU and max-pooling: conv5×5 6 (pad 2), pool, conv5×5 16, pool, dense 120, 84 → classes |

use crate::error::ModelError;
use crate::layers::{Conv2d, Dense, Flatten, Layer, MaxPool2d, Relu};
use crate::model::Model;
use serde::{Deserialize, Serialize};

fn default_batch_size() -> usize {
    10
}

/// The `[model]` table of fl-sim experiments and fl-server configurations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Zoo name: `logreg`, `mlp` (the FedAvg paper's 2NN), `cnn`, `lenet5`.
    pub name: String,
    /// Local minibatch size B.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

/// The largest local minibatch `[model] batch_size` may name.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

impl ModelConfig {
    /// Checks `batch_size` (between 1 and [`MAX_BATCH_SIZE`]); the error names the bound.
    pub fn check(&self) -> Result<(), ModelError> {
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(ModelError::Architecture {
                model: self.name.clone(),
                reason: format!(
                    "[model] batch_size must be between 1 and {MAX_BATCH_SIZE}, got {}",
                    self.batch_size
                ),
            });
        }
        Ok(())
    }

    /// The network for samples of `input_shape` and `classes` outputs.
    pub fn build(&self, input_shape: &[usize], classes: usize) -> Result<Model, ModelError> {
        build(&self.name, input_shape, classes)
    }
}

/// Names the zoo accepts.
pub const MODEL_NAMES: &[&str] = &["logreg", "mlp", "cnn", "lenet5"];

/// Builds the named model for inputs of `input_shape` (per sample) and `classes` outputs.
pub fn build(name: &str, input_shape: &[usize], classes: usize) -> Result<Model, ModelError> {
    let features: usize = input_shape.iter().product();
    let layers = match name {
        "logreg" => vec![flatten(), dense("fc", features, classes)],
        "mlp" => vec![
            flatten(),
            dense("fc1", features, 200),
            relu("relu1"),
            dense("fc2", 200, 200),
            relu("relu2"),
            dense("fc3", 200, classes),
        ],
        "cnn" => {
            let (mut layers, flat) = conv_pool_stack(name, input_shape, [(32, 2), (64, 2)])?;
            layers.extend([dense("fc1", flat, 512), relu("relu3"), dense("fc2", 512, classes)]);
            layers
        }
        "lenet5" => {
            let (mut layers, flat) = conv_pool_stack(name, input_shape, [(6, 2), (16, 0)])?;
            layers.extend([
                dense("fc1", flat, 120),
                relu("relu3"),
                dense("fc2", 120, 84),
                relu("relu4"),
                dense("fc3", 84, classes),
            ]);
            layers
        }
        other => return Err(ModelError::UnknownModel(other.to_string())),
    };
    Model::new(name, input_shape, layers)
}

/// Two blocks of 5×5 convolution (`(filters, padding)` each), ReLU and 2×2 max-pool, then flatten;
/// returns the layers and the flattened feature count.
fn conv_pool_stack(
    name: &str,
    input_shape: &[usize],
    blocks: [(usize, usize); 2],
) -> Result<(Vec<Layer>, usize), ModelError> {
    let arch = |reason: String| ModelError::Architecture {
        model: name.to_string(),
        reason,
    };
    let &[_, _, mut channels] = input_shape else {
        return Err(arch(format!(
            "needs image input [height, width, channels], got {input_shape:?}"
        )));
    };
    let mut layers = Vec::new();
    for (i, (filters, padding)) in blocks.into_iter().enumerate() {
        let n = i + 1;
        layers.extend([
            conv(&format!("conv{n}"), channels, filters, 5, padding),
            relu(&format!("relu{n}")),
            pool(&format!("pool{n}")),
        ]);
        channels = filters;
    }
    layers.push(flatten());
    let mut shape = input_shape.to_vec();
    for layer in &layers {
        shape = layer.output_shape(&shape).map_err(arch)?;
    }
    Ok((layers, shape.iter().product()))
}

fn dense(name: &str, inputs: usize, outputs: usize) -> Layer {
    Layer::Dense(Dense::new(name, inputs, outputs))
}

fn conv(name: &str, inputs: usize, outputs: usize, kernel: usize, padding: usize) -> Layer {
    Layer::Conv2d(Conv2d::new(name, inputs, outputs, kernel, 1, padding))
}

fn pool(name: &str) -> Layer {
    Layer::MaxPool2d(MaxPool2d::new(name, 2, 2))
}

fn relu(name: &str) -> Layer {
    Layer::Relu(Relu::new(name))
}

fn flatten() -> Layer {
    Layer::Flatten(Flatten::new("flatten"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_papers() {
        // FedAvg 2NN: 784·200+200 + 200·200+200 + 200·10+10 = 199,210.
        assert_eq!(build("mlp", &[28, 28, 1], 10).unwrap().num_params(), 199_210);
        // FedAvg CNN: 832 + 51,264 + 1,606,144 + 5,130 = 1,663,370.
        assert_eq!(build("cnn", &[28, 28, 1], 10).unwrap().num_params(), 1_663_370);
        // LeNet-5 on 28×28: 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706.
        assert_eq!(build("lenet5", &[28, 28, 1], 10).unwrap().num_params(), 61_706);
        assert_eq!(build("logreg", &[60], 10).unwrap().num_params(), 610);
    }

    #[test]
    fn output_is_one_logit_per_class() {
        for name in MODEL_NAMES {
            let model = build(name, &[28, 28, 1], 10).unwrap();
            assert_eq!(model.output_shape(), &[10], "{name}");
        }
    }

    #[test]
    fn unknown_names_and_wrong_inputs_are_errors() {
        assert!(matches!(
            build("resnet", &[28, 28, 1], 10),
            Err(ModelError::UnknownModel(_))
        ));
        assert!(matches!(
            build("cnn", &[60], 10),
            Err(ModelError::Architecture { .. })
        ));
        assert!(matches!(
            build("lenet5", &[3, 3, 1], 10),
            Err(ModelError::Architecture { .. })
        ));
    }

    #[test]
    fn initialisation_is_deterministic_in_the_seed() {
        let model = build("lenet5", &[28, 28, 1], 10).unwrap();
        assert_eq!(model.init_params(7), model.init_params(7));
        assert_ne!(model.init_params(7), model.init_params(8));
    }
}
