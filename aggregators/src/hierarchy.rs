//! Planning hierarchical aggregation (ALGORITHMS.md §6): how many leaf, middle and top aggregators
//! one aggregation needs, what their work costs, and a virtual timeline of that work.
//!
//! Everything here is sans-IO. fl-server's runtime asks [`plan`] for the tree of each aggregation
//! and measures the [`CostModel`] it feeds back; fl-sim charges the same costs on its virtual clock
//! with an [`AggregationTimeline`], so a researcher sees when the server becomes the bottleneck.
//!
//! The tree is LIFL's: leaves fold client uploads eagerly as they arrive; each middle merges the
//! partial sums of its leaves (the leaves of one middle are placed together); the top merges the
//! middles and hands the sums to the server rule. Because aggregation is a monoid, any tree gives
//! the flat result up to f64 rounding.

use serde::{Deserialize, Serialize};

/// What aggregation work costs, per value of one uploaded vector.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    /// Folding one f32 value into an f64 sum (ns).
    #[serde(default = "default_fold_ns")]
    pub fold_ns_per_value: f64,
    /// Merging one f64 partial sum into another (ns).
    #[serde(default = "default_merge_ns")]
    pub merge_ns_per_value: f64,
    /// Allocating and faulting in one f64 of a new accumulator: the memory part of a cold start (ns).
    #[serde(default = "default_alloc_ns")]
    pub alloc_ns_per_value: f64,
    /// The fixed part of a cold start: spawning a worker (µs).
    #[serde(default = "default_spawn_us")]
    pub spawn_us: f64,
}

// Measured with `fl-server bench-aggregate` on the 2-core reference machine (two leaves folding at
// once share its memory bandwidth: 3.3–3.5 ns per value, 2.5 on one thread alone).
fn default_fold_ns() -> f64 {
    3.0
}
fn default_merge_ns() -> f64 {
    2.0
}
fn default_alloc_ns() -> f64 {
    8.0
}
fn default_spawn_us() -> f64 {
    60.0
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            fold_ns_per_value: default_fold_ns(),
            merge_ns_per_value: default_merge_ns(),
            alloc_ns_per_value: default_alloc_ns(),
            spawn_us: default_spawn_us(),
        }
    }
}

impl CostModel {
    /// Seconds to fold one upload of `values` values (all its vectors).
    pub fn fold_s(&self, values: usize) -> f64 {
        self.fold_ns_per_value * values as f64 * 1e-9
    }

    /// Seconds to merge one partial accumulator of `values` values into another.
    pub fn merge_s(&self, values: usize) -> f64 {
        self.merge_ns_per_value * values as f64 * 1e-9
    }

    /// Seconds of a cold start: a worker spawned and its accumulator allocated.
    pub fn cold_start_s(&self, values: usize) -> f64 {
        self.spawn_us * 1e-6 + self.alloc_ns_per_value * values as f64 * 1e-9
    }

    /// Checks that every cost is a finite non-negative number.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("fold_ns_per_value", self.fold_ns_per_value),
            ("merge_ns_per_value", self.merge_ns_per_value),
            ("alloc_ns_per_value", self.alloc_ns_per_value),
            ("spawn_us", self.spawn_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} = {v} must be a finite number >= 0"));
            }
        }
        Ok(())
    }
}

/// What one aggregation is expected to bring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// Updates expected (`U`).
    pub updates: usize,
    /// Arrivals per second while they come (`r`; 0 when unknown).
    pub arrival_rate: f64,
    /// Values per update: vectors per upload × model dimension.
    pub values: usize,
}

/// What the tree may use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanLimits {
    /// Most leaves folding at once (bounded by the cores the aggregation may use).
    pub max_leaves: usize,
    /// Memory the leaves' accumulators may take (bytes; each holds 8 bytes per value).
    pub memory_bytes: u64,
    /// Updates one leaf is planned to fold (`k`).
    pub fan_in: usize,
    /// Leaves one middle merges (the leaves that share a node).
    pub leaves_per_middle: usize,
}

impl PlanLimits {
    /// Checks the limits can plan a tree at all.
    pub fn check(&self) -> Result<(), String> {
        if self.max_leaves == 0 || self.fan_in == 0 || self.leaves_per_middle == 0 {
            return Err("max_leaves, fan_in and leaves_per_middle must be at least 1".into());
        }
        Ok(())
    }

    /// Leaves whose accumulators fit in the memory budget (at least one: an aggregation needs one).
    pub fn leaves_in_memory(&self, values: usize) -> usize {
        let per_leaf = (values as u64).saturating_mul(8).max(1);
        usize::try_from(self.memory_bytes / per_leaf)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// The most leaves an aggregation of `values`-value updates may have.
    pub fn leaf_cap(&self, values: usize) -> usize {
        self.max_leaves.min(self.leaves_in_memory(values)).max(1)
    }
}

/// The shape of one aggregation tree: how many leaves feed each middle; one top merges the middles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreePlan {
    /// Leaves under middle `m`, for each middle (every entry at least 1).
    pub groups: Vec<usize>,
}

impl TreePlan {
    /// A tree with `leaves` leaves spread as evenly as possible over `⌈leaves / per_middle⌉` middles.
    pub fn balanced(leaves: usize, per_middle: usize) -> Self {
        let leaves = leaves.max(1);
        let middles = leaves.div_ceil(per_middle.max(1));
        let base = leaves / middles;
        let extra = leaves % middles;
        Self {
            groups: (0..middles).map(|m| base + usize::from(m < extra)).collect(),
        }
    }

    /// Leaf aggregators.
    pub fn leaves(&self) -> usize {
        self.groups.iter().sum()
    }

    /// Middle aggregators.
    pub fn middles(&self) -> usize {
        self.groups.len()
    }

    /// Every aggregator of the tree, the top included.
    pub fn instances(&self) -> usize {
        self.leaves() + self.middles() + 1
    }

    /// The middle a new leaf joins when the tree grows: the emptiest group with room, else a new one.
    pub fn grow(&mut self, per_middle: usize) -> usize {
        match self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, n)| **n < per_middle.max(1))
            .min_by_key(|(_, n)| **n)
        {
            Some((m, _)) => {
                self.groups[m] += 1;
                m
            }
            None => {
                self.groups.push(1);
                self.groups.len() - 1
            }
        }
    }
}

/// Leaves a demand needs: `⌈U / k⌉` so that no leaf folds more than `k` updates, and `⌈r · a⌉` so
/// that folding keeps up with arrivals (`a` the fold time of one update) — bounded by the cores and
/// the memory the limits give (LIFL's hierarchy-aware precise scaling).
pub fn leaves_needed(demand: &Demand, limits: &PlanLimits, cost: &CostModel) -> usize {
    let by_fan_in = demand.updates.div_ceil(limits.fan_in.max(1));
    let rate = if demand.arrival_rate.is_finite() && demand.arrival_rate > 0.0 {
        demand.arrival_rate
    } else {
        0.0
    };
    let by_rate = (rate * cost.fold_s(demand.values)).ceil();
    let by_rate = if by_rate.is_finite() {
        by_rate as usize
    } else {
        usize::MAX
    };
    by_fan_in.max(by_rate).max(1).min(limits.leaf_cap(demand.values))
}

/// The tree of one aggregation (ALGORITHMS.md §6.3): [`leaves_needed`] leaves, packed
/// `leaves_per_middle` to a middle, one top.
pub fn plan(demand: &Demand, limits: &PlanLimits, cost: &CostModel) -> TreePlan {
    TreePlan::balanced(leaves_needed(demand, limits, cost), limits.leaves_per_middle)
}

/// Seconds the merges of a finished tree take after its leaves are done: the middles merge their
/// leaves in parallel (the first partial of a node is adopted, not added), then the top merges the
/// middles.
pub fn merge_s(tree: &TreePlan, values: usize, cost: &CostModel) -> f64 {
    let widest = tree.groups.iter().copied().max().unwrap_or(1);
    let merges = widest.saturating_sub(1) + tree.middles().saturating_sub(1);
    merges as f64 * cost.merge_s(values)
}

/// A virtual timeline of the server's aggregation work, for a simulator: uploads are folded on the
/// earliest free leaf when they arrive (eagerly), and an aggregation's new model is ready once every
/// leaf is done and the tree's merges have run.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregationTimeline {
    cost: CostModel,
    limits: PlanLimits,
    values: usize,
    /// When each leaf is free (virtual seconds); leaves stay warm across aggregations.
    leaves: Vec<f64>,
    /// Leaves that folded in the aggregation in progress.
    touched: Vec<bool>,
    /// When each fold of the aggregation in progress ends.
    fold_ends: Vec<f64>,
    /// Figures since the start.
    stats: TimelineStats,
}

/// What an [`AggregationTimeline`] measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineStats {
    /// Uploads folded.
    pub folds: u64,
    /// Aggregations finished.
    pub aggregations: u64,
    /// Leaf time spent folding (s).
    pub fold_busy_s: f64,
    /// Time uploads waited for a free leaf (s, summed).
    pub queue_wait_s: f64,
    /// Most uploads waiting or folding at one arrival.
    pub max_queue_depth: usize,
    /// Time from each aggregation's call to its new model, summed (s): the server's share of a round.
    pub aggregation_s: f64,
    /// The longest of those times (s).
    pub max_aggregation_s: f64,
    /// Most leaves one aggregation used.
    pub max_leaves: usize,
}

impl AggregationTimeline {
    /// A timeline for updates of `values` values (all vectors of one upload).
    pub fn new(cost: CostModel, limits: PlanLimits, values: usize) -> Self {
        Self {
            cost,
            limits,
            values,
            leaves: Vec::new(),
            touched: Vec::new(),
            fold_ends: Vec::new(),
            stats: TimelineStats::default(),
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> &TimelineStats {
        &self.stats
    }

    /// An upload arrives at `at`: it is folded on the leaf that is free first, a new leaf joining
    /// while the cap allows and every leaf is busy. Returns when its fold ends.
    pub fn arrive(&mut self, at: f64) -> f64 {
        let depth = self.fold_ends.iter().filter(|&&end| end > at).count() + 1;
        self.stats.max_queue_depth = self.stats.max_queue_depth.max(depth);
        let cap = self.limits.leaf_cap(self.values);
        let earliest = self
            .leaves
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let leaf = match earliest {
            Some((i, free)) if free <= at || self.leaves.len() >= cap => i,
            _ => {
                self.leaves.push(at);
                self.touched.push(false);
                self.leaves.len() - 1
            }
        };
        self.touched[leaf] = true;
        let start = self.leaves[leaf].max(at);
        let end = start + self.cost.fold_s(self.values);
        self.stats.queue_wait_s += start - at;
        self.stats.fold_busy_s += end - start;
        self.stats.folds += 1;
        self.leaves[leaf] = end;
        self.fold_ends.push(end);
        let used = self.touched.iter().filter(|&&t| t).count();
        self.stats.max_leaves = self.stats.max_leaves.max(used);
        end
    }

    /// The aggregation is called at `at`: returns when its new model is ready (every fold done, the
    /// leaves that folded merged through middles into the top). Leaves are free for the next
    /// aggregation once their own folds are done; the merges run on middles and the top.
    pub fn aggregate(&mut self, at: f64) -> f64 {
        let done = self.leaves.iter().copied().fold(at, f64::max);
        let used = self.touched.iter().filter(|&&t| t).count();
        let tree = TreePlan::balanced(used, self.limits.leaves_per_middle);
        let ready = done + merge_s(&tree, self.values, &self.cost);
        self.touched.iter_mut().for_each(|t| *t = false);
        self.fold_ends.clear();
        self.stats.aggregations += 1;
        self.stats.aggregation_s += ready - at;
        self.stats.max_aggregation_s = self.stats.max_aggregation_s.max(ready - at);
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(max_leaves: usize) -> PlanLimits {
        PlanLimits {
            max_leaves,
            memory_bytes: 1 << 40,
            fan_in: 10,
            leaves_per_middle: 4,
        }
    }

    proptest! {
        #[test]
        fn plans_cover_the_updates_within_the_caps(
            updates in 0usize..5000,
            rate in 0.0f64..1e4,
            values in 1usize..20_000_000,
            max_leaves in 1usize..64,
            fan_in in 1usize..50,
            per_middle in 1usize..8,
            memory_mb in 1u64..4096,
        ) {
            let limits = PlanLimits { max_leaves, memory_bytes: memory_mb << 20, fan_in, leaves_per_middle: per_middle };
            let demand = Demand { updates, arrival_rate: rate, values };
            let tree = plan(&demand, &limits, &CostModel::default());
            let cap = limits.leaf_cap(values);
            prop_assert!(tree.leaves() >= 1 && tree.leaves() <= cap);
            // #leaf · k ≥ U unless the caps bind.
            prop_assert!(tree.leaves() * fan_in >= updates || tree.leaves() == cap);
            prop_assert!(tree.groups.iter().all(|&g| g >= 1 && g <= per_middle));
            prop_assert_eq!(tree.middles(), tree.leaves().div_ceil(per_middle));
        }
    }

    #[test]
    fn arrivals_faster_than_folds_need_r_times_a_leaves() {
        let cost = CostModel::default();
        let values = 10_000_000;
        let a = cost.fold_s(values);
        let demand = Demand {
            updates: 1,
            arrival_rate: 3.5 / a,
            values,
        };
        assert_eq!(leaves_needed(&demand, &limits(64), &cost), 4);
        assert_eq!(leaves_needed(&demand, &limits(2), &cost), 2);
        // Memory for three accumulators of 80 MB caps the tree at three leaves.
        let tight = PlanLimits {
            memory_bytes: 3 * 80_000_000,
            ..limits(64)
        };
        assert_eq!(leaves_needed(&demand, &tight, &cost), 3);
    }

    #[test]
    fn growing_fills_the_emptiest_middle_then_opens_one() {
        let mut tree = TreePlan::balanced(3, 2);
        assert_eq!(tree.groups, vec![2, 1]);
        assert_eq!(tree.grow(2), 1);
        assert_eq!(tree.grow(2), 2);
        assert_eq!(tree.groups, vec![2, 2, 1]);
        assert_eq!(tree.instances(), 5 + 3 + 1);
    }

    #[test]
    fn the_timeline_overlaps_folds_with_arrivals_and_charges_the_tail() {
        let cost = CostModel {
            fold_ns_per_value: 1.0,
            merge_ns_per_value: 1.0,
            alloc_ns_per_value: 0.0,
            spawn_us: 0.0,
        };
        // Folds of 1 s; arrivals 2 s apart never queue: one leaf, the model is ready 1 s after the
        // last arrival.
        let mut t = AggregationTimeline::new(cost, limits(4), 1_000_000_000);
        for k in 0..5 {
            t.arrive(2.0 * f64::from(k));
        }
        assert_eq!(t.stats().max_leaves, 1);
        assert!((t.aggregate(8.0) - 9.0).abs() < 1e-9);
        // A burst of 8 at once with 2 leaves: 4 folds each, then one merge of the two leaves.
        let mut t = AggregationTimeline::new(cost, limits(2), 1_000_000_000);
        for _ in 0..8 {
            t.arrive(0.0);
        }
        assert_eq!(t.stats().max_leaves, 2);
        assert_eq!(t.stats().max_queue_depth, 8);
        assert!((t.aggregate(0.0) - 5.0).abs() < 1e-9);
        assert!((t.stats().queue_wait_s - 2.0 * (1.0 + 2.0 + 3.0)).abs() < 1e-9);
    }
}
