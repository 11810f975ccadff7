//! Flatten: collapses every per-sample axis into one, and restores the shape on the way back.

use super::LayerCache;
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

/// Reshapes `[batch, d1, d2, …]` into `[batch, d1·d2·…]` without copying.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flatten {
    /// Unique layer name.
    pub name: String,
}

impl Flatten {
    /// A flatten layer.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    pub(super) fn forward(&self, input: ArrayD<f32>) -> ArrayD<f32> {
        let batch = input.shape()[0];
        let features = input.len() / batch.max(1);
        input
            .into_shape_with_order(IxDyn(&[batch, features]))
            .expect("standard-layout activations reshape")
    }

    pub(super) fn backward(&self, cache: &LayerCache, grad_out: ArrayD<f32>) -> ArrayD<f32> {
        grad_out
            .into_shape_with_order(IxDyn(&cache.input_shape))
            .expect("gradient has the flattened size")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;
    use crate::layers::gradient_check::check_layer;

    #[test]
    fn flatten_gradients_match_finite_differences() {
        check_layer(&Layer::Flatten(Flatten::new("flat")), &[2, 3, 2], 2, 51);
    }
}
