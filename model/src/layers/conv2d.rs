//! 2-D convolution over NHWC images, computed as im2col followed by one matrix multiply per pass.
//!
//! The columns of a whole batch form one `[batch·out_h·out_w, kernel²·in_channels]` matrix, so the
//! forward pass, the weight gradient and the input gradient are each a single large sgemm. The
//! weight is stored `[kernel, kernel, in_channels, out_channels]`, which is exactly the
//! `[kernel²·in_channels, out_channels]` matrix the multiply needs.

use super::{LayerCache, ParamSpec, add_bias_rows, column_sums, values};
use crate::gemm::{Mat, gemm};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Square-kernel 2-D convolution with stride and zero padding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    /// Unique layer name.
    pub name: String,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (filters).
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: usize,
    /// Step between kernel positions.
    pub stride: usize,
    /// Zeros added on every border.
    pub padding: usize,
}

/// The geometry of one convolution pass.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
}

impl Conv2d {
    /// A convolution `in_channels → out_channels` with a `kernel × kernel` window.
    pub fn new(
        name: impl Into<String>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            name: name.into(),
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
        }
    }

    pub(super) fn param_specs(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                suffix: "weight",
                shape: vec![self.kernel, self.kernel, self.in_channels, self.out_channels],
            },
            ParamSpec {
                suffix: "bias",
                shape: vec![self.out_channels],
            },
        ]
    }

    pub(super) fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        let &[h, w, c] = input else {
            return Err(format!(
                "conv layer `{}` expects [height, width, channels], got {input:?}",
                self.name
            ));
        };
        if c != self.in_channels {
            return Err(format!(
                "conv layer `{}` expects {} channels, got {c}",
                self.name, self.in_channels
            ));
        }
        if self.stride == 0 || self.kernel == 0 {
            return Err(format!(
                "conv layer `{}` needs a positive kernel and stride",
                self.name
            ));
        }
        let span = |n: usize| {
            (n + 2 * self.padding)
                .checked_sub(self.kernel)
                .map(|s| s / self.stride + 1)
        };
        match (span(h), span(w)) {
            (Some(oh), Some(ow)) => Ok(vec![oh, ow, self.out_channels]),
            _ => Err(format!(
                "conv layer `{}`: kernel {} is larger than the padded input {input:?}",
                self.name, self.kernel
            )),
        }
    }

    fn geometry(&self, shape: &[usize]) -> Geometry {
        let out = self
            .output_shape(&shape[1..])
            .expect("conv input shape was validated by the model");
        Geometry {
            batch: shape[0],
            in_h: shape[1],
            in_w: shape[2],
            out_h: out[0],
            out_w: out[1],
        }
    }

    fn row_len(&self) -> usize {
        self.kernel * self.kernel * self.in_channels
    }

    /// For output coordinate `o`, the kernel offsets `[k0, k1)` that land inside an input of size
    /// `n`, and the input coordinate of offset `k0`.
    fn valid_window(&self, o: usize, n: usize) -> (usize, usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let k0 = ((-start).max(0) as usize).min(self.kernel);
        let k1 = ((n as isize - start).min(self.kernel as isize)).max(k0 as isize) as usize;
        (k0, k1, (start + k0 as isize).max(0) as usize)
    }

    /// Copies every receptive field of every sample into one row of `cols`.
    fn im2col(&self, x: &[f32], g: Geometry, cols: &mut [f32]) {
        let c = self.in_channels;
        let (k, row_len) = (self.kernel, self.row_len());
        let sample_in = g.in_h * g.in_w * c;
        let sample_cols = g.out_h * g.out_w * row_len;
        cols.par_chunks_mut(sample_cols)
            .zip(x.par_chunks(sample_in))
            .for_each(|(cols, xs)| {
                for oy in 0..g.out_h {
                    let (ky0, ky1, iy0) = self.valid_window(oy, g.in_h);
                    for ox in 0..g.out_w {
                        let (kx0, kx1, ix0) = self.valid_window(ox, g.in_w);
                        let row = &mut cols[(oy * g.out_w + ox) * row_len..][..row_len];
                        for ky in 0..k {
                            let dst = &mut row[ky * k * c..(ky + 1) * k * c];
                            if ky < ky0 || ky >= ky1 {
                                dst.fill(0.0);
                                continue;
                            }
                            let iy = iy0 + ky - ky0;
                            dst[..kx0 * c].fill(0.0);
                            dst[kx1 * c..].fill(0.0);
                            if kx1 > kx0 {
                                let src = (iy * g.in_w + ix0) * c;
                                dst[kx0 * c..kx1 * c].copy_from_slice(&xs[src..src + (kx1 - kx0) * c]);
                            }
                        }
                    }
                }
            });
    }

    /// Scatters column gradients back onto the input positions they came from, summing overlaps.
    fn col2im(&self, dcols: &[f32], g: Geometry, dx: &mut [f32]) {
        let c = self.in_channels;
        let (k, row_len) = (self.kernel, self.row_len());
        let sample_in = g.in_h * g.in_w * c;
        let sample_cols = g.out_h * g.out_w * row_len;
        dx.par_chunks_mut(sample_in)
            .zip(dcols.par_chunks(sample_cols))
            .for_each(|(dxs, cols)| {
                dxs.fill(0.0);
                for oy in 0..g.out_h {
                    let (ky0, ky1, iy0) = self.valid_window(oy, g.in_h);
                    for ox in 0..g.out_w {
                        let (kx0, kx1, ix0) = self.valid_window(ox, g.in_w);
                        let row = &cols[(oy * g.out_w + ox) * row_len..][..row_len];
                        for ky in ky0..ky1 {
                            if kx1 == kx0 {
                                break;
                            }
                            let iy = iy0 + ky - ky0;
                            let src = &row[ky * k * c + kx0 * c..ky * k * c + kx1 * c];
                            let dst = (iy * g.in_w + ix0) * c;
                            for (d, s) in dxs[dst..dst + src.len()].iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            });
    }

    pub(super) fn forward(&self, params: &[f32], input: ArrayD<f32>, cache: &mut LayerCache) -> ArrayD<f32> {
        let g = self.geometry(input.shape());
        let rows = g.batch * g.out_h * g.out_w;
        cache.cols.resize(rows * self.row_len(), 0.0);
        self.im2col(values(&input), g, &mut cache.cols);
        let (weight, bias) = params.split_at(self.row_len() * self.out_channels);
        let mut out = vec![0.0; rows * self.out_channels];
        gemm(
            1.0,
            Mat::n(&cache.cols, rows, self.row_len()),
            Mat::n(weight, self.row_len(), self.out_channels),
            0.0,
            &mut out,
            rows,
            self.out_channels,
        );
        add_bias_rows(&mut out, bias);
        ArrayD::from_shape_vec(IxDyn(&[g.batch, g.out_h, g.out_w, self.out_channels]), out)
            .expect("conv output shape")
    }

    pub(super) fn backward(
        &self,
        params: &[f32],
        cache: &mut LayerCache,
        grad_out: ArrayD<f32>,
        grads: &mut [f32],
        need_input_grad: bool,
    ) -> Option<ArrayD<f32>> {
        let g = self.geometry(&cache.input_shape);
        let rows = g.batch * g.out_h * g.out_w;
        let dy = values(&grad_out);
        let (grad_weight, grad_bias) = grads.split_at_mut(self.row_len() * self.out_channels);
        gemm(
            1.0,
            Mat::t(&cache.cols, rows, self.row_len()),
            Mat::n(dy, rows, self.out_channels),
            0.0,
            grad_weight,
            self.row_len(),
            self.out_channels,
        );
        column_sums(dy, self.out_channels, grad_bias);
        if !need_input_grad {
            return None;
        }
        let (weight, _) = params.split_at(self.row_len() * self.out_channels);
        cache.scratch.resize(rows * self.row_len(), 0.0);
        gemm(
            1.0,
            Mat::n(dy, rows, self.out_channels),
            Mat::t(weight, self.row_len(), self.out_channels),
            0.0,
            &mut cache.scratch,
            rows,
            self.row_len(),
        );
        let mut dx = vec![0.0; g.batch * g.in_h * g.in_w * self.in_channels];
        self.col2im(&cache.scratch, g, &mut dx);
        Some(ArrayD::from_shape_vec(IxDyn(&cache.input_shape), dx).expect("conv input-gradient shape"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;
    use crate::layers::gradient_check::check_layer;

    #[test]
    fn conv_gradients_match_finite_differences_with_padding() {
        check_layer(
            &Layer::Conv2d(Conv2d::new("conv", 2, 3, 3, 1, 1)),
            &[5, 5, 2],
            2,
            21,
        );
    }

    #[test]
    fn conv_gradients_match_finite_differences_with_stride() {
        check_layer(
            &Layer::Conv2d(Conv2d::new("conv", 3, 2, 3, 2, 1)),
            &[6, 7, 3],
            2,
            22,
        );
    }

    #[test]
    fn conv_gradients_match_finite_differences_without_padding() {
        check_layer(
            &Layer::Conv2d(Conv2d::new("conv", 1, 4, 5, 1, 0)),
            &[7, 6, 1],
            3,
            23,
        );
    }

    #[test]
    fn pointwise_conv_gradients_match_finite_differences() {
        check_layer(
            &Layer::Conv2d(Conv2d::new("enc", 4, 2, 1, 1, 0)),
            &[3, 3, 4],
            2,
            24,
        );
    }

    /// Direct (non-im2col) convolution, the definition the fast path must reproduce.
    fn direct_conv(layer: &Conv2d, params: &[f32], x: &[f32], shape: [usize; 4]) -> Vec<f32> {
        let [b, h, w, c] = shape;
        let out = layer.output_shape(&[h, w, c]).unwrap();
        let (oh, ow, co) = (out[0], out[1], out[2]);
        let k = layer.kernel;
        let bias = &params[k * k * c * co..];
        let mut y = vec![0.0; b * oh * ow * co];
        for n in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    for f in 0..co {
                        let mut acc = bias[f];
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * layer.stride + ky) as isize - layer.padding as isize;
                                let ix = (ox * layer.stride + kx) as isize - layer.padding as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                for ci in 0..c {
                                    let xv = x[((n * h + iy as usize) * w + ix as usize) * c + ci];
                                    acc += xv * params[((ky * k + kx) * c + ci) * co + f];
                                }
                            }
                        }
                        y[((n * oh + oy) * ow + ox) * co + f] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn im2col_forward_equals_direct_convolution() {
        for layer in [
            Conv2d::new("c", 3, 4, 3, 2, 1),
            Conv2d::new("c", 2, 3, 5, 1, 2),
            Conv2d::new("c", 1, 2, 2, 3, 0),
        ] {
            let shape = [2, 9, 8, layer.in_channels];
            let n_params =
                layer.kernel * layer.kernel * layer.in_channels * layer.out_channels + layer.out_channels;
            let params: Vec<f32> = (0..n_params)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..shape.iter().product())
                .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
                .collect();
            let expected = direct_conv(&layer, &params, &x, shape);
            let input = ArrayD::from_shape_vec(IxDyn(&shape), x).unwrap();
            let y = layer.forward(&params, input, &mut LayerCache::default());
            for (a, b) in y.as_slice().unwrap().iter().zip(&expected) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
}
