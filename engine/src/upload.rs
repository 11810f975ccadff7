//! What an upload contributes and how its bytes become it: a client's payloads decoded and
//! checked as they arrive (fl-server's connections, its replay of stored updates, its audit and
//! benchmarks), or a leaf fl-server's partial aggregate.

use shoal_aggregators::Accumulator;
use shoal_compression::{DecodeError, DecodeLimits};
use shoal_core::Layout;
use std::sync::Arc;
use thiserror::Error;

/// A decoded upload, one vector per part, shared without copies between the connection that
/// decoded it, the store and the fold that consumes it.
pub type SharedUpload = Arc<[Vec<f32>]>;

/// What an accepted update contributes to an aggregation.
#[derive(Debug)]
pub enum Contribution {
    /// A client's decoded upload, folded with the scheduler's weight.
    Upload(SharedUpload),
    /// A leaf fl-server's partial aggregate, merged as it is: its sums already carry its clients'
    /// weights (the scheduler's weight for the leaf is not applied).
    Partial(Accumulator),
}

/// Why an upload is refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum UploadError {
    /// The parts' announced sizes do not add up to what arrived.
    #[error("parts announce {announced} bytes, {arrived} arrived")]
    Length {
        /// The sum of the announced part sizes (saturated).
        announced: u64,
        /// The bytes that arrived.
        arrived: u64,
    },
    /// A part's payload does not decode for the run's layout.
    #[error("part {part}: {source}")]
    Decode {
        /// The part.
        part: usize,
        /// Why.
        source: DecodeError,
    },
    /// A partial aggregate does not decode, or does not make an accumulator.
    #[error("partial aggregate: {0}")]
    Partial(String),
    /// An EF21 message does not match the client's memory `h_i`.
    #[error("EF21: {0}")]
    Ef21(String),
    /// A decoded value is NaN or infinite.
    #[error("part {part}: value {index} is not finite")]
    NotFinite {
        /// The part.
        part: usize,
        /// The value's index.
        index: usize,
    },
}

/// Decodes an upload's payloads (one per part, back to back in `bytes`, of `part_bytes` each) for
/// `layout`, within the size limits of that layout, and checks every value is finite. Any bytes a
/// peer sends give a value or an error, never a panic.
pub fn decode_upload(
    bytes: &[u8],
    part_bytes: &[u64],
    layout: &Layout,
) -> Result<Vec<Vec<f32>>, UploadError> {
    let limits = DecodeLimits::for_dim(layout.len());
    let announced = part_bytes.iter().fold(0u64, |a, &b| a.saturating_add(b));
    if announced != bytes.len() as u64 {
        return Err(UploadError::Length {
            announced,
            arrived: bytes.len() as u64,
        });
    }
    let mut rest = bytes;
    let mut parts = Vec::with_capacity(part_bytes.len());
    for (part, &len) in part_bytes.iter().enumerate() {
        // Each part is at most the total, which is the length of `bytes`.
        let (payload, tail) = rest.split_at(usize::try_from(len).unwrap_or(usize::MAX).min(rest.len()));
        rest = tail;
        let (values, _) = shoal_compression::decode(payload, layout, &limits)
            .map_err(|source| UploadError::Decode { part, source })?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(UploadError::NotFinite { part, index });
        }
        parts.push(values);
    }
    Ok(parts)
}

/// Decodes what an update file holds: a leaf's partial aggregate of `parts` vectors when
/// `partial`, else a client's payloads (see [`decode_upload`]).
pub fn decode_contribution(
    bytes: &[u8],
    part_bytes: &[u64],
    layout: &Layout,
    parts: usize,
    partial: bool,
) -> Result<Contribution, UploadError> {
    if !partial {
        return Ok(Contribution::Upload(Arc::from(decode_upload(
            bytes, part_bytes, layout,
        )?)));
    }
    if part_bytes.len() != 1 {
        return Err(UploadError::Partial(format!(
            "it comes in one part, not {}",
            part_bytes.len()
        )));
    }
    let sums = shoal_compression::partial::decode_partial(
        bytes,
        layout,
        parts,
        shoal_compression::partial::partial_bytes_bound(parts, layout.len()),
    )
    .map_err(|e| UploadError::Partial(e.to_string()))?;
    Accumulator::from_sums(sums.sums, sums.total_weight, sums.count)
        .map(Contribution::Partial)
        .map_err(|e| UploadError::Partial(e.to_string()))
}

/// EF21's server half for one client: its memory `h_i`, one vector per part (empty before its
/// first upload: zeros). The client sent `c = C(u − h_i)`; `h_i ← h_i + c`, and the server folds
/// the new `h_i` — what the device computed as its own `h_i` and what fl-sim folds.
pub fn ef21_receive(h: &mut Vec<Vec<f32>>, message: &[Vec<f32>]) -> Result<(), UploadError> {
    if h.is_empty() {
        *h = message.iter().map(|part| vec![0.0; part.len()]).collect();
    }
    if h.len() != message.len() {
        return Err(UploadError::Ef21(format!(
            "{} parts arrived, the memory has {}",
            message.len(),
            h.len()
        )));
    }
    for (h, c) in h.iter_mut().zip(message) {
        shoal_compression::feedback::ef21_receive(h, c).map_err(|e| UploadError::Ef21(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_compression::{CodecCompressor, CodecSpec};
    use shoal_core::{LayoutBuilder, SegmentKind};
    use std::sync::Arc;

    fn layout() -> Arc<Layout> {
        let mut b = LayoutBuilder::new();
        b.push("w", &[3, 4], SegmentKind::Trainable)
            .expect("a valid segment");
        Arc::new(b.build())
    }

    fn payload(values: &[f32]) -> Vec<u8> {
        let codec: CodecSpec = "identity".parse().expect("a codec");
        CodecCompressor::new(codec, layout(), 1)
            .encode(values)
            .expect("encodes")
    }

    #[test]
    fn an_upload_decodes_part_by_part_and_bad_ones_are_refused_by_name() {
        let a: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
        let (pa, pb) = (payload(&a), payload(&b));
        let bytes = [pa.clone(), pb.clone()].concat();
        let sizes = [pa.len() as u64, pb.len() as u64];
        assert_eq!(decode_upload(&bytes, &sizes, &layout()), Ok(vec![a, b]));
        assert!(matches!(
            decode_upload(&bytes, &[sizes[0], sizes[1] + 1], &layout()),
            Err(UploadError::Length { .. })
        ));
        assert!(matches!(
            decode_upload(&bytes, &[u64::MAX, 1], &layout()),
            Err(UploadError::Length { .. })
        ));
        let mut damaged = bytes.clone();
        damaged[pa.len() + 20] ^= 0xff;
        assert!(matches!(
            decode_upload(&damaged, &sizes, &layout()),
            Err(UploadError::Decode { part: 1, .. })
        ));
    }

    #[test]
    fn ef21_folds_the_memory_moved_by_each_message() {
        let mut h = Vec::new();
        ef21_receive(&mut h, &[vec![1.0, -2.0]]).expect("fits");
        assert_eq!(h, vec![vec![1.0, -2.0]]);
        ef21_receive(&mut h, &[vec![0.5, 0.0]]).expect("fits");
        assert_eq!(h, vec![vec![1.5, -2.0]]);
        assert!(ef21_receive(&mut h, &[vec![0.0; 2], vec![0.0; 2]]).is_err());
        assert!(ef21_receive(&mut h, &[vec![0.0; 3]]).is_err());
    }

    #[test]
    fn arbitrary_bytes_and_sizes_never_panic() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = payload(&[0.5; 12]);
        for _ in 0..2000 {
            let mut bytes = good.clone();
            let flips = next() % 4;
            for _ in 0..flips {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            bytes.truncate((next() as usize) % (bytes.len() + 1));
            let cut = (next() as usize) % (bytes.len() + 1);
            let sizes = [cut as u64, (bytes.len() - cut) as u64];
            let _ = decode_upload(&bytes, &sizes, &layout());
        }
    }
}
