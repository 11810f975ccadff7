//! The payload format: what crosses the wire for one vector (an update, a control variate, a model).
//!
//! ```text
//! magic "SHOL" | format version (u8) | header length (u32 LE) | header (postcard) | body | xxh3-64 (u64 LE)
//! ```
//! The header names the codec chain (so any server decodes what any client sends), the layout
//! fingerprint and length (so an update for another model is refused), the seed of the random
//! stages, whether the body is zstd-compressed and its decompressed length, and per layer how it was
//! coded and how many body bytes it takes. The checksum covers every byte before it.
//!
//! [`decode`] refuses a malformed, truncated, oversized, mismatched or corrupted payload with a
//! [`DecodeError`] — never a panic — and allocates no more than the caller's [`DecodeLimits`] and
//! the receiver's own layout allow.

use crate::error::{CodecError, DecodeError};
use crate::spec::CodecSpec;
use crate::tensor::{self, TensorHeader};
use serde::{Deserialize, Serialize};
use shoal_core::Layout;
use xxhash_rust::xxh3::xxh3_64;

/// The first bytes of every payload.
pub const MAGIC: [u8; 4] = *b"SHOL";
/// The payload format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes around the header and body: magic, version, header length, checksum.
const FRAME_BYTES: usize = 4 + 1 + 4 + 8;

/// What the receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: u64,
    /// Largest decompressed body accepted, in bytes.
    pub max_body_bytes: u64,
}

impl DecodeLimits {
    /// Limits that fit any honest payload for a model of `dim` values: a body at most twice the
    /// dense size (indices plus values) plus 1 MiB of headers.
    pub fn for_dim(dim: usize) -> Self {
        let dense = 8 * dim as u64 + (1 << 20);
        Self {
            max_payload_bytes: dense,
            max_body_bytes: dense,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    codec: String,
    fingerprint: u64,
    dim: u64,
    seed: u64,
    zstd: bool,
    body_len: u64,
    tensors: Vec<TensorHeader>,
}

/// What a payload says about itself, for logs and accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadInfo {
    /// The codec chain it was encoded with.
    pub codec: CodecSpec,
    /// Its size in bytes.
    pub bytes: usize,
}

/// Encodes `values` (laid out by `layout`) with `spec`; `seed` drives the random stages and travels
/// in the payload, so the receiver needs no state.
pub fn encode(spec: &CodecSpec, layout: &Layout, values: &[f32], seed: u64) -> Result<Vec<u8>, CodecError> {
    if values.len() != layout.len() {
        return Err(CodecError::Length {
            expected: layout.len(),
            actual: values.len(),
        });
    }
    let mut tensors = Vec::with_capacity(layout.segments().len());
    let mut body = Vec::new();
    for (k, segment) in layout.segments().iter().enumerate() {
        let v = &values[segment.range()];
        if !v.iter().all(|x| x.is_finite()) {
            return Err(CodecError::NonFinite {
                segment: segment.name.clone(),
            });
        }
        if u32::try_from(v.len()).is_err() {
            return Err(CodecError::TooLarge(segment.name.clone()));
        }
        let layer_seed = seed.wrapping_add((k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (header, bytes) = tensor::encode(spec, v, segment.shape.len() == 1, layer_seed);
        tensors.push(header);
        body.extend(bytes);
    }
    let body_len = body.len() as u64;
    let body = match spec.zstd {
        Some(level) => zstd::bulk::compress(&body, level).map_err(|e| CodecError::Zstd(e.to_string()))?,
        None => body,
    };
    let header = Header {
        codec: spec.to_string(),
        fingerprint: layout.fingerprint(),
        dim: layout.len() as u64,
        seed,
        zstd: spec.zstd.is_some(),
        body_len,
        tensors,
    };
    seal(MAGIC, &header, &body)
}

/// Frames a postcard header and a body: `magic | version | header length | header | body | xxh3`.
/// The payload format and the cut-tensor format ([`crate::cut`]) share it.
pub(crate) fn seal(magic: [u8; 4], header: &impl Serialize, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    let header = postcard::to_stdvec(header).map_err(|e| CodecError::Header(e.to_string()))?;
    let mut out = Vec::with_capacity(FRAME_BYTES + header.len() + body.len());
    out.extend_from_slice(&magic);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    Ok(out)
}

/// The body of a frame: decompressed when `zstd`, and exactly `len` bytes long (the caller has
/// checked `len` against its limits).
pub(crate) fn open_body(
    body: &[u8],
    zstd: bool,
    len: u64,
) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    let body = if zstd {
        std::borrow::Cow::Owned(
            zstd::bulk::decompress(body, len as usize)
                .map_err(|e| DecodeError::corrupt(format!("zstd: {e}")))?,
        )
    } else {
        std::borrow::Cow::Borrowed(body)
    };
    if body.len() as u64 != len {
        return Err(DecodeError::corrupt("body length differs from the header"));
    }
    Ok(body)
}

/// Checks a frame written by [`seal`] (size limit, magic, version, checksum) and returns its parsed
/// header and its body.
pub(crate) fn open<H: serde::de::DeserializeOwned>(
    bytes: &[u8],
    magic: [u8; 4],
    max_bytes: u64,
) -> Result<(H, &[u8]), DecodeError> {
    if bytes.len() as u64 > max_bytes {
        return Err(DecodeError::TooLarge {
            size: bytes.len() as u64,
            limit: max_bytes,
        });
    }
    if bytes.len() < FRAME_BYTES {
        return Err(DecodeError::Truncated("frame"));
    }
    if bytes[..4] != magic {
        return Err(DecodeError::BadMagic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(bytes[4]));
    }
    let (content, checksum) = bytes.split_at(bytes.len() - 8);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(checksum);
    if xxh3_64(content) != u64::from_le_bytes(sum) {
        return Err(DecodeError::Checksum);
    }
    let header_len = u32::from_le_bytes([content[5], content[6], content[7], content[8]]) as usize;
    let rest = &content[9..];
    if header_len > rest.len() {
        return Err(DecodeError::Truncated("header"));
    }
    let (header_bytes, body) = rest.split_at(header_len);
    let header = postcard::from_bytes(header_bytes).map_err(|e| DecodeError::Header(e.to_string()))?;
    Ok((header, body))
}

/// Decodes a payload for `layout` into a new vector.
pub fn decode(
    bytes: &[u8],
    layout: &Layout,
    limits: &DecodeLimits,
) -> Result<(Vec<f32>, PayloadInfo), DecodeError> {
    let mut out = vec![0.0f32; layout.len()];
    let info = decode_into(bytes, layout, limits, &mut out)?;
    Ok((out, info))
}

/// Decodes a payload for `layout` into `out` (a pooled buffer of the layout's length).
pub fn decode_into(
    bytes: &[u8],
    layout: &Layout,
    limits: &DecodeLimits,
    out: &mut [f32],
) -> Result<PayloadInfo, DecodeError> {
    let (header, body): (Header, &[u8]) = open(bytes, MAGIC, limits.max_payload_bytes)?;
    let codec: CodecSpec = header
        .codec
        .parse()
        .map_err(|e: CodecError| DecodeError::Codec(e.to_string()))?;
    if header.fingerprint != layout.fingerprint() {
        return Err(DecodeError::LayoutMismatch {
            expected: layout.fingerprint(),
            actual: header.fingerprint,
        });
    }
    if header.dim != layout.len() as u64 || out.len() != layout.len() {
        return Err(DecodeError::corrupt("vector length differs from the layout"));
    }
    if header.tensors.len() != layout.segments().len() {
        return Err(DecodeError::corrupt("layer count differs from the layout"));
    }
    if header.zstd != codec.zstd.is_some() {
        return Err(DecodeError::corrupt("zstd flag contradicts the codec"));
    }
    if header.body_len > limits.max_body_bytes {
        return Err(DecodeError::TooLarge {
            size: header.body_len,
            limit: limits.max_body_bytes,
        });
    }
    let declared: u64 = header.tensors.iter().map(|t| u64::from(t.body_len)).sum();
    if declared != header.body_len {
        return Err(DecodeError::corrupt("layer sizes do not add up to the body"));
    }
    let body = open_body(body, header.zstd, header.body_len)?;
    let body: &[u8] = &body;
    let mut offset = 0usize;
    for (tensor, segment) in header.tensors.iter().zip(layout.segments()) {
        let end = offset + tensor.body_len as usize;
        tensor::decode(tensor, &body[offset..end], &mut out[segment.range()]).map_err(|e| match e {
            DecodeError::Corrupt(what) => DecodeError::Corrupt(format!("layer `{}`: {what}", segment.name)),
            other => other,
        })?;
        offset = end;
    }
    Ok(PayloadInfo {
        codec,
        bytes: bytes.len(),
    })
}
