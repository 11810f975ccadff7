//! The core [`Compressor`] trait implemented by the codec chain, so client rules (SCALLION, SCAFCOM,
//! error feedback) compress with real codecs: `C(v)` is exactly what a server decodes from the
//! payload, and the payload's size is kept for accounting.

use crate::payload::{self, DecodeLimits};
use crate::spec::CodecSpec;
use shoal_core::{CompressError, Compressor, Layout};
use std::sync::Arc;

/// A codec chain as a compression operator over vectors laid out by one model's layout.
#[derive(Debug, Clone)]
pub struct CodecCompressor {
    spec: CodecSpec,
    layout: Arc<Layout>,
    seed: u64,
    calls: u64,
    last_payload_bytes: usize,
    /// Payloads of `compress` calls, kept when recording (what a device then sends).
    recorded: Option<Vec<Vec<u8>>>,
}

impl CodecCompressor {
    /// `spec` over vectors of `layout`; each call draws its random stages from `seed` and a
    /// counter, so a run is reproducible and successive calls differ.
    pub fn new(spec: CodecSpec, layout: Arc<Layout>, seed: u64) -> Self {
        Self {
            spec,
            layout,
            seed,
            calls: 0,
            last_payload_bytes: 0,
            recorded: None,
        }
    }

    /// Keeps the payload of every [`Compressor::compress`] call, so a rule that compresses its own
    /// upload (SCALLION, SCAFCOM) can send exactly the bytes whose decoding it used.
    pub fn recording(mut self) -> Self {
        self.recorded = Some(Vec::new());
        self
    }

    /// The payloads recorded since the last call, oldest first.
    pub fn take_recorded(&mut self) -> Vec<Vec<u8>> {
        self.recorded.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Bytes of the payload the last call produced.
    pub fn last_payload_bytes(&self) -> usize {
        self.last_payload_bytes
    }

    /// Encodes `v` as a payload without changing it.
    pub fn encode(&mut self, v: &[f32]) -> Result<Vec<u8>, CompressError> {
        let seed = self
            .seed
            .wrapping_add(self.calls.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        self.calls += 1;
        let bytes = payload::encode(&self.spec, &self.layout, v, seed).map_err(|e| match e {
            crate::CodecError::NonFinite { .. } => CompressError::NonFinite,
            crate::CodecError::Length { expected, actual } => CompressError::Length { expected, actual },
            other => CompressError::Other(other.to_string()),
        })?;
        self.last_payload_bytes = bytes.len();
        Ok(bytes)
    }
}

impl Compressor for CodecCompressor {
    fn compress(&mut self, v: &mut [f32]) -> Result<(), CompressError> {
        let bytes = self.encode(v)?;
        payload::decode_into(&bytes, &self.layout, &DecodeLimits::for_dim(v.len()), v)
            .map_err(|e| CompressError::Other(format!("own payload failed to decode: {e}")))?;
        if let Some(recorded) = self.recorded.as_mut() {
            recorded.push(bytes);
        }
        Ok(())
    }

    fn is_unbiased(&self) -> bool {
        self.spec.is_unbiased()
    }
}
