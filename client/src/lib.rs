//! fl-client, Shoal's device agent.
//!
//! - [`local_data`]: the device's samples (a partition of a dataset, or IDX files).
//! - [`trainer`]: the method's client rule on those samples and the encoded upload.
//! - [`split_task`]: a split-learning task — the head on the device, the tail on the server,
//!   minibatches pipelined over the task's split stream.
//! - [`saved_state`]: the device's state between starts (rule state, feedback memory, the update
//!   not yet acknowledged), one atomically written file per run.
//! - [`agent`]: the QUIC session with fl-server — tasks, model and update streams, durable
//!   acknowledgements, reconnection with backoff.

pub mod agent;
pub mod local_data;
pub mod saved_state;
pub mod split_task;
pub mod trainer;
