//! The wire format of a tensor at a split cut (ALGORITHMS.md §8.0): the activations a device sends
//! forward (with the minibatch's labels) and the gradient the server sends back.
//!
//! ```text
//! magic "SHCT" | format version | header length | header (postcard: precision, shape, per-group
//! scale and zero point, labels, zstd flag, body length) | body | xxh3-64
//! ```
//! The body is the values as little-endian f32, or their 8-bit affine levels
//! ([`crate::activation`]) per channel of the last axis or per tensor; zstd may compress it. A
//! [`CutCodec`] is written `int8 | zstd(1)`, `int8-tensor`, `f32`, … and [`decode_cut`] refuses a
//! malformed, truncated, oversized or corrupted message with a [`DecodeError`] within the caller's
//! [`CutLimits`], never a panic.

use crate::activation::{AffineParams, QuantizedTensor, dequantize, quantize};
use crate::error::{CodecError, DecodeError};
use crate::payload::{open, open_body, seal};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The first bytes of every cut message.
pub const CUT_MAGIC: [u8; 4] = *b"SHCT";

/// How the values at the cut are represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CutPrecision {
    /// Little-endian f32: exact.
    F32,
    /// 8-bit affine levels, one scale and zero point per channel of the last axis.
    Int8PerChannel,
    /// 8-bit affine levels, one scale and zero point for the whole tensor.
    Int8PerTensor,
}

/// A codec for cut tensors: precision, then optionally zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutCodec {
    /// Representation of the values.
    pub precision: CutPrecision,
    /// zstd level applied to the body, if any.
    pub zstd: Option<i32>,
}

impl CutCodec {
    /// Exact f32 values, no compression: the reference for equivalence tests.
    pub const EXACT: CutCodec = CutCodec {
        precision: CutPrecision::F32,
        zstd: None,
    };

    /// The default for activations: per-channel 8-bit levels, zstd level 1.
    pub fn default_activations() -> Self {
        Self {
            precision: CutPrecision::Int8PerChannel,
            zstd: Some(1),
        }
    }

    /// The default for gradients returned to the device: exact f32.
    pub fn default_gradients() -> Self {
        Self::EXACT
    }

    /// Whether decoding returns exactly what was encoded.
    pub fn is_exact(&self) -> bool {
        self.precision == CutPrecision::F32
    }
}

impl fmt::Display for CutCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.precision {
            CutPrecision::F32 => "f32",
            CutPrecision::Int8PerChannel => "int8",
            CutPrecision::Int8PerTensor => "int8-tensor",
        })?;
        if let Some(level) = self.zstd {
            write!(f, " | zstd({level})")?;
        }
        Ok(())
    }
}

impl FromStr for CutCodec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| CodecError::Spec {
            spec: s.to_string(),
            reason,
        };
        let mut stages = s.split('|').map(str::trim);
        let precision = match stages.next().unwrap_or("") {
            "f32" => CutPrecision::F32,
            "int8" => CutPrecision::Int8PerChannel,
            "int8-tensor" => CutPrecision::Int8PerTensor,
            other => {
                return Err(bad(format!(
                    "`{other}` is not a cut precision (f32, int8, int8-tensor)"
                )));
            }
        };
        let zstd = match stages.next() {
            None => None,
            Some(stage) => {
                let level = stage
                    .strip_prefix("zstd(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad(format!("`{stage}`: only `zstd(level)` may follow the precision")))?;
                let level: i32 = level
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("zstd level `{level}` is not an integer")))?;
                if !(1..=22).contains(&level) {
                    return Err(bad(format!("zstd level {level} is outside 1..=22")));
                }
                Some(level)
            }
        };
        if let Some(extra) = stages.next() {
            return Err(bad(format!("unexpected stage `{extra}` after zstd")));
        }
        Ok(Self { precision, zstd })
    }
}

impl Serialize for CutCodec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CutCodec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutLimits {
    /// Largest message, in bytes.
    pub max_bytes: u64,
    /// Largest number of values (batch × per-sample size).
    pub max_values: u64,
}

impl CutLimits {
    /// Limits that fit any honest message of up to `max_batch` samples of `per_sample` values.
    pub fn for_batches(max_batch: usize, per_sample: usize) -> Self {
        let values = (max_batch as u64).saturating_mul(per_sample as u64);
        Self {
            max_bytes: values
                .saturating_mul(4)
                .saturating_add(1 << 16)
                .saturating_add(8 * max_batch as u64),
            max_values: values,
        }
    }
}

/// A decoded cut message.
#[derive(Debug, Clone, PartialEq)]
pub struct CutTensor {
    /// Shape, batch first.
    pub shape: Vec<usize>,
    /// The values (dequantised).
    pub values: Vec<f32>,
    /// The minibatch's labels (forward messages) or none (gradients).
    pub labels: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CutHeader {
    precision: CutPrecision,
    shape: Vec<u32>,
    groups: Vec<AffineParams>,
    labels: Vec<u32>,
    zstd: bool,
    body_len: u64,
}

/// Encodes a tensor of `shape` (batch first) and, for a forward message, its labels.
pub fn encode_cut(
    codec: &CutCodec,
    shape: &[usize],
    values: &[f32],
    labels: &[u32],
) -> Result<Vec<u8>, CodecError> {
    let count: usize = shape.iter().product();
    if count != values.len() || shape.is_empty() {
        return Err(CodecError::Length {
            expected: count,
            actual: values.len(),
        });
    }
    if !values.iter().all(|v| v.is_finite()) {
        return Err(CodecError::NonFinite {
            segment: "cut tensor".into(),
        });
    }
    let dims = shape
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| CodecError::TooLarge("cut tensor".into())))
        .collect::<Result<Vec<u32>, _>>()?;
    let (groups, body) = match codec.precision {
        CutPrecision::F32 => (Vec::new(), bytemuck_f32(values)),
        CutPrecision::Int8PerChannel | CutPrecision::Int8PerTensor => {
            let channels = match codec.precision {
                CutPrecision::Int8PerChannel => shape.last().copied().unwrap_or(1),
                _ => 1,
            };
            let QuantizedTensor { params, levels } = quantize(values, channels);
            (params, levels)
        }
    };
    let body_len = body.len() as u64;
    let body = match codec.zstd {
        Some(level) => zstd::bulk::compress(&body, level).map_err(|e| CodecError::Zstd(e.to_string()))?,
        None => body,
    };
    let header = CutHeader {
        precision: codec.precision,
        shape: dims,
        groups,
        labels: labels.to_vec(),
        zstd: codec.zstd.is_some(),
        body_len,
    };
    seal(CUT_MAGIC, &header, &body)
}

fn bytemuck_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes a cut message within `limits`.
pub fn decode_cut(bytes: &[u8], limits: &CutLimits) -> Result<CutTensor, DecodeError> {
    let (header, body): (CutHeader, &[u8]) = open(bytes, CUT_MAGIC, limits.max_bytes)?;
    let shape: Vec<usize> = header.shape.iter().map(|&d| d as usize).collect();
    let count = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| DecodeError::corrupt("shape overflows"))?;
    if shape.is_empty() || count > limits.max_values {
        return Err(DecodeError::TooLarge {
            size: count,
            limit: limits.max_values,
        });
    }
    if !header.labels.is_empty() && header.labels.len() != shape[0] {
        return Err(DecodeError::corrupt("label count differs from the batch"));
    }
    let width = match header.precision {
        CutPrecision::F32 => 4,
        CutPrecision::Int8PerChannel | CutPrecision::Int8PerTensor => 1,
    };
    if header.body_len != count * width {
        return Err(DecodeError::corrupt("body length does not fit the shape"));
    }
    let body = open_body(body, header.zstd, header.body_len)?;
    let values = match header.precision {
        CutPrecision::F32 => {
            if !header.groups.is_empty() {
                return Err(DecodeError::corrupt("an f32 tensor carries quantisation groups"));
            }
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>()
        }
        CutPrecision::Int8PerChannel | CutPrecision::Int8PerTensor => {
            let expected = match header.precision {
                CutPrecision::Int8PerChannel => shape[shape.len() - 1],
                _ => 1,
            };
            if header.groups.len() != expected.max(1) {
                return Err(DecodeError::corrupt(
                    "quantisation groups do not match the channels",
                ));
            }
            if header
                .groups
                .iter()
                .any(|g| !(g.scale.is_finite() && g.scale > 0.0))
            {
                return Err(DecodeError::corrupt(
                    "a quantisation scale is not positive and finite",
                ));
            }
            dequantize(&QuantizedTensor {
                params: header.groups,
                levels: body.into_owned(),
            })
        }
    };
    if !values.iter().all(|v| v.is_finite()) {
        return Err(DecodeError::corrupt("non-finite values"));
    }
    Ok(CutTensor {
        shape,
        values,
        labels: header.labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> CutLimits {
        CutLimits::for_batches(64, 4096)
    }

    #[test]
    fn codecs_parse_and_print_back() {
        for text in ["f32", "int8", "int8-tensor", "int8 | zstd(1)", "f32 | zstd(3)"] {
            let codec: CutCodec = text.parse().unwrap();
            assert_eq!(codec.to_string(), text);
        }
        for bad in [
            "",
            "int4",
            "int8 | zstd",
            "int8 | zstd(0)",
            "int8 | huffman",
            "f32 | zstd(1) | zstd(2)",
        ] {
            assert!(bad.parse::<CutCodec>().is_err(), "{bad}");
        }
        assert_eq!(CutCodec::default_activations().to_string(), "int8 | zstd(1)");
    }

    proptest! {
        /// f32 is exact, 8-bit within half a step per channel; labels and shape come back.
        #[test]
        fn round_trips(
            batch in 1usize..5,
            channels in 1usize..7,
            spatial in 1usize..9,
            seed in any::<u32>(),
            codec in prop::sample::select(vec!["f32", "int8", "int8-tensor", "int8 | zstd(1)", "f32 | zstd(2)"]),
        ) {
            let codec: CutCodec = codec.parse().unwrap();
            let shape = [batch, spatial, channels];
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 * 8.0 - 3.0)
                .collect();
            let labels: Vec<u32> = (0..batch as u32).collect();
            let bytes = encode_cut(&codec, &shape, &values, &labels).unwrap();
            let back = decode_cut(&bytes, &limits()).unwrap();
            prop_assert_eq!(&back.shape, &shape.to_vec());
            prop_assert_eq!(&back.labels, &labels);
            if codec.is_exact() {
                prop_assert_eq!(&back.values, &values);
            } else {
                let groups = if codec.precision == CutPrecision::Int8PerChannel { channels } else { 1 };
                let q = quantize(&values, groups);
                for (i, (a, b)) in values.iter().zip(&back.values).enumerate() {
                    let step = q.params[i % groups].scale;
                    prop_assert!((a - b).abs() <= step / 2.0 * 1.001 + 1e-6);
                }
            }
        }

        /// Arbitrary and mutated bytes are refused with an error, never a panic.
        #[test]
        fn bad_bytes_are_errors(noise in prop::collection::vec(any::<u8>(), 0..200), flip in 0usize..400) {
            let _ = decode_cut(&noise, &limits());
            let good = encode_cut(&CutCodec::default_activations(), &[2, 3, 4], &[0.5; 24], &[1, 2]).unwrap();
            let mut bad = good.clone();
            let i = flip % bad.len();
            bad[i] ^= 0x5a;
            prop_assert!(decode_cut(&bad, &limits()).is_err());
            prop_assert!(decode_cut(&good[..good.len() - 1 - flip % (good.len() - 1)], &limits()).is_err());
        }
    }

    #[test]
    fn limits_and_bad_input_are_refused() {
        let codec = CutCodec::EXACT;
        let big = encode_cut(&codec, &[4, 100], &[1.0; 400], &[]).unwrap();
        let tight = CutLimits {
            max_bytes: 1 << 20,
            max_values: 399,
        };
        assert!(matches!(
            decode_cut(&big, &tight),
            Err(DecodeError::TooLarge { .. })
        ));
        let small = CutLimits {
            max_bytes: 100,
            max_values: 1000,
        };
        assert!(matches!(
            decode_cut(&big, &small),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(encode_cut(&codec, &[2, 3], &[1.0; 5], &[]).is_err());
        assert!(encode_cut(&codec, &[1, 2], &[1.0, f32::NAN], &[]).is_err());
        let mut layout = shoal_core::LayoutBuilder::new();
        layout
            .push("w", &[3], shoal_core::SegmentKind::Trainable)
            .unwrap();
        let payload = crate::encode(&crate::CodecSpec::identity(), &layout.build(), &[1.0; 3], 0).unwrap();
        assert!(matches!(
            decode_cut(&payload, &limits()),
            Err(DecodeError::BadMagic)
        ));
    }

    #[test]
    fn eight_bits_take_a_quarter_of_the_bytes() {
        let values: Vec<f32> = (0..4096).map(|i| (i % 97) as f32 * 0.01).collect();
        let f32_len = encode_cut(&CutCodec::EXACT, &[8, 64, 8], &values, &[])
            .unwrap()
            .len();
        let tensor_len = encode_cut(&"int8-tensor".parse().unwrap(), &[8, 64, 8], &values, &[])
            .unwrap()
            .len();
        let channel_len = encode_cut(&"int8".parse().unwrap(), &[8, 64, 8], &values, &[])
            .unwrap()
            .len();
        // 4 bytes per value against 1, plus 5 bytes of scale and zero point per group.
        assert!(f32_len >= 4 * 4096, "{f32_len}");
        assert!(tensor_len <= 4096 + 64, "{tensor_len}");
        assert!(channel_len <= 4096 + 8 * 5 + 64, "{channel_len}");
    }
}
