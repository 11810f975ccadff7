//! Errors of encoding (bad input or configuration) and of decoding (bad bytes from a peer).

use thiserror::Error;

/// Why a codec could not be configured or could not encode.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CodecError {
    /// The codec chain does not parse or cannot run.
    #[error("codec `{spec}`: {reason}")]
    Spec {
        /// The chain as written.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The input holds NaN or infinite values.
    #[error("cannot encode non-finite values (segment `{segment}`)")]
    NonFinite {
        /// The segment holding them.
        segment: String,
    },
    /// The input does not have the layout's length.
    #[error("the layout has {expected} values, the input {actual}")]
    Length {
        /// The layout's length.
        expected: usize,
        /// The input's length.
        actual: usize,
    },
    /// A tensor too large for the format (more than 2³² − 1 values).
    #[error("segment `{0}` is too large for the payload format")]
    TooLarge(String),
    /// The final zstd stage failed.
    #[error("zstd: {0}")]
    Zstd(String),
    /// The payload header could not be written.
    #[error("payload header: {0}")]
    Header(String),
}

/// Why a payload was refused. Every malformed input ends here; none panics or allocates past the
/// caller's limits.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DecodeError {
    /// The payload is larger than the caller accepts.
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size (or the size it declares).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The payload ends before its declared content.
    #[error("payload truncated: {0}")]
    Truncated(&'static str),
    /// Not a Shoal payload.
    #[error("not a Shoal payload (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("payload format version {0} is not supported (this build reads version {current})", current = crate::payload::FORMAT_VERSION)]
    UnsupportedVersion(u8),
    /// The checksum does not match: the bytes were corrupted.
    #[error("payload checksum mismatch")]
    Checksum,
    /// The header does not parse.
    #[error("payload header: {0}")]
    Header(String),
    /// The codec chain named in the payload is unknown or invalid.
    #[error("payload codec: {0}")]
    Codec(String),
    /// The payload was built for another model.
    #[error("payload is for layout {actual:#018x}, the model is {expected:#018x}")]
    LayoutMismatch {
        /// The receiver's layout fingerprint.
        expected: u64,
        /// The payload's.
        actual: u64,
    },
    /// The payload's content contradicts itself or the layout.
    #[error("payload corrupt: {0}")]
    Corrupt(String),
}

impl DecodeError {
    /// A `Corrupt` error.
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        DecodeError::Corrupt(what.into())
    }
}
