//! `fl-server bench-aggregate`: what the aggregation runtime leaves to do after the last update
//! of an aggregation arrives, against a single-threaded fold that starts once all have arrived,
//! and both against a plain memory copy of the same bytes, measured in the same run.
//!
//! For each model size, N updates arrive one every `spacing ×` the time one fold takes on one
//! thread (measured first), so the arrivals last about as long as folding them all would. The
//! eager runtime folds each on a leaf as it comes; the baseline folds them all on one thread after
//! the last. Both then apply FedAvg to a model, and the figure is the time from the last arrival
//! to the new model. A burst (all N at once) shows the runtime's parallel leaves when there is
//! no arrival tail to hide behind. Every figure is the best of `reps` repetitions after one
//! warm-up (the warm-up's cold starts are reported apart); the eager and the baseline models are
//! compared value by value.

use crate::runtime::{Runtime, RuntimeConfig, SharedUpload};
use anyhow::{Context, Result, ensure};
use serde::Serialize;
use shoal_aggregators::{AlgorithmConfig, ServerRule, ServerState};
use shoal_core::TaskId;
use shoal_engine::{Contribution, FoldExecutor, InPlace, Population, ServerCore};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct AggregateBenchOptions {
    /// Parameters per update, one measurement each.
    pub sizes: Vec<usize>,
    /// Updates per aggregation (N).
    pub updates: usize,
    /// Distinct update buffers cycled through (each larger than the caches, so reuse does not
    /// make reads cheaper; it keeps 10 M-parameter runs within memory).
    pub distinct: usize,
    /// Measured repetitions (after one warm-up).
    pub reps: usize,
    /// Gap between arrivals, in single-thread fold times.
    pub spacing: f64,
    /// The runtime's configuration.
    pub runtime: RuntimeConfig,
}

/// The figures of one model size.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateBenchRow {
    /// Parameters per update.
    pub params: usize,
    /// Updates per aggregation.
    pub updates: usize,
    /// One fold of one update on one thread (s).
    pub fold_one_s: f64,
    /// Gap between arrivals (s).
    pub arrival_gap_s: f64,
    /// Copying the N updates' bytes once, one thread (s).
    pub memcpy_s: f64,
    /// Baseline: last arrival → new model, folding all N on one thread after the last arrival.
    pub single_thread_after_last_s: f64,
    /// Eager runtime, spread arrivals: last arrival → new model.
    pub eager_after_last_s: f64,
    /// Eager runtime, all N at once: last arrival → new model.
    pub eager_burst_after_last_s: f64,
    /// Leaves the eager runtime used (spread, burst).
    pub eager_leaves: (usize, usize),
    /// Cold starts of the warm-up, and in the measured repetitions (0 when instances are reused).
    pub cold_starts: (u64, u64),
    /// Time of the warm-up's cold starts (s).
    pub cold_start_s: f64,
    /// `single_thread_after_last_s / eager_after_last_s`.
    pub speedup: f64,
    /// `single_thread_after_last_s / memcpy_s`.
    pub single_thread_vs_memcpy: f64,
    /// `eager_after_last_s / memcpy_s`.
    pub eager_vs_memcpy: f64,
    /// Largest difference between the eager and the baseline model, relative to the largest value.
    pub max_rel_diff: f64,
    /// The cost model the runtime measured (ns per value of fold, merge, allocation).
    pub cost: shoal_aggregators::hierarchy::CostModel,
}

struct Fixture {
    config: AlgorithmConfig,
    rule: Arc<dyn ServerRule>,
    uploads: Vec<SharedUpload>,
    x0: Vec<f32>,
    updates: usize,
}

impl Fixture {
    fn new(params: usize, options: &AggregateBenchOptions) -> Result<Self> {
        let config: AlgorithmConfig =
            toml::from_str("local_steps = 1\nlocal_lr = 0.1\n[rule]\nrule = \"fedavg\"")?;
        let rule = config.rule.build()?.server;
        // Deterministic, varied values (an LCG), cheap to make at 10 M parameters.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let uploads = (0..options.distinct.max(1))
            .map(|_| Arc::from(vec![(0..params).map(|_| next() * 1e-2).collect::<Vec<f32>>()]))
            .collect();
        Ok(Self {
            config,
            rule,
            uploads,
            x0: (0..params).map(|_| next()).collect(),
            updates: options.updates,
        })
    }

    fn upload(&self, i: usize) -> (SharedUpload, f64) {
        (self.uploads[i % self.uploads.len()].clone(), 1.0 + (i % 7) as f64)
    }

    /// The engine's server core from the fixture's model, folding on `executor`.
    fn core<E: FoldExecutor>(&self, executor: E) -> ServerCore<E> {
        let state = ServerState::new(self.x0.clone());
        ServerCore::new(self.rule.clone(), self.config.clone(), state, executor)
    }

    /// Folds the N updates into `core`, `gap` apart, then aggregates: (first arrival → new
    /// model, last arrival → new model, model).
    fn run<E: FoldExecutor>(&self, mut core: ServerCore<E>, gap: Duration) -> Result<(f64, f64, Vec<f32>)> {
        let start = Instant::now();
        for i in 0..self.updates {
            let due = start + gap * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (u, w) = self.upload(i);
            let task = TaskId(i as u64);
            core.hold(task, Contribution::Upload(u), 0.0);
            core.fold(task, w, self.updates)?;
        }
        let last = Instant::now();
        core.aggregate(Population {
            num_clients: self.updates,
            previous_num_clients: self.updates,
        })?;
        let (total, after_last) = (start.elapsed(), last.elapsed());
        Ok((total.as_secs_f64(), after_last.as_secs_f64(), core.into_state().x))
    }

    /// One thread folds all N in a burst, then applies (the engine's in-place core): (seconds from
    /// the first arrival, model) — all of it comes after the last arrival of a burst.
    fn single_thread(&self) -> Result<(f64, Vec<f32>)> {
        let (total, _, x) = self.run(self.core(InPlace), Duration::ZERO)?;
        Ok((total, x))
    }

    /// The runtime with arrivals `gap` apart: (last arrival → new model, leaves, model).
    fn eager(&self, runtime: &Runtime, gap: Duration) -> Result<(f64, usize, Vec<f32>)> {
        let (_, after_last, x) = self.run(self.core(runtime.clone()), gap)?;
        let leaves = runtime.stats().last.map_or(0, |l| l.leaves);
        Ok((after_last, leaves, x))
    }

    fn memcpy(&self) -> f64 {
        let mut dst = vec![0.0f32; self.x0.len()];
        let started = Instant::now();
        for i in 0..self.updates {
            dst.copy_from_slice(&self.upload(i).0[0]);
            std::hint::black_box(&mut dst);
        }
        started.elapsed().as_secs_f64()
    }
}

fn best(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(f64::INFINITY, f64::min)
}

/// Measures every size of `options`.
pub fn run(
    options: &AggregateBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<AggregateBenchRow>> {
    ensure!(
        options.updates >= 1 && options.reps >= 1,
        "updates and reps must be at least 1"
    );
    ensure!(
        options.spacing.is_finite() && options.spacing >= 0.0,
        "spacing must be a number >= 0"
    );
    let mut rows = Vec::new();
    for &params in &options.sizes {
        progress(&format!(
            "{params} parameters: preparing {} updates",
            options.updates
        ));
        let f = Fixture::new(params, options)?;
        let runtime = Runtime::new(options.runtime.clone()).map_err(|e| anyhow::anyhow!("[runtime] {e}"))?;
        progress(&format!("{params} parameters: single-thread baseline"));
        let mut baseline = f.single_thread()?;
        for _ in 1..options.reps {
            let again = f.single_thread()?;
            if again.0 < baseline.0 {
                baseline = again;
            }
        }
        let fold_one_s = baseline.0 / options.updates as f64;
        let gap = Duration::from_secs_f64(fold_one_s * options.spacing);
        progress(&format!(
            "{params} parameters: eager runtime, arrivals every {:.2} ms",
            gap.as_secs_f64() * 1e3
        ));
        let warm_up = f.eager(&runtime, gap)?;
        f.eager(&runtime, Duration::ZERO)?;
        let warm = runtime.stats();
        let mut spread = Vec::new();
        let mut burst = Vec::new();
        for _ in 0..options.reps {
            spread.push(f.eager(&runtime, gap)?);
            burst.push(f.eager(&runtime, Duration::ZERO)?);
        }
        let after = runtime.stats();
        let scale = baseline
            .1
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let max_rel_diff = spread
            .iter()
            .chain(&burst)
            .chain(std::iter::once(&warm_up))
            .flat_map(|(_, _, x)| {
                x.iter()
                    .zip(&baseline.1)
                    .map(|(a, b)| f64::from((a - b).abs() / scale))
            })
            .fold(0.0, f64::max);
        let memcpy_s = best((0..options.reps).map(|_| f.memcpy()));
        let eager_after_last_s = best(spread.iter().map(|r| r.0));
        let eager_burst_after_last_s = best(burst.iter().map(|r| r.0));
        let single = baseline.0;
        rows.push(AggregateBenchRow {
            params,
            updates: options.updates,
            fold_one_s,
            arrival_gap_s: gap.as_secs_f64(),
            memcpy_s,
            single_thread_after_last_s: single,
            eager_after_last_s,
            eager_burst_after_last_s,
            eager_leaves: (
                spread.iter().map(|r| r.1).max().unwrap_or(0),
                burst.iter().map(|r| r.1).max().unwrap_or(0),
            ),
            cold_starts: (warm.cold_starts, after.cold_starts - warm.cold_starts),
            cold_start_s: warm.cold_start_s,
            speedup: single / eager_after_last_s,
            single_thread_vs_memcpy: single / memcpy_s,
            eager_vs_memcpy: eager_after_last_s / memcpy_s,
            max_rel_diff,
            cost: runtime.cost(),
        });
    }
    Ok(rows)
}

/// Parses `1000000,10M,1m` style size lists.
pub fn parse_sizes(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|s| {
            let s = s.trim();
            let (digits, scale) = match s.chars().last() {
                Some('M' | 'm') => (&s[..s.len() - 1], 1_000_000),
                Some('K' | 'k') => (&s[..s.len() - 1], 1_000),
                _ => (s, 1),
            };
            let n: usize = digits
                .parse()
                .with_context(|| format!("`{s}` is not a size (e.g. 1000000 or 10M)"))?;
            ensure!(n > 0, "sizes must be positive");
            Ok(n * scale)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_eager_runtime_gives_the_baseline_model() {
        let options = AggregateBenchOptions {
            sizes: vec![20_000],
            updates: 12,
            distinct: 3,
            reps: 1,
            spacing: 0.5,
            runtime: RuntimeConfig::default(),
        };
        let rows = run(&options, |_| {}).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].max_rel_diff < 1e-6, "{}", rows[0].max_rel_diff);
        assert_eq!(
            parse_sizes("1M, 10m,5k,7").unwrap(),
            vec![1_000_000, 10_000_000, 5_000, 7]
        );
        assert!(parse_sizes("ten").is_err());
    }
}
