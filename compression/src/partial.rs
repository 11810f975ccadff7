//! The wire format of a partial aggregate: the f64 sums `Σ w_i v_i` of one process's uploads, their
//! total weight `Σ w_i` and how many were folded — what a leaf fl-server forwards to the top, never
//! an average (ALGORITHMS.md §6.4), so the top's merge gives exactly the flat aggregate.
//!
//! ```text
//! magic "SHPS" | version | header length | postcard header (layout fingerprint, parts, dim,
//! total weight, count) | body: parts × dim f64 little-endian | xxh3-64
//! ```
//! The frame code is the payload format's. [`decode_partial`] checks the layout, the declared size
//! against the bytes that came and the receiver's limit before it allocates, and every value.

use crate::error::{CodecError, DecodeError};
use crate::payload::{open, seal};
use serde::{Deserialize, Serialize};
use shoal_core::Layout;

/// The first bytes of a partial aggregate.
pub const PARTIAL_MAGIC: [u8; 4] = *b"SHPS";

#[derive(Debug, Serialize, Deserialize)]
struct PartialHeader {
    fingerprint: u64,
    parts: u32,
    dim: u64,
    total_weight: f64,
    count: u64,
}

/// A partial aggregate as it crosses the wire (the aggregation crate's accumulator holds the same
/// numbers: `Accumulator::from_sums` takes these).
#[derive(Debug, Clone, PartialEq)]
pub struct PartialSums {
    /// `Σ w_i v_i`, one vector per uploaded part.
    pub sums: Vec<Vec<f64>>,
    /// `Σ w_i`.
    pub total_weight: f64,
    /// Uploads folded.
    pub count: u64,
}

/// Bytes of the frame around a partial of `parts` vectors of `dim` values (header at most 64).
pub fn partial_bytes_bound(parts: usize, dim: usize) -> u64 {
    (parts as u64) * (dim as u64) * 8 + 64 + 17
}

/// Encodes the sums `sums` (one vector per part, each laid out by `layout`), their total weight and
/// the number of uploads folded into them.
pub fn encode_partial(
    sums: &[&[f64]],
    total_weight: f64,
    count: u64,
    layout: &Layout,
) -> Result<Vec<u8>, CodecError> {
    if let Some(bad) = sums.iter().find(|s| s.len() != layout.len()) {
        return Err(CodecError::Length {
            expected: layout.len(),
            actual: bad.len(),
        });
    }
    let header = PartialHeader {
        fingerprint: layout.fingerprint(),
        parts: u32::try_from(sums.len()).map_err(|_| CodecError::TooLarge("partial parts".into()))?,
        dim: layout.len() as u64,
        total_weight,
        count,
    };
    let mut body = Vec::with_capacity(sums.len() * layout.len() * 8);
    for sum in sums {
        for v in *sum {
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    seal(PARTIAL_MAGIC, &header, &body)
}

/// Decodes a partial aggregate for `layout` with `parts` vectors per upload; refuses anything
/// else, and anything larger than `max_bytes`, with an error.
pub fn decode_partial(
    bytes: &[u8],
    layout: &Layout,
    parts: usize,
    max_bytes: u64,
) -> Result<PartialSums, DecodeError> {
    let (header, body): (PartialHeader, &[u8]) = open(bytes, PARTIAL_MAGIC, max_bytes)?;
    if header.fingerprint != layout.fingerprint() {
        return Err(DecodeError::LayoutMismatch {
            expected: layout.fingerprint(),
            actual: header.fingerprint,
        });
    }
    if header.dim != layout.len() as u64 || header.parts as usize != parts {
        return Err(DecodeError::corrupt(format!(
            "a partial of {} × {} values, the run's uploads are {parts} × {}",
            header.parts,
            header.dim,
            layout.len()
        )));
    }
    if body.len() as u64 != (parts as u64) * header.dim * 8 {
        return Err(DecodeError::corrupt(
            "partial body length differs from its header",
        ));
    }
    if !(header.total_weight.is_finite() && header.total_weight >= 0.0) {
        return Err(DecodeError::corrupt(
            "partial total weight is not a finite number >= 0",
        ));
    }
    let sums: Vec<Vec<f64>> = body
        .chunks_exact(layout.len().max(1) * 8)
        .map(|part| {
            part.chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect()
        })
        .collect();
    if sums.iter().flatten().any(|v| !v.is_finite()) {
        return Err(DecodeError::corrupt("partial sums hold a non-finite value"));
    }
    Ok(PartialSums {
        sums,
        total_weight: header.total_weight,
        count: header.count,
    })
}

/// Whether `bytes` start like a partial aggregate (rather than an update payload).
pub fn is_partial(bytes: &[u8]) -> bool {
    bytes.starts_with(&PARTIAL_MAGIC)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use shoal_aggregators::Accumulator;
    use shoal_core::{LayoutBuilder, SegmentKind};

    fn encode(acc: &Accumulator, l: &Layout) -> Vec<u8> {
        let sums: Vec<&[f64]> = (0..acc.parts()).map(|p| acc.sum(p)).collect();
        encode_partial(&sums, acc.total_weight(), acc.count(), l).unwrap()
    }

    fn layout(dim: usize) -> Layout {
        let mut b = LayoutBuilder::new();
        b.push("w", &[dim], SegmentKind::Trainable).unwrap();
        b.build()
    }

    proptest! {
        #[test]
        fn partials_round_trip_exactly(
            values in proptest::collection::vec(-1e6f32..1e6, 1..200),
            weights in proptest::collection::vec(0.0f64..1e3, 1..6),
            parts in 1usize..3,
        ) {
            let dim = values.len();
            let l = layout(dim);
            let mut acc = Accumulator::new(parts, dim);
            for w in &weights {
                let upload: Vec<&[f32]> = (0..parts).map(|_| values.as_slice()).collect();
                acc.fold(&upload, *w).unwrap();
            }
            let bytes = encode(&acc, &l);
            prop_assert!(bytes.len() as u64 <= partial_bytes_bound(parts, dim));
            let back = decode_partial(&bytes, &l, parts, partial_bytes_bound(parts, dim)).unwrap();
            let back = Accumulator::from_sums(back.sums, back.total_weight, back.count).unwrap();
            prop_assert_eq!(back, acc);
        }

        #[test]
        fn mutated_or_arbitrary_bytes_are_refused_without_panic(
            flip in 0usize..4096,
            junk in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let l = layout(50);
            let mut acc = Accumulator::new(1, 50);
            acc.fold(&[&[0.5f32; 50]], 2.0).unwrap();
            let mut bytes = encode(&acc, &l);
            let i = flip % bytes.len();
            bytes[i] ^= 0x40;
            prop_assert!(decode_partial(&bytes, &l, 1, 1 << 20).is_err());
            prop_assert!(decode_partial(&junk, &l, 1, 1 << 20).is_err());
        }
    }

    #[test]
    fn a_partial_for_another_shape_or_over_the_limit_is_refused() {
        let l = layout(10);
        let acc = Accumulator::new(2, 10);
        let bytes = encode(&acc, &l);
        assert!(is_partial(&bytes));
        assert!(matches!(
            decode_partial(&bytes, &layout(11), 2, 1 << 20),
            Err(DecodeError::LayoutMismatch { .. })
        ));
        assert!(decode_partial(&bytes, &l, 1, 1 << 20).is_err());
        assert!(matches!(
            decode_partial(&bytes, &l, 2, 100),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
