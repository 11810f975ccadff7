//! Shoal's shared vocabulary, with no IO (but [`usage`], the process's own resource usage, and
//! [`durable`], the atomic files fl-server and fl-client keep their state in) and few dependencies.
//!
//! Everything else in the workspace speaks in these types:
//! - [`Params`] and [`Layout`]: a whole model as one contiguous `f32` buffer with named segments.
//!   Layers, gradients, codecs, aggregation and the wire all work on this one representation.
//! - [`Timestamp`]: time as a value (integer microseconds), so the core never reads a clock.
//! - [`ClientId`], [`ModelVersion`], [`TaskId`] and [`UpdateMeta`]: who sent what, computed on which
//!   version, from how many samples and local steps.
//! - [`GradientOracle`]: the small trait through which a client rule asks for a stochastic gradient,
//!   so that the algorithms never depend on the neural-network crate; [`Compressor`], through which
//!   a client rule compresses what it uploads, so they never depend on the compression crate.

mod compressor;
pub mod durable;
mod error;
mod ids;
mod oracle;
mod params;
mod time;
mod update;
pub mod usage;

pub use compressor::{CompressError, Compressor, IdentityCompressor};
pub use error::CoreError;
pub use ids::{ClientId, ModelVersion, TaskId};
pub use oracle::{GradientOracle, OracleError, check_dims};
pub use params::{Layout, LayoutBuilder, Params, Segment, SegmentKind};
pub use time::{Timestamp, micros_from_secs};
pub use update::UpdateMeta;
