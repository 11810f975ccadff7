//! `[server]` of an experiment: the simulated server — the compute that serves split tails, and
//! the aggregation runtime whose work can be charged on the virtual clock.
//!
//! With `[server.aggregation]`, every fold and every aggregation costs virtual time from fl-server's
//! cost model ([`shoal_aggregators::hierarchy`]): uploads are folded eagerly on up to `max_leaves`
//! leaves as they arrive, and a new version is ready — and its tasks start downloading — only once
//! the leaves are done and their partial sums are merged up the tree. Without it, aggregation is
//! free and instantaneous, as it was before the option.

use serde::{Deserialize, Serialize};
use shoal_aggregators::hierarchy::{AggregationTimeline, CostModel, PlanLimits};

/// `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerModel {
    /// FLOP/s of one server worker, in units of 10⁹.
    #[serde(default = "default_server_gflops")]
    pub gflops: f64,
    /// Workers serving split minibatches at once (SplitFed V1; V2 serves one task at a time).
    #[serde(default = "default_server_lanes")]
    pub lanes: usize,
    /// Charge aggregation on the virtual clock (absent: aggregation takes no time).
    #[serde(default)]
    pub aggregation: Option<AggregationModel>,
}

fn default_server_gflops() -> f64 {
    200.0
}

fn default_server_lanes() -> usize {
    4
}

impl Default for ServerModel {
    fn default() -> Self {
        Self {
            gflops: default_server_gflops(),
            lanes: default_server_lanes(),
            aggregation: None,
        }
    }
}

/// `[server.aggregation]`: the aggregation runtime's capacity and costs.
///
/// ```toml
/// [server.aggregation]
/// max_leaves = 2                       # leaves folding at once (the server's cores)
/// leaves_per_middle = 4
/// memory_mb = 2048                     # caps the leaves at memory / (8 bytes × values)
/// cost = { fold_ns_per_value = 3.0 }   # measured by `fl-server bench-aggregate`
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationModel {
    /// Leaves folding at once.
    #[serde(default = "default_max_leaves")]
    pub max_leaves: usize,
    /// Leaves one middle merges.
    #[serde(default = "default_leaves_per_middle")]
    pub leaves_per_middle: usize,
    /// Memory the leaves' accumulators may take (MiB).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Nanoseconds per value of a fold, a merge, an allocation.
    #[serde(default)]
    pub cost: CostModel,
}

fn default_max_leaves() -> usize {
    2
}
fn default_leaves_per_middle() -> usize {
    4
}
fn default_memory_mb() -> u64 {
    2048
}

impl AggregationModel {
    /// Checks the values serde cannot.
    pub fn check(&self) -> Result<(), String> {
        self.limits().check()?;
        self.cost.check()
    }

    fn limits(&self) -> PlanLimits {
        PlanLimits {
            max_leaves: self.max_leaves,
            memory_bytes: self.memory_mb.saturating_mul(1 << 20),
            // Leaves join as uploads queue; the fan-in only plans fl-server's first leaves.
            fan_in: usize::MAX,
            leaves_per_middle: self.leaves_per_middle,
        }
    }

    /// A timeline for uploads of `values` values (vectors per upload × model dimension).
    pub fn timeline(&self, values: usize) -> AggregationTimeline {
        AggregationTimeline::new(self.cost, self.limits(), values)
    }
}
