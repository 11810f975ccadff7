//! Fully connected layer: `y = x · W + b` with `W` stored `[inputs, outputs]`.

use super::{LayerCache, ParamSpec, add_bias_rows, column_sums, values};
use crate::gemm::{Mat, gemm};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

/// Fully connected layer over per-sample vectors of length `inputs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dense {
    /// Unique layer name.
    pub name: String,
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub outputs: usize,
}

impl Dense {
    /// A dense layer `inputs → outputs`.
    pub fn new(name: impl Into<String>, inputs: usize, outputs: usize) -> Self {
        Self {
            name: name.into(),
            inputs,
            outputs,
        }
    }

    pub(super) fn param_specs(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                suffix: "weight",
                shape: vec![self.inputs, self.outputs],
            },
            ParamSpec {
                suffix: "bias",
                shape: vec![self.outputs],
            },
        ]
    }

    pub(super) fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        if input == [self.inputs] {
            Ok(vec![self.outputs])
        } else {
            Err(format!(
                "dense layer `{}` expects [{}] per sample, got {input:?}",
                self.name, self.inputs
            ))
        }
    }

    fn split<'a>(&self, params: &'a [f32]) -> (&'a [f32], &'a [f32]) {
        params.split_at(self.inputs * self.outputs)
    }

    pub(super) fn forward(
        &self,
        params: &[f32],
        input: ArrayD<f32>,
        cache: &mut LayerCache,
        train: bool,
    ) -> ArrayD<f32> {
        let batch = input.shape()[0];
        let (weight, bias) = self.split(params);
        let mut out = vec![0.0; batch * self.outputs];
        gemm(
            1.0,
            Mat::n(values(&input), batch, self.inputs),
            Mat::n(weight, self.inputs, self.outputs),
            0.0,
            &mut out,
            batch,
            self.outputs,
        );
        add_bias_rows(&mut out, bias);
        cache.saved = train.then_some(input);
        ArrayD::from_shape_vec(IxDyn(&[batch, self.outputs]), out).expect("dense output shape")
    }

    pub(super) fn backward(
        &self,
        params: &[f32],
        cache: &LayerCache,
        grad_out: ArrayD<f32>,
        grads: &mut [f32],
        need_input_grad: bool,
    ) -> Option<ArrayD<f32>> {
        let input = cache
            .saved
            .as_ref()
            .expect("dense backward needs a training forward pass");
        let batch = input.shape()[0];
        let dy = values(&grad_out);
        let (grad_weight, grad_bias) = grads.split_at_mut(self.inputs * self.outputs);
        gemm(
            1.0,
            Mat::t(values(input), batch, self.inputs),
            Mat::n(dy, batch, self.outputs),
            0.0,
            grad_weight,
            self.inputs,
            self.outputs,
        );
        column_sums(dy, self.outputs, grad_bias);
        if !need_input_grad {
            return None;
        }
        let (weight, _) = self.split(params);
        let mut dx = vec![0.0; batch * self.inputs];
        gemm(
            1.0,
            Mat::n(dy, batch, self.outputs),
            Mat::t(weight, self.inputs, self.outputs),
            0.0,
            &mut dx,
            batch,
            self.inputs,
        );
        Some(ArrayD::from_shape_vec(IxDyn(&[batch, self.inputs]), dx).expect("dense input-gradient shape"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;
    use crate::layers::gradient_check::check_layer;

    #[test]
    fn dense_gradients_match_finite_differences() {
        check_layer(&Layer::Dense(Dense::new("fc", 7, 5)), &[7], 4, 11);
    }

    #[test]
    fn dense_computes_affine_map() {
        let layer = Dense::new("fc", 2, 2);
        // W = [[1, 2], [3, 4]], b = [10, 20]
        let params = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0];
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![1.0, 1.0]).unwrap();
        let y = layer.forward(&params, x, &mut LayerCache::default(), false);
        assert_eq!(y.as_slice().unwrap(), &[14.0, 26.0]);
    }
}
