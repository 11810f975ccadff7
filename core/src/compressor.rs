//! The compressor trait: how a client rule compresses what it uploads without depending on the
//! compression crate.
//!
//! A rule such as SCALLION or SCAFCOM needs the *value* the server will decode, `C(v)`, to update its
//! own control variates; the bytes on the wire are the codec's business. `shoal-compression`
//! implements this trait for its codecs; [`IdentityCompressor`] is the exact, lossless case
//! (`C(v) = v`) that the equivalence tests of ALGORITHMS.md use.

use thiserror::Error;

/// Failure to compress a vector.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CompressError {
    /// The input holds NaN or infinite values.
    #[error("cannot compress a vector with non-finite values")]
    NonFinite,
    /// The input's length does not match what the compressor was built for.
    #[error("compressor expects {expected} values, got {actual}")]
    Length {
        /// The length the compressor expects.
        expected: usize,
        /// The length supplied.
        actual: usize,
    },
    /// Any other failure, described by the compressor.
    #[error("{0}")]
    Other(String),
}

/// A (possibly lossy, possibly random) compression operator `C`.
pub trait Compressor {
    /// Replaces `v` by `C(v)`: the values the receiver will reconstruct.
    fn compress(&mut self, v: &mut [f32]) -> Result<(), CompressError>;

    /// True when `E[C(v)] = v` (rand-k, QSGD, identity); false for biased operators (top-k, sign).
    fn is_unbiased(&self) -> bool;
}

/// `C(v) = v`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityCompressor;

impl Compressor for IdentityCompressor {
    fn compress(&mut self, v: &mut [f32]) -> Result<(), CompressError> {
        if v.iter().all(|x| x.is_finite()) {
            Ok(())
        } else {
            Err(CompressError::NonFinite)
        }
    }

    fn is_unbiased(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_keeps_values_and_rejects_non_finite() {
        let mut v = vec![1.0, -2.5, 0.0];
        IdentityCompressor.compress(&mut v).unwrap();
        assert_eq!(v, vec![1.0, -2.5, 0.0]);
        assert_eq!(
            IdentityCompressor.compress(&mut [f32::NAN]),
            Err(CompressError::NonFinite)
        );
        assert!(IdentityCompressor.is_unbiased());
    }
}
