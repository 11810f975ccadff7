//! fl-client, Shoal's device agent.
//!
//! - [`local_data`]: the device's samples (a partition of a dataset, or IDX files).
//! - [`trainer`]: the method's client rule on those samples and the encoded upload.
//! - [`agent`]: the QUIC session with fl-server — tasks, model and update streams, durable
//!   acknowledgements, reconnection with backoff.

pub mod agent;
pub mod local_data;
pub mod trainer;
