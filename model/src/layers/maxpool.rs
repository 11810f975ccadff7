//! 2-D max pooling over NHWC images; the backward pass routes each gradient to the input that won.

use super::{LayerCache, values};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Max pooling with a square window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaxPool2d {
    /// Unique layer name.
    pub name: String,
    /// Window height and width.
    pub size: usize,
    /// Step between windows.
    pub stride: usize,
}

impl MaxPool2d {
    /// A `size × size` pool with the given stride (`size` for non-overlapping windows).
    pub fn new(name: impl Into<String>, size: usize, stride: usize) -> Self {
        Self {
            name: name.into(),
            size,
            stride,
        }
    }

    pub(super) fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        let &[h, w, c] = input else {
            return Err(format!(
                "max-pool `{}` expects [height, width, channels], got {input:?}",
                self.name
            ));
        };
        if self.size == 0 || self.stride == 0 || h < self.size || w < self.size {
            return Err(format!(
                "max-pool `{}` with window {} does not fit input {input:?}",
                self.name, self.size
            ));
        }
        Ok(vec![
            (h - self.size) / self.stride + 1,
            (w - self.size) / self.stride + 1,
            c,
        ])
    }

    pub(super) fn forward(&self, input: ArrayD<f32>, cache: &mut LayerCache) -> ArrayD<f32> {
        let shape = input.shape().to_vec();
        let (batch, h, w, c) = (shape[0], shape[1], shape[2], shape[3]);
        let out_shape = self
            .output_shape(&shape[1..])
            .expect("pool input shape was validated by the model");
        let (oh, ow) = (out_shape[0], out_shape[1]);
        let (sample_in, sample_out) = (h * w * c, oh * ow * c);
        let mut out = vec![0.0; batch * sample_out];
        cache.argmax.resize(out.len(), 0);
        // Per sample in parallel; per output pixel, the channels are one contiguous run, so each
        // window position is compared against the running maximum channel by channel.
        out.par_chunks_mut(sample_out)
            .zip(cache.argmax.par_chunks_mut(sample_out))
            .zip(values(&input).par_chunks(sample_in))
            .for_each(|((out, argmax), x)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let o = (oy * ow + ox) * c;
                        let (best, best_at) = (&mut out[o..o + c], &mut argmax[o..o + c]);
                        for ky in 0..self.size {
                            for kx in 0..self.size {
                                let i = ((oy * self.stride + ky) * w + ox * self.stride + kx) * c;
                                let first = ky == 0 && kx == 0;
                                for ch in 0..c {
                                    if first || x[i + ch] > best[ch] {
                                        best[ch] = x[i + ch];
                                        best_at[ch] = i + ch;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        ArrayD::from_shape_vec(IxDyn(&[batch, oh, ow, c]), out).expect("pool output shape")
    }

    pub(super) fn backward(&self, cache: &LayerCache, grad_out: ArrayD<f32>) -> ArrayD<f32> {
        let mut dx = ArrayD::zeros(IxDyn(&cache.input_shape));
        let batch = cache.input_shape[0].max(1);
        let sample_in = dx.len() / batch;
        let sample_out = grad_out.len() / batch;
        let dxs = dx.as_slice_mut().expect("fresh array is contiguous");
        dxs.par_chunks_mut(sample_in)
            .zip(cache.argmax.par_chunks(sample_out))
            .zip(values(&grad_out).par_chunks(sample_out))
            .for_each(|((dx, argmax), g)| {
                for (&i, &g) in argmax.iter().zip(g) {
                    dx[i] += g;
                }
            });
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;
    use crate::layers::gradient_check::check_layer;

    #[test]
    fn maxpool_gradients_match_finite_differences() {
        check_layer(&Layer::MaxPool2d(MaxPool2d::new("pool", 2, 2)), &[6, 4, 3], 2, 31);
    }

    #[test]
    fn overlapping_maxpool_gradients_match_finite_differences() {
        check_layer(&Layer::MaxPool2d(MaxPool2d::new("pool", 3, 2)), &[7, 7, 2], 2, 32);
    }

    #[test]
    fn maxpool_picks_the_window_maximum() {
        let pool = MaxPool2d::new("pool", 2, 2);
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 2, 2, 1]), vec![1.0, 5.0, -3.0, 2.0]).unwrap();
        let y = pool.forward(x, &mut LayerCache::default());
        assert_eq!(y.as_slice().unwrap(), &[5.0]);
    }
}
