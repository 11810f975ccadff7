//! Typed errors for the core types.

use thiserror::Error;

/// What can go wrong when building or combining layouts and parameter vectors.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// Two segments of one layout share a name.
    #[error("duplicate segment name `{0}` in layout")]
    DuplicateSegment(String),
    /// A segment has a zero-sized dimension or an element count that overflows `usize`.
    #[error("segment `{name}` has an invalid shape {shape:?}")]
    InvalidShape {
        /// The segment's name.
        name: String,
        /// The shape that was rejected.
        shape: Vec<usize>,
    },
    /// A buffer's length does not match the layout it is paired with.
    #[error("buffer holds {actual} values but the layout needs {expected}")]
    LengthMismatch {
        /// What the layout requires.
        expected: usize,
        /// What was supplied.
        actual: usize,
    },
    /// Two parameter vectors that must share a layout do not.
    #[error("layout fingerprints differ: {expected:016x} vs {actual:016x}")]
    LayoutMismatch {
        /// The fingerprint expected.
        expected: u64,
        /// The fingerprint found.
        actual: u64,
    },
    /// A segment looked up by name does not exist.
    #[error("no segment named `{0}` in layout")]
    UnknownSegment(String),
}
