//! Device fleets: what each simulated device can do, and how a fleet is drawn from the `[fleet]`
//! table of an experiment.
//!
//! A [`DeviceProfile`] holds a device's per-step compute time (a slowdown factor on the fleet's base
//! step time), its downlink and uplink ([`Link`]: constant or a measured throughput series replayed
//! from a random offset), its availability (always, or a diurnal window with a random phase) and
//! the probability that a task it runs is lost. Every draw comes from the experiment seed.
//!
//! Compute heterogeneity (`compute = { kind = … }`, a multiplier of the base step time):
//! - `homogeneous`: every device 1;
//! - `lognormal { sigma }`: log-normal with median 1;
//! - `normal { mean, std }` and `exponential { mean }`: FedCompass' heterogeneous settings, the
//!   time per step drawn from a normal or exponential distribution (floored at 1 % of the mean);
//! - `fedfix { x }`: FedFix's scenario F-X, device `i` of `M` takes `1 − i·(x/100)/(M−1)`;
//! - `ai_benchmark`: real phones, a random phone of the AI-Benchmark table per device, its
//!   slowdown the median score over its score (the table spans about 360×).
//!
//! Links (`down` / `up`): `constant { mbit_s }`, `lognormal { median_mbit_s, sigma }`, or
//! `hsdpa { scale }`: a random 3G/HSDPA throughput series per device (scaled), looped from a
//! random offset, so bandwidth varies over time as measured.

use crate::traces::{self, BandwidthTrace, TraceError};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Normal};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// A fleet description that cannot be turned into devices.
#[derive(Debug, Error)]
pub enum FleetError {
    /// A parameter is out of range.
    #[error("[fleet] {0}")]
    Invalid(String),
    /// A trace it replays is missing or malformed.
    #[error("[fleet] needs the device traces under the data directory: {0}")]
    Trace(#[from] TraceError),
    /// A trace is needed but no data directory was given.
    #[error(
        "[fleet] `{0}` replays real traces: give the data directory (--data-dir, `data_dir`, or $SHOAL_DATA)"
    )]
    NoDataDir(&'static str),
}

/// How per-step compute time varies across devices (a multiplier of the base step time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ComputeSpec {
    /// Every device at the base step time.
    Homogeneous,
    /// Log-normal slowdown with median 1.
    Lognormal {
        /// σ of the underlying normal (1.0 spans about 50× between the 1st and 99th percentile).
        sigma: f64,
    },
    /// Normal slowdown (FedCompass' "normal" setting), floored at 1 % of the mean.
    Normal {
        /// Mean slowdown.
        #[serde(default = "one")]
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Exponential slowdown (FedCompass' "exponential" setting), floored at 1 % of the mean.
    Exponential {
        /// Mean slowdown.
        #[serde(default = "one")]
        mean: f64,
    },
    /// FedFix's F-X: the fastest device is `x` % faster than the slowest, evenly spaced.
    Fedfix {
        /// X, in percent (0 ≤ x < 100).
        x: f64,
    },
    /// Real phones: slowdown = median AI-Benchmark score / the phone's score.
    AiBenchmark,
}

/// A link's bandwidth across devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LinkSpec {
    /// The same constant rate for every device.
    Constant {
        /// Megabits per second.
        mbit_s: f64,
    },
    /// A constant rate per device, log-normal across devices.
    Lognormal {
        /// Median megabits per second.
        median_mbit_s: f64,
        /// σ of the underlying normal.
        sigma: f64,
    },
    /// A measured 3G/HSDPA series per device, replayed from a random offset and looped.
    Hsdpa {
        /// Multiplier of the measured rate (e.g. 0.5 for an uplink at half the downlink).
        #[serde(default = "one")]
        scale: f64,
    },
}

/// When devices are online.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AvailabilitySpec {
    /// Always online.
    Always,
    /// Online for `online_fraction` of every `period_s`, from a random phase per device.
    Diurnal {
        /// Period in seconds (a day: 86 400).
        #[serde(default = "day")]
        period_s: f64,
        /// Fraction of the period a device is online, in (0, 1].
        online_fraction: f64,
    },
}

fn one() -> f64 {
    1.0
}
fn day() -> f64 {
    86_400.0
}
fn default_compute() -> ComputeSpec {
    ComputeSpec::Homogeneous
}
fn default_down() -> LinkSpec {
    LinkSpec::Constant { mbit_s: 20.0 }
}
fn default_up() -> LinkSpec {
    LinkSpec::Constant { mbit_s: 5.0 }
}
fn default_availability() -> AvailabilitySpec {
    AvailabilitySpec::Always
}
fn default_reference_gflops() -> f64 {
    10.0
}

/// The `[fleet]` table.
///
/// ```toml
/// [fleet]
/// base_step_time_s = 0.05                      # or derived from the model's FLOPs and reference_gflops
/// compute = { kind = "lognormal", sigma = 0.8 }
/// jitter = 0.1                                 # per-task log-normal σ on compute time
/// down = { kind = "constant", mbit_s = 20 }
/// up = { kind = "hsdpa", scale = 0.5 }
/// availability = { kind = "diurnal", period_s = 86400, online_fraction = 0.5 }
/// dropout = 0.02
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Devices (systems-only runs; training runs have one device per client of the partition).
    #[serde(default)]
    pub count: Option<usize>,
    /// Seconds per local step on a reference device (slowdown 1). When absent it is the model's
    /// training FLOPs per step over `reference_gflops`.
    #[serde(default)]
    pub base_step_time_s: Option<f64>,
    /// Effective training GFLOP/s of the reference device when `base_step_time_s` is absent.
    #[serde(default = "default_reference_gflops")]
    pub reference_gflops: f64,
    /// Compute heterogeneity.
    #[serde(default = "default_compute")]
    pub compute: ComputeSpec,
    /// σ of a log-normal factor (median 1) drawn per task on its compute time; 0 for none.
    #[serde(default)]
    pub jitter: f64,
    /// Downlink.
    #[serde(default = "default_down")]
    pub down: LinkSpec,
    /// Uplink.
    #[serde(default = "default_up")]
    pub up: LinkSpec,
    /// Availability.
    #[serde(default = "default_availability")]
    pub availability: AvailabilitySpec,
    /// Probability that a task is lost (the device drops out before uploading).
    #[serde(default)]
    pub dropout: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            count: None,
            base_step_time_s: None,
            reference_gflops: default_reference_gflops(),
            compute: default_compute(),
            jitter: 0.0,
            down: default_down(),
            up: default_up(),
            availability: default_availability(),
            dropout: 0.0,
        }
    }
}

/// A device's link: its rate over time.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// A constant rate in bytes per second.
    Constant(f64),
    /// A measured series, scaled, replayed from `offset_s` seconds into it.
    Trace {
        /// The series.
        trace: Arc<BandwidthTrace>,
        /// Where the device starts in it at virtual time 0.
        offset_s: f64,
        /// Multiplier of the measured rate.
        scale: f64,
    },
}

impl Link {
    /// The rate at virtual time `t_s`, bytes per second.
    pub fn rate_at(&self, t_s: f64) -> f64 {
        match self {
            Link::Constant(rate) => *rate,
            Link::Trace {
                trace,
                offset_s,
                scale,
            } => trace.at(t_s + offset_s) * scale,
        }
    }

    /// Mean rate, bytes per second.
    pub fn mean_rate(&self) -> f64 {
        match self {
            Link::Constant(rate) => *rate,
            Link::Trace { trace, scale, .. } => trace.mean_bytes_per_s() * scale,
        }
    }

    /// Seconds to move `bytes` starting at virtual time `start_s`, following the rate over time.
    pub fn transfer_s(&self, start_s: f64, bytes: u64) -> f64 {
        let mut left = bytes as f64;
        match self {
            Link::Constant(rate) => left / rate,
            Link::Trace {
                trace,
                offset_s,
                scale,
            } => {
                // Walk the step function: each sample holds until the next one (the series loops).
                // The walk keeps the phase within one period and steps from sample time to sample
                // time exactly, so it always moves forward, however late in the run it starts.
                let period = trace.period_s();
                let per_period = trace.bytes_per_period() * scale;
                // Skip whole loops in one step (a long transfer on a slow link).
                let skip = ((left / per_period).floor() - 1.0).max(0.0);
                left -= skip * per_period;
                let mut elapsed = skip * period;
                let mut phase = (start_s + offset_s).rem_euclid(period);
                loop {
                    let i = trace.times_s.partition_point(|&s| s <= phase);
                    let next = trace.times_s.get(i).copied().unwrap_or(period);
                    let hold = next - phase;
                    if hold <= 0.0 {
                        phase = 0.0;
                        continue;
                    }
                    let rate = trace.bytes_per_s[i.saturating_sub(1)] * scale;
                    if rate * hold >= left {
                        return elapsed + if rate > 0.0 { left / rate } else { 0.0 };
                    }
                    left -= rate * hold;
                    elapsed += hold;
                    phase = if i < trace.times_s.len() { next } else { 0.0 };
                }
            }
        }
    }
}

/// When one device is online.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Availability {
    /// Always.
    Always,
    /// During `[phase_s + k·period_s, phase_s + k·period_s + online_s)` for every integer k.
    Window {
        /// Period.
        period_s: f64,
        /// Online time per period.
        online_s: f64,
        /// Start of a window.
        phase_s: f64,
    },
}

impl Availability {
    /// Whether the device is online at `t_s`.
    pub fn online_at(&self, t_s: f64) -> bool {
        match *self {
            Availability::Always => true,
            Availability::Window {
                period_s,
                online_s,
                phase_s,
            } => (t_s - phase_s).rem_euclid(period_s) < online_s,
        }
    }

    /// Index and start of the window that begins at or before `t_s`, tolerating the microsecond
    /// rounding of the virtual clock (an event at a window's start may land a hair before it).
    fn window_at(period_s: f64, phase_s: f64, t_s: f64) -> f64 {
        const ROUNDING_S: f64 = 1e-3;
        let k = ((t_s - phase_s + ROUNDING_S) / period_s).floor();
        phase_s + k * period_s
    }

    /// For a device that comes online at `t_s`: when it goes offline (`None`: never).
    pub fn window_end(&self, t_s: f64) -> Option<f64> {
        match *self {
            Availability::Window {
                period_s,
                online_s,
                phase_s,
            } if online_s < period_s => Some(Self::window_at(period_s, phase_s, t_s) + online_s),
            _ => None,
        }
    }

    /// For a device that goes offline at `t_s` (or is offline then): when it next comes online.
    pub fn next_window_start(&self, t_s: f64) -> Option<f64> {
        match *self {
            Availability::Window {
                period_s,
                online_s,
                phase_s,
            } if online_s < period_s => Some(Self::window_at(period_s, phase_s, t_s) + period_s),
            _ => None,
        }
    }

    /// Fraction of time online.
    pub fn online_fraction(&self) -> f64 {
        match *self {
            Availability::Always => 1.0,
            Availability::Window {
                period_s, online_s, ..
            } => (online_s / period_s).min(1.0),
        }
    }
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Seconds per local step of the model.
    pub step_time_s: f64,
    /// Downlink.
    pub down: Link,
    /// Uplink.
    pub up: Link,
    /// When it is online.
    pub availability: Availability,
    /// Probability that a task is lost.
    pub dropout: f64,
}

/// Devices drawn from a [`FleetConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    /// One profile per device; device `i` serves client `i`.
    pub devices: Vec<DeviceProfile>,
    /// σ of the per-task compute-time factor.
    pub jitter: f64,
}

fn positive(what: &str, v: f64) -> Result<f64, FleetError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(FleetError::Invalid(format!(
            "{what} must be a positive number, got {v}"
        )))
    }
}

/// Most devices a fleet may have (a systems-only fleet of 10^6 takes about 230 MB).
pub const MAX_DEVICES: usize = 10_000_000;

impl FleetConfig {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), FleetError> {
        if let Some(n) = self.count
            && !(1..=MAX_DEVICES).contains(&n)
        {
            return Err(FleetError::Invalid(format!(
                "count must be between 1 and {MAX_DEVICES} devices, got {n}"
            )));
        }
        if let Some(t) = self.base_step_time_s {
            positive("base_step_time_s", t)?;
        }
        positive("reference_gflops", self.reference_gflops)?;
        match self.compute {
            ComputeSpec::Lognormal { sigma } if !(sigma.is_finite() && sigma >= 0.0) => {
                return Err(FleetError::Invalid(format!(
                    "compute sigma must be ≥ 0, got {sigma}"
                )));
            }
            ComputeSpec::Normal { mean, std } => {
                positive("compute mean", mean)?;
                if !(std.is_finite() && std >= 0.0) {
                    return Err(FleetError::Invalid(format!("compute std must be ≥ 0, got {std}")));
                }
            }
            ComputeSpec::Exponential { mean } => {
                positive("compute mean", mean)?;
            }
            ComputeSpec::Fedfix { x } if !(x.is_finite() && (0.0..100.0).contains(&x)) => {
                return Err(FleetError::Invalid(format!(
                    "compute fedfix x is a percentage in [0, 100), got {x}"
                )));
            }
            _ => {}
        }
        for (name, link) in [("down", &self.down), ("up", &self.up)] {
            match *link {
                LinkSpec::Constant { mbit_s } => {
                    positive(&format!("{name} mbit_s"), mbit_s)?;
                }
                LinkSpec::Lognormal { median_mbit_s, sigma } => {
                    positive(&format!("{name} median_mbit_s"), median_mbit_s)?;
                    if !(sigma.is_finite() && sigma >= 0.0) {
                        return Err(FleetError::Invalid(format!(
                            "{name} sigma must be ≥ 0, got {sigma}"
                        )));
                    }
                }
                LinkSpec::Hsdpa { scale } => {
                    positive(&format!("{name} scale"), scale)?;
                }
            }
        }
        if let AvailabilitySpec::Diurnal {
            period_s,
            online_fraction,
        } = self.availability
        {
            positive("availability period_s", period_s)?;
            if !(online_fraction > 0.0 && online_fraction <= 1.0) {
                return Err(FleetError::Invalid(format!(
                    "availability online_fraction must be in (0, 1], got {online_fraction}"
                )));
            }
        }
        if !(self.jitter.is_finite() && self.jitter >= 0.0) {
            return Err(FleetError::Invalid(format!(
                "jitter must be ≥ 0, got {}",
                self.jitter
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(FleetError::Invalid(format!(
                "dropout is a probability in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Whether drawing the fleet reads trace files.
    pub fn needs_traces(&self) -> bool {
        self.compute == ComputeSpec::AiBenchmark
            || matches!(self.down, LinkSpec::Hsdpa { .. })
            || matches!(self.up, LinkSpec::Hsdpa { .. })
    }

    /// The base step time: configured, or `flops_per_step` at the reference device's rate.
    pub fn base_step_time(&self, flops_per_step: u64) -> f64 {
        self.base_step_time_s
            .unwrap_or(flops_per_step as f64 / (self.reference_gflops * 1e9))
    }

    /// Draws `count` devices with `base_step_time_s` per step at slowdown 1. Traces are read
    /// from `data_root` when the table replays them.
    pub fn build(
        &self,
        count: usize,
        base_step_time_s: f64,
        data_root: Option<&Path>,
        seed: u64,
    ) -> Result<Fleet, FleetError> {
        self.validate()?;
        positive("the base step time", base_step_time_s)?;
        if count == 0 {
            return Err(FleetError::Invalid("a fleet needs at least one device".into()));
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0xf1ee_7000);
        let traces =
            if matches!(self.down, LinkSpec::Hsdpa { .. }) || matches!(self.up, LinkSpec::Hsdpa { .. }) {
                let root = data_root.ok_or(FleetError::NoDataDir("hsdpa"))?;
                traces::load_bandwidth_traces(&root.join(traces::HSDPA_DIR))?
                    .into_iter()
                    .map(Arc::new)
                    .collect()
            } else {
                Vec::new()
            };
        let slowdowns = self.slowdowns(count, data_root, &mut rng)?;
        let mut devices = Vec::with_capacity(count);
        for slowdown in slowdowns {
            let down = draw_link(&self.down, &traces, &mut rng)?;
            let up = draw_link(&self.up, &traces, &mut rng)?;
            let availability = match self.availability {
                AvailabilitySpec::Always => Availability::Always,
                AvailabilitySpec::Diurnal {
                    period_s,
                    online_fraction,
                } => Availability::Window {
                    period_s,
                    online_s: period_s * online_fraction,
                    phase_s: rng.random_range(0.0..period_s),
                },
            };
            devices.push(DeviceProfile {
                step_time_s: base_step_time_s * slowdown,
                down,
                up,
                availability,
                dropout: self.dropout,
            });
        }
        Ok(Fleet {
            devices,
            jitter: self.jitter,
        })
    }

    fn slowdowns(
        &self,
        count: usize,
        data_root: Option<&Path>,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, FleetError> {
        let invalid = |e: rand_distr::NormalError| FleetError::Invalid(e.to_string());
        Ok(match self.compute {
            ComputeSpec::Homogeneous => vec![1.0; count],
            ComputeSpec::Lognormal { sigma } => {
                let d = LogNormal::new(0.0, sigma).map_err(invalid)?;
                (0..count).map(|_| d.sample(rng)).collect()
            }
            ComputeSpec::Normal { mean, std } => {
                let d = Normal::new(mean, std).map_err(invalid)?;
                (0..count).map(|_| d.sample(rng).max(0.01 * mean)).collect()
            }
            ComputeSpec::Exponential { mean } => {
                let d = Exp::new(1.0 / mean).map_err(|e| FleetError::Invalid(e.to_string()))?;
                (0..count).map(|_| d.sample(rng).max(0.01 * mean)).collect()
            }
            ComputeSpec::Fedfix { x } => (0..count)
                .map(|i| {
                    if count == 1 {
                        1.0
                    } else {
                        1.0 - i as f64 * (x / 100.0) / (count - 1) as f64
                    }
                })
                .collect(),
            ComputeSpec::AiBenchmark => {
                let root = data_root.ok_or(FleetError::NoDataDir("ai_benchmark"))?;
                let scores = traces::load_ai_scores(&root.join(traces::AI_SCORES))?;
                let mut sorted: Vec<u64> = scores.iter().map(|p| p.score).collect();
                sorted.sort_unstable();
                let median = sorted[sorted.len() / 2] as f64;
                (0..count)
                    .map(|_| scores.choose(rng).map_or(1.0, |p| median / p.score as f64))
                    .collect()
            }
        })
    }
}

fn mbit(mbit_s: f64) -> f64 {
    mbit_s * 1e6 / 8.0
}

fn draw_link(spec: &LinkSpec, traces: &[Arc<BandwidthTrace>], rng: &mut StdRng) -> Result<Link, FleetError> {
    Ok(match *spec {
        LinkSpec::Constant { mbit_s } => Link::Constant(mbit(mbit_s)),
        LinkSpec::Lognormal { median_mbit_s, sigma } => {
            let d = LogNormal::new(0.0, sigma).map_err(|e| FleetError::Invalid(e.to_string()))?;
            Link::Constant(mbit(median_mbit_s) * d.sample(rng))
        }
        LinkSpec::Hsdpa { scale } => {
            let trace = traces
                .choose(rng)
                .ok_or_else(|| FleetError::Invalid("no HSDPA traces loaded".into()))?
                .clone();
            if trace.mean_bytes_per_s() <= 0.0 {
                return Err(FleetError::Invalid(format!(
                    "trace {} carries no bytes",
                    trace.name
                )));
            }
            let offset_s = rng.random_range(0.0..trace.period_s());
            Link::Trace {
                trace,
                offset_s,
                scale,
            }
        }
    })
}

/// Quantiles of one per-device quantity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Smallest.
    pub min: f64,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Quantiles {
    /// Quantiles of `values` (nearest rank); zeros for an empty slice.
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self {
                min: 0.0,
                p10: 0.0,
                p50: 0.0,
                p90: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Self {
            min: values[0],
            p10: at(0.1),
            p50: at(0.5),
            p90: at(0.9),
            max: values[values.len() - 1],
            mean: values.iter().sum::<f64>() / values.len() as f64,
        }
    }
}

/// What a fleet looks like, for `fl-sim fleet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSummary {
    /// Devices.
    pub count: usize,
    /// Seconds per local step.
    pub step_time_s: Quantiles,
    /// Slowest over fastest step time.
    pub speed_span: f64,
    /// Mean downlink per device, Mbit/s.
    pub down_mbit_s: Quantiles,
    /// Mean uplink per device, Mbit/s.
    pub up_mbit_s: Quantiles,
    /// Fraction of time online per device.
    pub online_fraction: Quantiles,
    /// Devices online at time 0.
    pub online_at_start: usize,
    /// Task loss probability (mean over devices).
    pub dropout: f64,
    /// Per-task compute-time jitter σ.
    pub jitter: f64,
}

impl Fleet {
    /// Counts and quantiles of the fleet's devices.
    pub fn summary(&self) -> FleetSummary {
        let each = |f: &dyn Fn(&DeviceProfile) -> f64| Quantiles::of(self.devices.iter().map(f).collect());
        let step = each(&|d| d.step_time_s);
        let n = self.devices.len().max(1) as f64;
        FleetSummary {
            count: self.devices.len(),
            step_time_s: step,
            speed_span: step.max / step.min,
            down_mbit_s: each(&|d| d.down.mean_rate() * 8e-6),
            up_mbit_s: each(&|d| d.up.mean_rate() * 8e-6),
            online_fraction: each(&|d| d.availability.online_fraction()),
            online_at_start: self
                .devices
                .iter()
                .filter(|d| d.availability.online_at(0.0))
                .count(),
            dropout: self.devices.iter().map(|d| d.dropout).sum::<f64>() / n,
            jitter: self.jitter,
        }
    }
}

impl std::fmt::Display for FleetSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "devices: {}", self.count)?;
        writeln!(
            f,
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "", "min", "p10", "median", "p90", "max", "mean"
        )?;
        for (name, q) in [
            ("step time (s)", &self.step_time_s),
            ("downlink (Mbit/s)", &self.down_mbit_s),
            ("uplink (Mbit/s)", &self.up_mbit_s),
            ("online fraction", &self.online_fraction),
        ] {
            writeln!(
                f,
                "{name:<22} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>10.4}",
                q.min, q.p10, q.p50, q.p90, q.max, q.mean
            )?;
        }
        writeln!(f, "slowest / fastest step time: {:.1}×", self.speed_span)?;
        writeln!(f, "online at t = 0: {} of {}", self.online_at_start, self.count)?;
        write!(
            f,
            "task dropout probability: {:.3}; per-task compute jitter σ: {:.3}",
            self.dropout, self.jitter
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedfix_scenario_spaces_step_times_evenly() {
        let cfg = FleetConfig {
            compute: ComputeSpec::Fedfix { x: 90.0 },
            ..FleetConfig::default()
        };
        let fleet = cfg.build(10, 2.0, None, 0).unwrap();
        let t: Vec<f64> = fleet.devices.iter().map(|d| d.step_time_s).collect();
        assert!((t[0] - 2.0).abs() < 1e-12 && (t[9] - 0.2).abs() < 1e-12, "{t:?}");
        assert!(t.windows(2).all(|w| (w[0] - w[1] - 0.2).abs() < 1e-12));
    }

    #[test]
    fn same_seed_same_fleet_and_lognormal_median_near_one() {
        let cfg = FleetConfig {
            compute: ComputeSpec::Lognormal { sigma: 1.0 },
            up: LinkSpec::Lognormal {
                median_mbit_s: 8.0,
                sigma: 0.5,
            },
            availability: AvailabilitySpec::Diurnal {
                period_s: 100.0,
                online_fraction: 0.25,
            },
            ..FleetConfig::default()
        };
        let a = cfg.build(4001, 1.0, None, 7).unwrap();
        assert_eq!(a, cfg.build(4001, 1.0, None, 7).unwrap());
        assert_ne!(a, cfg.build(4001, 1.0, None, 8).unwrap());
        let s = a.summary();
        assert!((s.step_time_s.p50 - 1.0).abs() < 0.1, "{s}");
        assert!((s.up_mbit_s.p50 - 8.0).abs() < 0.5, "{s}");
        let online = s.online_at_start as f64 / 4001.0;
        assert!((online - 0.25).abs() < 0.03, "{online}");
    }

    #[test]
    fn windows_alternate_on_and_off() {
        let w = Availability::Window {
            period_s: 10.0,
            online_s: 3.0,
            phase_s: 4.0,
        };
        assert!(!w.online_at(0.0) && w.online_at(4.0) && w.online_at(6.9) && !w.online_at(7.0));
        assert_eq!(w.next_window_start(0.0), Some(4.0));
        assert_eq!(w.window_end(4.0), Some(7.0));
        assert_eq!(
            w.window_end(3.999_999),
            Some(7.0),
            "a start rounded down stays in its window"
        );
        assert_eq!(w.next_window_start(7.0), Some(14.0));
        assert_eq!(w.next_window_start(6.999_999), Some(14.0));
        let wraps = Availability::Window {
            period_s: 10.0,
            online_s: 3.0,
            phase_s: 8.0,
        };
        assert!(wraps.online_at(0.0) && wraps.window_end(0.0) == Some(1.0));
        assert_eq!(Availability::Always.window_end(5.0), None);
    }

    #[test]
    fn trace_transfer_integrates_the_rate() {
        // 1 s at 1 MB/s, then 3 s at 2 MB/s, looping every 4 s (7 MB per loop).
        let trace = Arc::new(BandwidthTrace::parse(Path::new("t"), "0.0 8.0\n1.0 16.0\n4.0 8.0\n").unwrap());
        let link = Link::Trace {
            trace,
            offset_s: 0.0,
            scale: 1.0,
        };
        assert!((link.transfer_s(0.0, 500_000) - 0.5).abs() < 1e-9);
        assert!((link.transfer_s(0.0, 3_000_000) - 2.0).abs() < 1e-9);
        assert!((link.transfer_s(0.5, 1_500_000) - 1.0).abs() < 1e-9);
        // Ten loops plus 1 MB from the start of a loop.
        assert!((link.transfer_s(0.0, 71_000_000) - 41.0).abs() < 1e-6);
        assert!((Link::Constant(2e6).transfer_s(3.0, 1_000_000) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn bad_parameters_are_refused_with_the_field() {
        let cfg = FleetConfig {
            dropout: 1.5,
            ..FleetConfig::default()
        };
        assert!(
            cfg.build(3, 1.0, None, 0)
                .unwrap_err()
                .to_string()
                .contains("dropout")
        );
        let cfg = FleetConfig {
            up: LinkSpec::Hsdpa { scale: 1.0 },
            ..FleetConfig::default()
        };
        assert!(matches!(
            cfg.build(3, 1.0, None, 0),
            Err(FleetError::NoDataDir("hsdpa"))
        ));
    }
}
