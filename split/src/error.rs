//! Errors of split training and inference.

use shoal_aggregators::FoldError;
use shoal_compression::{CodecError, DecodeError};
use shoal_core::CompressError;
use shoal_model::ModelError;
use thiserror::Error;

/// Why a split step failed.
#[derive(Debug, Error)]
pub enum SplitError {
    /// The network refused the input (shape, labels) or the cut.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// A tensor could not be encoded.
    #[error("encoding a cut tensor: {0}")]
    Codec(#[from] CodecError),
    /// The head update could not be encoded with the upload codec.
    #[error("encoding the head update: {0}")]
    Upload(#[from] CompressError),
    /// A peer's cut message was refused.
    #[error("decoding a cut message: {0}")]
    Decode(#[from] DecodeError),
    /// A head or tail update could not be folded.
    #[error("averaging: {0}")]
    Fold(#[from] FoldError),
    /// A cut tensor of the wrong shape.
    #[error("cut tensor of per-sample shape {actual:?}, expected {expected:?}")]
    Shape {
        /// What this side expects.
        expected: Vec<usize>,
        /// What arrived.
        actual: Vec<usize>,
    },
    /// A forward message without one label per sample.
    #[error("a forward message needs one label per sample: {labels} labels for {batch} samples")]
    Labels {
        /// Labels received.
        labels: usize,
        /// Samples in the batch.
        batch: usize,
    },
    /// A gradient arrived with no batch waiting for it.
    #[error("a gradient arrived but no batch is in flight")]
    NothingInFlight,
    /// The loss stopped being finite.
    #[error("training diverged (loss {0})")]
    Diverged(f32),
    /// The `[split]` table cannot run.
    #[error("[split]: {0}")]
    Config(String),
}
