//! Shoal's neural-network engine on ndarray, with datasets and partitioners.
//!
//! - [`layers`]: Dense, Conv2d (im2col + matrix multiply), MaxPool2d, ReLU, Flatten, each with a
//!   forward and a backward pass over views into the flat parameter buffer.
//! - [`Model`]: a sequential network whose parameters and gradients are one flat buffer each,
//!   sharing a [`shoal_core::Layout`]; [`zoo`] builds the named models (`logreg`, `mlp`, `cnn`,
//!   `lenet5`) with seeded initialisation; [`split`] cuts a model into a device head and a server
//!   tail, optionally with a bottleneck at the cut.
//! - [`train`]: minibatch SGD with momentum and weight decay, and evaluation; [`ModelOracle`]
//!   implements [`shoal_core::GradientOracle`] so client rules can train any model.
//! - [`data`]: MNIST from IDX files, the synthetic(α, β) benchmark, and partitioners.

pub mod data;
pub mod error;
pub mod gemm;
pub mod layers;
pub mod loss;
mod model;
mod oracle;
pub mod split;
pub mod train;
pub mod zoo;

pub use error::{DataError, ModelError};
pub use model::{Model, Workspace};
pub use oracle::ModelOracle;
