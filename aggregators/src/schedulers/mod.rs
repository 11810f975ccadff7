//! Schedulers — when to aggregate, who trains, for how many steps, and with what weight.
//!
//! Each scheduler is a policy plugged into the [`Coordinator`](crate::Coordinator): it reacts to
//! joins, leaves, arrivals, failures and timers by assigning tasks, folding held updates with
//! weights, and aggregating. Time is a value ([`Timestamp`](shoal_core::Timestamp)); none of them
//! owns a timer — they ask the driver to wake them.
//!
//! | scheduler | aggregates | fold weight |
//! |---|---|---|
//! | [`sync`] | when `m` of a round's clients delivered, or at the deadline | `n_i` or 1 |
//! | [`buffered`] `fedbuff` | every `K` arrivals | `e_i · w(s)` |
//! | [`buffered`] `fedasync` | every arrival | `α · w(s)` |
//! | [`fedfix`] | every `Δt` | `⌈τ_i / Δt⌉ · p_i` |
//! | [`fedcompass`] | when an arrival group is complete or at its latest time | `α · w(s) · p_i` |
//!
//! Which rule may run under which scheduler follows from what the rule does with the weights
//! ([`Aggregation`]); [`check_pairing`] refuses the pairs whose math does not hold and says why.

pub mod buffered;
pub mod fedcompass;
pub mod fedfix;
pub mod sync;

use crate::config::ConfigError;
use crate::coordinator::{Arrival, Core, TaskRecord};
use crate::rule::Aggregation;
use crate::snapshot::SnapshotError;
use serde::{Deserialize, Serialize};
use shoal_core::ClientId;
use std::fmt::Debug;

/// A scheduling policy driven by the Coordinator.
pub(crate) trait Scheduler: Debug + Send {
    /// The name in the configuration.
    fn name(&self) -> &'static str;
    /// A new client registered.
    fn on_joined(&mut self, core: &mut Core, client: ClientId);
    /// A client left or was evicted; `lost` is the task it was running.
    fn on_left(&mut self, core: &mut Core, client: ClientId, lost: Option<TaskRecord>);
    /// A running task failed; its client is still registered and idle.
    fn on_failed(&mut self, core: &mut Core, task: TaskRecord);
    /// An update was accepted and is held until the scheduler folds or discards it.
    fn on_arrival(&mut self, core: &mut Core, arrival: Arrival);
    /// A requested wake-up time has come.
    fn on_timer(&mut self, core: &mut Core);
    /// Its state (not its configuration, which the run builds again) for a snapshot.
    fn save_state(&self) -> Vec<u8>;
    /// Takes back the state [`Scheduler::save_state`] wrote.
    fn load_state(&mut self, bytes: &[u8]) -> Result<(), SnapshotError>;
}

/// How much each client's updates count (`p_i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// In proportion to the client's training samples `n_i`.
    Samples,
    /// The same for every client.
    Uniform,
}

impl Weighting {
    /// The client's share `p_i` among all registered clients (`n_i / Σ n` or `1 / N`).
    pub(crate) fn share(self, core: &Core, num_samples: u64) -> f64 {
        match self {
            Weighting::Samples => {
                let total = core.total_samples();
                if total == 0 {
                    0.0
                } else {
                    num_samples as f64 / total as f64
                }
            }
            Weighting::Uniform => 1.0 / core.num_clients().max(1) as f64,
        }
    }

    /// The client's relative importance (`n_i` or 1) for rules that normalise.
    pub(crate) fn relative(self, num_samples: u64) -> f64 {
        match self {
            Weighting::Samples => num_samples as f64,
            Weighting::Uniform => 1.0,
        }
    }
}

/// The `[algorithm.scheduler]` table, tagged by `scheduler = "…"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheduler", rename_all = "snake_case", deny_unknown_fields)]
pub enum SchedulerConfig {
    /// Synchronous rounds.
    Sync(sync::SyncConfig),
    /// FedBuff: aggregate every `K` arrivals.
    #[serde(rename = "fedbuff")]
    FedBuff(buffered::FedBuffConfig),
    /// FedAsync: aggregate every arrival.
    #[serde(rename = "fedasync")]
    FedAsync(buffered::FedAsyncConfig),
    /// FedFix: aggregate every `Δt`.
    #[serde(rename = "fedfix")]
    FedFix(fedfix::FedFixConfig),
    /// FedCompass: computing-power-aware arrival groups.
    #[serde(rename = "fedcompass")]
    FedCompass(fedcompass::FedCompassConfig),
}

impl SchedulerConfig {
    /// The scheduler's name.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerConfig::Sync(_) => "sync",
            SchedulerConfig::FedBuff(_) => "fedbuff",
            SchedulerConfig::FedAsync(_) => "fedasync",
            SchedulerConfig::FedFix(_) => "fedfix",
            SchedulerConfig::FedCompass(_) => "fedcompass",
        }
    }

    /// Fails unless the parameters can run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let result = match self {
            SchedulerConfig::Sync(c) => c.validate(),
            SchedulerConfig::FedBuff(c) => c.validate(),
            SchedulerConfig::FedAsync(c) => c.validate(),
            SchedulerConfig::FedFix(c) => c.validate(),
            SchedulerConfig::FedCompass(c) => c.validate(),
        };
        result.map_err(|reason| ConfigError::new(format!("`{}` scheduler", self.name()), reason))
    }

    /// The scheduler, with fold weights in the meaning of `aggregation` and `local_steps` per task
    /// where the scheduler does not choose them itself.
    pub(crate) fn build(
        &self,
        aggregation: Aggregation,
        local_steps: u32,
    ) -> Result<Box<dyn Scheduler>, ConfigError> {
        self.validate()?;
        Ok(match self {
            SchedulerConfig::Sync(c) => Box::new(sync::SyncRounds::new(c.clone(), aggregation, local_steps)),
            SchedulerConfig::FedBuff(c) => Box::new(buffered::Buffered::fedbuff(c, local_steps)),
            SchedulerConfig::FedAsync(c) => Box::new(buffered::Buffered::fedasync(c, local_steps)),
            SchedulerConfig::FedFix(c) => Box::new(fedfix::FedFix::new(c.clone(), local_steps)),
            SchedulerConfig::FedCompass(c) => Box::new(fedcompass::FedCompass::new(c.clone())),
        })
    }
}

/// Refuses a rule–scheduler pair whose math does not hold, saying why.
pub fn check_pairing(
    rule: &str,
    aggregation: Aggregation,
    scheduler: &SchedulerConfig,
) -> Result<(), ConfigError> {
    use Aggregation::*;
    let stale_reason = match aggregation {
        SynchronousMean => Some(
            "its control variates stay the mean of all c_i only if every upload of an aggregation is \
             computed on the current version, which only synchronous rounds guarantee",
        ),
        SynchronousWeightedMean => Some(
            "its global direction g is the mean of one round's directions, all computed on the current \
             version, which only synchronous rounds guarantee",
        ),
        _ => None,
    };
    let reason: Option<String> = match (scheduler, aggregation) {
        (SchedulerConfig::Sync(c), SynchronousMean | PerUpdateMean)
            if c.weighting == Some(Weighting::Samples) =>
        {
            Some(format!(
                "`{rule}` averages its uploads with equal weights, so `weighting = \"samples\"` cannot apply; \
                 leave `weighting` out or set it to \"uniform\""
            ))
        }
        (
            SchedulerConfig::Sync(_),
            WeightedMean | SynchronousWeightedMean | SynchronousMean | PerUpdateMean,
        ) => None,
        (SchedulerConfig::Sync(_), WeightedSum | Mixing) => Some(format!(
            "`{rule}` takes its weights as step sizes computed by its own scheduler; use scheduler = \"{rule}\" \
             (or rule = \"fedavg\" for synchronous rounds)"
        )),
        (_, SynchronousMean | SynchronousWeightedMean) => stale_reason.map(str::to_string),
        (SchedulerConfig::FedBuff(_), WeightedMean | PerUpdateMean) => None,
        (SchedulerConfig::FedBuff(_), WeightedSum | Mixing) => Some(format!(
            "`{rule}` needs step-size or mixing weights, but FedBuff folds staleness discounts that sum to \
             about K; use rule = \"fedbuff\" (÷K) or \"fedavg\" (÷Σw)"
        )),
        (SchedulerConfig::FedAsync(_), WeightedMean | PerUpdateMean | WeightedSum | Mixing) => None,
        (SchedulerConfig::FedFix(_), WeightedMean | WeightedSum) => None,
        (SchedulerConfig::FedFix(_), PerUpdateMean | Mixing) => Some(format!(
            "FedFix folds period-corrected weights ⌈τ/Δt⌉·p_i that a window may sum above 1; `{rule}` needs \
             per-update discounts or mixing weights; use rule = \"fedfix\" or \"fedavg\""
        )),
        (SchedulerConfig::FedCompass(_), WeightedMean | WeightedSum | Mixing) => None,
        (SchedulerConfig::FedCompass(_), PerUpdateMean) => Some(format!(
            "FedCompass folds α·s·p_i step sizes; `{rule}` would divide them by the group size; use rule = \
             \"fedcompass\" or \"fedavg\""
        )),
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(ConfigError::new(
            format!("`{rule}` rule under the `{}` scheduler", scheduler.name()),
            reason,
        )),
    }
}

/// Fails unless `v` is finite and in `(0, 1]`.
pub(crate) fn check_unit(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(format!("{name} must be in (0, 1], got {v}"))
    }
}

/// Fails unless `v` is finite and positive.
pub(crate) fn check_positive(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{name} must be a positive number, got {v}"))
    }
}
