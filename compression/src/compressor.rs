//! The core [`Compressor`] trait implemented by the codec chain, so client rules (SCALLION, SCAFCOM,
//! error feedback) compress with real codecs: `C(v)` is exactly what a server decodes from the
//! payload (`shoal-engine` records the payloads a rule produced, to send exactly those).

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
        }
    }

    /// The layout the chain encodes against.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
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
        Ok(bytes)
    }
}

impl Compressor for CodecCompressor {
    fn compress(&mut self, v: &mut [f32]) -> Result<(), CompressError> {
        let bytes = self.encode(v)?;
        payload::decode_into(&bytes, &self.layout, &DecodeLimits::for_dim(v.len()), v)
            .map_err(|e| CompressError::Other(format!("own payload failed to decode: {e}")))?;
        Ok(())
    }

    fn is_unbiased(&self) -> bool {
        self.spec.is_unbiased()
    }
}
