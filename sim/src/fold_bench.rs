//! `fl-sim bench fold`: how fast the aggregation monoid folds f32 updates, against a plain memory
//! copy of the same bytes measured in the same run.
//!
//! Folding reads each f32 of an update once and reads and writes the f64 sums, so a copy of the
//! update's bytes is the natural ceiling; the ratio says how close folding comes to it. With two
//! workers, each folds half of the updates into its own accumulator on its own thread and the two
//! partial sums are merged (the merge is timed too). Accumulators are warm: allocated once and
//! reset between repetitions, as a long-lived aggregation worker keeps them.

use crate::bench::median;
use serde::{Deserialize, Serialize};
use shoal_aggregators::Accumulator;
use std::time::Instant;

/// Throughput of one configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FoldRate {
    /// Parameters per update.
    pub params: usize,
    /// Accumulators folding in parallel (merged at the end).
    pub workers: usize,
    /// Updates folded per measurement.
    pub updates: usize,
    /// GB/s of f32 update bytes folded (merge included).
    pub fold_gb_s: f64,
    /// GB/s of a single-threaded copy of the same number of bytes.
    pub memcpy_gb_s: f64,
    /// `fold_gb_s / memcpy_gb_s`.
    pub ratio: f64,
}

fn memcpy_gb_s(updates: &[Vec<f32>], reps: usize) -> f64 {
    let mut dst = vec![0.0f32; updates[0].len()];
    let bytes = (updates.len() * updates[0].len() * 4) as f64;
    let rates = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for u in updates {
                dst.copy_from_slice(u);
                std::hint::black_box(&mut dst);
            }
            bytes / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(rates)
}

fn fold_gb_s(updates: &[Vec<f32>], workers: usize, reps: usize) -> f64 {
    let dim = updates[0].len();
    let bytes = (updates.len() * dim * 4) as f64;
    let mut accs: Vec<Accumulator> = (0..workers).map(|_| Accumulator::new(1, dim)).collect();
    let share = updates.len().div_ceil(workers);
    let rates = (0..reps)
        .map(|_| {
            accs.iter_mut().for_each(Accumulator::reset);
            let t = Instant::now();
            std::thread::scope(|s| {
                for (acc, chunk) in accs.iter_mut().zip(updates.chunks(share)) {
                    s.spawn(move || {
                        for u in chunk {
                            acc.fold(&[u], 1.0)
                                .expect("benchmark updates are finite and well sized");
                        }
                    });
                }
            });
            let (first, rest) = accs.split_at_mut(1);
            for other in rest.iter() {
                first[0].merge(other).expect("accumulators have one shape");
            }
            std::hint::black_box(&first[0]);
            bytes / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(rates)
}

/// Measures folding `updates` updates of each size in `sizes`, with 1 and 2 workers.
pub fn run(sizes: &[usize], updates: usize, reps: usize) -> Vec<FoldRate> {
    let mut out = Vec::new();
    for &params in sizes {
        let batch: Vec<Vec<f32>> = (0..updates)
            .map(|u| {
                (0..params)
                    .map(|i| ((i * 31 + u * 17) % 1000) as f32 * 1e-3 - 0.5)
                    .collect()
            })
            .collect();
        let memcpy = memcpy_gb_s(&batch, reps);
        for workers in [1, 2] {
            let fold = fold_gb_s(&batch, workers, reps);
            out.push(FoldRate {
                params,
                workers,
                updates,
                fold_gb_s: fold,
                memcpy_gb_s: memcpy,
                ratio: fold / memcpy,
            });
        }
    }
    out
}

/// The rates as a table.
pub fn render(rates: &[FoldRate]) -> String {
    let mut out =
        String::from("folding f32 updates into f64 weighted sums (Accumulator::fold, then merge)\n");
    out += &format!(
        "  {:>10} {:>8} {:>8} {:>12} {:>14} {:>8}\n",
        "params", "workers", "updates", "fold GB/s", "memcpy GB/s", "ratio"
    );
    for r in rates {
        out += &format!(
            "  {:>10} {:>8} {:>8} {:>12.2} {:>14.2} {:>8.2}\n",
            r.params, r.workers, r.updates, r.fold_gb_s, r.memcpy_gb_s, r.ratio
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_reports_every_configuration() {
        let rates = run(&[1000], 4, 3);
        assert_eq!(rates.len(), 2);
        assert!(
            rates
                .iter()
                .all(|r| r.fold_gb_s > 0.0 && r.memcpy_gb_s > 0.0 && r.ratio.is_finite())
        );
        assert_eq!(rates.iter().map(|r| r.workers).collect::<Vec<_>>(), vec![1, 2]);
    }
}
