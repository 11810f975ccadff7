//! The server side's steps that both fl-server and fl-sim take after the Coordinator commands an
//! aggregation.

use shoal_aggregators::{AlgorithmConfig, ApplyContext};

/// The context of the server rule's `apply` for a [`Command::Aggregate`](shoal_aggregators::Command)
/// with population `num_clients` (and `previous_num_clients` at the aggregation before): the
/// uploads were computed with the configured local task.
pub fn apply_context(
    config: &AlgorithmConfig,
    num_clients: usize,
    previous_num_clients: usize,
) -> ApplyContext {
    ApplyContext {
        num_clients,
        previous_num_clients,
        task: config.local_task(config.local_steps),
    }
}
