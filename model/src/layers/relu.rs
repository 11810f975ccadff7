//! Rectified linear unit, applied in place; the backward pass masks by the saved output.

use super::LayerCache;
use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

/// `max(x, 0)` element-wise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relu {
    /// Unique layer name.
    pub name: String,
}

impl Relu {
    /// A ReLU layer.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    pub(super) fn forward(&self, mut input: ArrayD<f32>, cache: &mut LayerCache, train: bool) -> ArrayD<f32> {
        input.par_mapv_inplace(|v| v.max(0.0));
        cache.saved = train.then(|| input.clone());
        input
    }

    pub(super) fn backward(&self, cache: &LayerCache, mut grad_out: ArrayD<f32>) -> ArrayD<f32> {
        let output = cache
            .saved
            .as_ref()
            .expect("relu backward needs a training forward pass");
        Zip::from(&mut grad_out).and(output).par_for_each(|g, &y| {
            if y <= 0.0 {
                *g = 0.0;
            }
        });
        grad_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;
    use crate::layers::gradient_check::check_layer;

    #[test]
    fn relu_gradients_match_finite_differences() {
        check_layer(&Layer::Relu(Relu::new("relu")), &[3, 4], 3, 41);
    }
}
