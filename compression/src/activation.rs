//! Affine 8-bit quantisation of activations and gradients at a split cut (ALGORITHMS.md §8.0), per
//! tensor or per channel; the `int8` cast of the update codecs uses the per-tensor form.
//!
//! For each group (the whole tensor, or one channel of an NHWC tensor — the last axis), with the
//! range `[min, max]` widened to include 0: `scale = (max − min) / 255` (1 when `max = min = 0`), `zp = clamp(round(−min / scale), 0, 255)`,
//! `q = clamp(round(a / scale + zp), 0, 255)`, `â = scale · (q − zp)`. For values within
//! `[min, max]`, `|a − â| ≤ scale / 2` (up to f32 rounding).

use serde::{Deserialize, Serialize};

/// Scale and zero point of one quantisation group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AffineParams {
    /// Step between levels.
    pub scale: f32,
    /// Level that represents 0.
    pub zero_point: u8,
}

impl AffineParams {
    /// The parameters that cover `[min, max]` widened to include 0, so zero (ReLU outputs, sparse
    /// entries) is exact and a constant tensor far from 0 is still within half a step.
    pub fn fit(min: f32, max: f32) -> Self {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let span = f64::from(max) - f64::from(min);
        let scale = if span > 0.0 && span.is_finite() {
            (span / 255.0) as f32
        } else {
            1.0
        };
        let scale = if scale > 0.0 && scale.is_finite() {
            scale
        } else {
            1.0
        };
        let zero_point = (-f64::from(min) / f64::from(scale)).round().clamp(0.0, 255.0) as u8;
        Self { scale, zero_point }
    }

    /// The level of `a`.
    pub fn quantize(&self, a: f32) -> u8 {
        (f64::from(a) / f64::from(self.scale) + f64::from(self.zero_point))
            .round()
            .clamp(0.0, 255.0) as u8
    }

    /// The value of level `q`.
    pub fn dequantize(&self, q: u8) -> f32 {
        (f64::from(self.scale) * (f64::from(q) - f64::from(self.zero_point))) as f32
    }
}

/// An 8-bit tensor: one set of parameters per group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedTensor {
    /// Per-group parameters (one group per tensor, or one per channel).
    pub params: Vec<AffineParams>,
    /// Levels, in the tensor's order.
    pub levels: Vec<u8>,
}

/// Quantises `values` with one group per tensor (`channels = 1`) or one per channel of the last
/// axis (`channels` = its size; `values.len()` must be a multiple of it).
pub fn quantize(values: &[f32], channels: usize) -> QuantizedTensor {
    let channels = channels.max(1);
    let mut lo = vec![f32::INFINITY; channels];
    let mut hi = vec![f32::NEG_INFINITY; channels];
    for (i, &a) in values.iter().enumerate() {
        let c = i % channels;
        lo[c] = lo[c].min(a);
        hi[c] = hi[c].max(a);
    }
    let params: Vec<AffineParams> = lo
        .iter()
        .zip(&hi)
        .map(|(&l, &h)| {
            if l <= h {
                AffineParams::fit(l, h)
            } else {
                AffineParams::fit(0.0, 0.0)
            }
        })
        .collect();
    let levels = values
        .iter()
        .enumerate()
        .map(|(i, &a)| params[i % channels].quantize(a))
        .collect();
    QuantizedTensor { params, levels }
}

/// The values of a quantised tensor.
pub fn dequantize(q: &QuantizedTensor) -> Vec<f32> {
    let channels = q.params.len().max(1);
    q.levels
        .iter()
        .enumerate()
        .map(|(i, &l)| q.params[i % channels].dequantize(l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Reconstruction error ≤ scale/2 per group, per tensor and per channel.
        #[test]
        fn error_is_at_most_half_a_step(
            values in prop::collection::vec(-1e3f32..1e3, 1..300),
            per_channel in any::<bool>(),
            channels in 1usize..6,
        ) {
            let channels = if per_channel { channels } else { 1 };
            let whole = values.len() / channels * channels;
            prop_assume!(whole > 0);
            let values = &values[..whole];
            let q = quantize(values, channels);
            let back = dequantize(&q);
            for (i, (a, b)) in values.iter().zip(&back).enumerate() {
                let scale = q.params[i % channels].scale;
                prop_assert!((a - b).abs() <= scale / 2.0 * 1.0001 + 1e-6, "{a} vs {b}, scale {scale}");
            }
        }
    }

    #[test]
    fn constant_and_tiny_tensors_are_exact_or_bounded() {
        let q = quantize(&[2.5; 10], 1);
        assert_eq!(q.params[0].scale, 2.5 / 255.0);
        for v in dequantize(&q) {
            assert!((v - 2.5).abs() <= q.params[0].scale / 2.0);
        }
        let q = quantize(&[0.0, 0.0], 1);
        assert_eq!(dequantize(&q), vec![0.0, 0.0]);
        let q = quantize(&[1e-30, -1e-30], 1);
        assert!(dequantize(&q).iter().all(|v| v.abs() <= 1e-29));
    }

    #[test]
    fn per_channel_scales_follow_each_channel() {
        // Channel 0 spans 1000, channel 1 spans 1: per-channel keeps channel 1 fine-grained.
        let values: Vec<f32> = (0..100)
            .flat_map(|i| [i as f32 * 10.0, i as f32 * 0.01])
            .collect();
        let per_tensor = dequantize(&quantize(&values, 1));
        let per_channel = dequantize(&quantize(&values, 2));
        let err = |r: &[f32]| {
            values
                .iter()
                .zip(r)
                .skip(1)
                .step_by(2)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        };
        assert!(err(&per_channel) < err(&per_tensor) / 100.0);
    }
}
