//! Buffered asynchronous aggregation: FedBuff (aggregate every `K` arrivals, ALGORITHMS.md §4.2)
//! and FedAsync (every arrival, §4.3), which is the same loop with `K = 1` and mixing weights.
//!
//! Up to `concurrency` clients train at once. Each arrival with staleness `s = n − τ_i` is folded
//! at once (eagerly) with weight
//! - FedBuff: `e_i · w(s)`, where the example weight `e_i` is 1 (`weighting = "uniform"`, FLSim's
//!   default) or `N · p_i = n_i / mean(n)` (`"samples"`), so weights stay about 1 and the rule's
//!   `÷K` keeps its meaning;
//! - FedAsync: `α · w(s)`, the mixing coefficient `α_t`.
//!
//! Updates staler than `max_staleness` are discarded (FLSim's bound; none by default). After each
//! arrival the freed slot goes to an idle client drawn at random — possibly the one that just
//! delivered — on the current version.

use super::Weighting;
use crate::coordinator::{Arrival, Core, DiscardReason, TaskRecord};
use crate::staleness::Staleness;
use serde::{Deserialize, Serialize};
use shoal_core::ClientId;

/// The `scheduler = "fedbuff"` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedBuffConfig {
    /// Arrivals per aggregation `K`.
    #[serde(default = "default_buffer_size")]
    pub buffer_size: usize,
    /// Clients training at once (all registered clients when absent).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Staleness discount `w(s)`.
    #[serde(default)]
    pub staleness: Staleness,
    /// Updates staler than this are discarded.
    #[serde(default)]
    pub max_staleness: Option<u64>,
    /// Example weight: `uniform` (default) or `samples`.
    #[serde(default = "uniform")]
    pub weighting: Weighting,
}

/// The `scheduler = "fedasync"` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedAsyncConfig {
    /// Mixing rate `α`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Clients training at once (all registered clients when absent).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Staleness discount `s(·)`.
    #[serde(default)]
    pub staleness: Staleness,
    /// Updates staler than this are discarded.
    #[serde(default)]
    pub max_staleness: Option<u64>,
}

fn default_buffer_size() -> usize {
    10
}
fn default_alpha() -> f64 {
    0.9
}
fn uniform() -> Weighting {
    Weighting::Uniform
}

impl Default for FedBuffConfig {
    fn default() -> Self {
        Self {
            buffer_size: default_buffer_size(),
            concurrency: None,
            staleness: Staleness::default(),
            max_staleness: None,
            weighting: Weighting::Uniform,
        }
    }
}

impl Default for FedAsyncConfig {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            concurrency: None,
            staleness: Staleness::default(),
            max_staleness: None,
        }
    }
}

fn check_concurrency(concurrency: Option<usize>) -> Result<(), String> {
    if concurrency == Some(0) {
        return Err("concurrency must be at least 1".into());
    }
    Ok(())
}

impl FedBuffConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.buffer_size == 0 {
            return Err("buffer_size must be at least 1".into());
        }
        check_concurrency(self.concurrency)?;
        self.staleness.validate()
    }
}

impl FedAsyncConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        super::check_unit("alpha", self.alpha)?;
        check_concurrency(self.concurrency)?;
        self.staleness.validate()
    }
}

/// What a fold weight is made of.
#[derive(Debug, Clone, Copy)]
enum ArrivalWeight {
    /// FedBuff: example weight times staleness discount.
    Example(Weighting),
    /// FedAsync: `α` times staleness discount.
    Mixing(f64),
}

/// The FedBuff / FedAsync scheduler.
#[derive(Debug)]
pub(crate) struct Buffered {
    name: &'static str,
    buffer_size: usize,
    concurrency: Option<usize>,
    staleness: Staleness,
    max_staleness: Option<u64>,
    weight: ArrivalWeight,
    local_steps: u32,
    buffered: usize,
}

impl Buffered {
    pub(crate) fn fedbuff(config: &FedBuffConfig, local_steps: u32) -> Self {
        Self {
            name: "fedbuff",
            buffer_size: config.buffer_size,
            concurrency: config.concurrency,
            staleness: config.staleness,
            max_staleness: config.max_staleness,
            weight: ArrivalWeight::Example(config.weighting),
            local_steps,
            buffered: 0,
        }
    }

    pub(crate) fn fedasync(config: &FedAsyncConfig, local_steps: u32) -> Self {
        Self {
            name: "fedasync",
            buffer_size: 1,
            concurrency: config.concurrency,
            staleness: config.staleness,
            max_staleness: config.max_staleness,
            weight: ArrivalWeight::Mixing(config.alpha),
            local_steps,
            buffered: 0,
        }
    }

    /// Hands free slots to idle clients.
    fn fill(&mut self, core: &mut Core) {
        let cap = self.concurrency.unwrap_or(usize::MAX);
        let want = cap.saturating_sub(core.running());
        for client in core.sample_idle(want) {
            core.assign(client, self.local_steps);
        }
    }
}

impl super::Scheduler for Buffered {
    fn name(&self) -> &'static str {
        self.name
    }

    fn on_joined(&mut self, core: &mut Core, _client: ClientId) {
        self.fill(core);
    }

    fn on_left(&mut self, core: &mut Core, _client: ClientId, _lost: Option<TaskRecord>) {
        self.fill(core);
    }

    fn on_failed(&mut self, core: &mut Core, _task: TaskRecord) {
        self.fill(core);
    }

    fn on_arrival(&mut self, core: &mut Core, arrival: Arrival) {
        let task = arrival.record.task;
        let staleness = arrival.record.version.staleness(core.version());
        match self.max_staleness {
            Some(max) if staleness > max => core.discard(task, DiscardReason::TooStale { staleness, max }),
            _ => {
                let discount = self.staleness.weight(staleness);
                let weight = match self.weight {
                    ArrivalWeight::Example(weighting) => {
                        let n = core
                            .client(arrival.record.client)
                            .map_or(arrival.meta.num_samples, |c| c.num_samples);
                        weighting.share(core, n) * core.num_clients() as f64 * discount
                    }
                    ArrivalWeight::Mixing(alpha) => alpha * discount,
                };
                core.fold(task, weight);
                self.buffered += 1;
                if self.buffered >= self.buffer_size {
                    self.buffered = 0;
                    core.aggregate();
                }
            }
        }
        self.fill(core);
    }

    fn on_timer(&mut self, _core: &mut Core) {}

    fn save_state(&self) -> Vec<u8> {
        crate::snapshot::encode_state(&self.buffered)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        self.buffered = crate::snapshot::decode_state(bytes)?;
        Ok(())
    }
}
