//! Typed errors of the model crate: building and running networks, and loading data.

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong when building or running a network.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The layers do not fit together (or do not fit the input).
    #[error("model `{model}`: {reason}")]
    Architecture {
        /// Model name.
        model: String,
        /// Which layer and why.
        reason: String,
    },
    /// A model name the zoo does not know.
    #[error("unknown model `{0}`; known models: logreg, mlp, cnn, lenet5")]
    UnknownModel(String),
    /// A batch whose per-sample shape is not the model's input shape.
    #[error("model `{model}` expects input [batch, {expected:?}], got {actual:?}")]
    InputShape {
        /// Model name.
        model: String,
        /// Per-sample shape the model takes.
        expected: Vec<usize>,
        /// Full shape received.
        actual: Vec<usize>,
    },
    /// An empty batch.
    #[error("model `{0}` was given an empty batch")]
    EmptyBatch(String),
    /// A label outside `0..classes`, or a label count that differs from the batch size.
    #[error("labels do not fit model `{model}`: {reason}")]
    Labels {
        /// Model name.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// Training produced a NaN or infinite loss.
    #[error("training diverged at step {step}: loss {loss}; lower the learning rate")]
    Diverged {
        /// Optimiser step at which the loss stopped being finite.
        step: usize,
        /// The loss.
        loss: f32,
    },
    /// `backward` without a training `forward` before it.
    #[error("backward called without a training forward pass")]
    NoForwardPass,
    /// A parameter or gradient buffer of the wrong length.
    #[error(transparent)]
    Core(#[from] shoal_core::CoreError),
    /// The cut layer of a split does not exist or cannot be cut at.
    #[error("cannot split model `{model}` at `{layer}`: {reason}")]
    Split {
        /// Model name.
        model: String,
        /// Requested cut layer.
        layer: String,
        /// Why not.
        reason: String,
    },
}

/// What can go wrong when loading or partitioning a dataset.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file that is needed is not there.
    #[error("{what} not found at {}: {hint}", path.display())]
    Missing {
        /// What the file is.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
        /// How to provide it.
        hint: String,
    },
    /// Neither a data directory flag nor the environment variable was given.
    #[error("no data directory given: {0}")]
    NoDataDir(String),
    /// A file that exists but does not hold what was expected.
    #[error("{} is malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },
    /// An IO error while reading a file.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A dataset name that Shoal does not know.
    #[error("unknown dataset `{0}`; known datasets: mnist, synthetic")]
    UnknownDataset(String),
    /// A configuration value out of range.
    #[error("invalid data configuration: {0}")]
    InvalidConfig(String),
    /// A partitioner could not satisfy its constraints.
    #[error("partition failed: {0}")]
    Partition(String),
}
