//! Quantizers: how the kept values of a layer are represented (ALGORITHMS.md §7.2 step 2, §10.1).
//!
//! Symbolic quantizers turn values into symbols of a small alphabet plus a few parameters, so the
//! Huffman / position encoders can code them:
//! - 1-D k-means ([`kmeans`]) in FedZip's official form (centroids linearly spaced from min to max,
//!   4 Lloyd iterations, over all entries) or pinned-zero form (0 an exact centroid, `k − 1`
//!   centroids fitted to the non-zeros); an empty cluster keeps its previous centroid;
//! - QSGD ([`qsgd`]): `ℓ = ⌊|v|/‖v‖·s + u⌋`, `u ~ U[0, 1)`, value `sign · ‖v‖ · ℓ / s` — unbiased;
//! - scaled sign ([`sign`]): `sign(v) · mean|v|`.
//!
//! Casts (fp16, bf16) keep one value per entry; values beyond the format's range saturate to its
//! largest finite value.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Lloyd iterations of FedZip's k-means.
pub const KMEANS_ITERATIONS: usize = 4;

/// Centroids and one symbol per value.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustered {
    /// Centroid values, ascending.
    pub centroids: Vec<f32>,
    /// Per value, the index of its centroid.
    pub symbols: Vec<u16>,
}

/// The nearest centroid of `v` among ascending `centroids` (ties to the lower index).
fn nearest(centroids: &[f64], v: f64) -> usize {
    let mut best = 0;
    let mut best_d = f64::INFINITY;
    for (i, &c) in centroids.iter().enumerate() {
        let d = (v - c).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best
}

/// Lloyd's algorithm from `init` for `iterations` rounds; returns final centroids, the symbols,
/// and the sum of squared errors after each round (for the monotonicity test).
fn lloyd(values: &[f32], init: Vec<f64>, iterations: usize) -> (Vec<f64>, Vec<u16>, Vec<f64>) {
    let mut centroids = init;
    let mut symbols = vec![0u16; values.len()];
    let mut sse_history = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let mut sum = vec![0.0f64; centroids.len()];
        let mut count = vec![0usize; centroids.len()];
        for (s, &v) in symbols.iter_mut().zip(values) {
            let c = nearest(&centroids, f64::from(v));
            *s = c as u16;
            sum[c] += f64::from(v);
            count[c] += 1;
        }
        for ((c, s), n) in centroids.iter_mut().zip(&sum).zip(&count) {
            if *n > 0 {
                *c = s / *n as f64;
            }
        }
        sse_history.push(sse(values, &centroids, &symbols));
    }
    // Final assignment to the final centroids.
    for (s, &v) in symbols.iter_mut().zip(values) {
        *s = nearest(&centroids, f64::from(v)) as u16;
    }
    (centroids, symbols, sse_history)
}

fn sse(values: &[f32], centroids: &[f64], symbols: &[u16]) -> f64 {
    values
        .iter()
        .zip(symbols)
        .map(|(&v, &s)| (f64::from(v) - centroids[usize::from(s)]).powi(2))
        .sum()
}

fn linspace(lo: f64, hi: f64, k: usize) -> Vec<f64> {
    if k == 1 {
        return vec![(lo + hi) / 2.0];
    }
    (0..k)
        .map(|i| lo + (hi - lo) * i as f64 / (k - 1) as f64)
        .collect()
}

fn min_max(values: impl Iterator<Item = f32>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| {
        let v = f64::from(v);
        Some(match acc {
            None => (v, v),
            Some((lo, hi)) => (lo.min(v), hi.max(v)),
        })
    })
}

/// FedZip's k-means: `k` centroids over all of `values`, initialised linearly from min to max.
pub fn kmeans_official(values: &[f32], k: usize) -> Clustered {
    let Some((lo, hi)) = min_max(values.iter().copied()) else {
        return Clustered {
            centroids: vec![0.0],
            symbols: Vec::new(),
        };
    };
    let (centroids, symbols, _) = lloyd(values, linspace(lo, hi, k), KMEANS_ITERATIONS);
    Clustered {
        centroids: centroids.iter().map(|&c| c as f32).collect(),
        symbols,
    }
}

/// Pinned-zero k-means: centroid 0 is exactly 0.0 and takes the zeros; `k − 1` centroids are
/// fitted to the non-zeros (FedZip's initialisation and iterations).
pub fn kmeans_pinned(values: &[f32], k: usize) -> Clustered {
    let nonzero: Vec<f32> = values.iter().copied().filter(|&v| v != 0.0).collect();
    let Some((lo, hi)) = min_max(nonzero.iter().copied()) else {
        return Clustered {
            centroids: vec![0.0],
            symbols: vec![0; values.len()],
        };
    };
    let (fitted, _, _) = lloyd(
        &nonzero,
        linspace(lo, hi, k.saturating_sub(1).max(1)),
        KMEANS_ITERATIONS,
    );
    let mut centroids: Vec<f32> = vec![0.0];
    centroids.extend(fitted.iter().map(|&c| c as f32));
    let symbols = values
        .iter()
        .map(|&v| {
            if v == 0.0 {
                0
            } else {
                1 + nearest(&fitted, f64::from(v)) as u16
            }
        })
        .collect();
    Clustered { centroids, symbols }
}

/// QSGD levels of `values` on `s` levels: the L2 norm and one signed level per value.
pub fn qsgd(values: &[f32], s: u16, seed: u64) -> (f32, Vec<i32>) {
    let norm = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return (0.0, vec![0; values.len()]);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let s = f64::from(s);
    let levels = values
        .iter()
        .map(|&v| {
            let r = f64::from(v).abs() / norm * s;
            let floor = r.floor();
            let level = floor + f64::from(u8::from(rng.random::<f64>() < r - floor));
            let level = level.min(s) as i32;
            if v < 0.0 { -level } else { level }
        })
        .collect();
    (norm as f32, levels)
}

/// The value of QSGD level `level` of `s` for a layer of norm `norm`.
pub fn qsgd_value(norm: f32, s: u16, level: i32) -> f32 {
    (f64::from(norm) * f64::from(level) / f64::from(s)) as f32
}

/// Scaled sign: `mean|v|` and which values are negative.
pub fn sign(values: &[f32]) -> (f32, Vec<bool>) {
    let n = values.len().max(1) as f64;
    let scale = values.iter().map(|&v| f64::from(v).abs()).sum::<f64>() / n;
    (scale as f32, values.iter().map(|&v| v < 0.0).collect())
}

/// f32 → IEEE half bits, saturating at ±65504.
pub fn to_f16(v: f32) -> u16 {
    half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_bits()
}

/// IEEE half bits → f32.
pub fn from_f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// f32 → bfloat16 bits (round to nearest even), saturating at the largest finite bfloat16.
pub fn to_bf16(v: f32) -> u16 {
    let max = half::bf16::MAX.to_f32();
    half::bf16::from_f32(v.clamp(-max, max)).to_bits()
}

/// bfloat16 bits → f32.
pub fn from_bf16(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// At most k distinct values; the k-means objective never increases (ALGORITHMS.md §7.5.2–3).
        #[test]
        fn kmeans_objective_never_increases(values in prop::collection::vec(-10f32..10.0, 1..300), k in 1usize..6) {
            let (lo, hi) = min_max(values.iter().copied()).unwrap();
            let (_, _, history) = lloyd(&values, linspace(lo, hi, k), 8);
            for w in history.windows(2) {
                prop_assert!(w[1] <= w[0] * (1.0 + 1e-12) + 1e-12, "{history:?}");
            }
            let c = kmeans_official(&values, k);
            prop_assert!(c.centroids.len() <= k);
            prop_assert!(c.symbols.iter().all(|&s| usize::from(s) < c.centroids.len()));
        }

        /// Pinned mode keeps zeros exactly zero and everything else off the zero centroid.
        #[test]
        fn pinned_kmeans_keeps_zeros(values in prop::collection::vec(prop_oneof![Just(0.0f32), -10f32..10.0], 1..300)) {
            let c = kmeans_pinned(&values, 3);
            prop_assert_eq!(c.centroids[0], 0.0);
            for (&v, &s) in values.iter().zip(&c.symbols) {
                prop_assert_eq!(v == 0.0, s == 0);
            }
        }
    }

    #[test]
    fn fedzip_initialisation_is_min_mid_max() {
        assert_eq!(linspace(-2.0, 4.0, 3), vec![-2.0, 1.0, 4.0]);
        let c = kmeans_official(&[5.0; 7], 3);
        assert!(c.centroids.contains(&5.0));
    }

    #[test]
    fn qsgd_is_unbiased() {
        let v: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 0.3).collect();
        let trials = 20_000;
        let mut mean = vec![0.0f64; v.len()];
        for t in 0..trials {
            let (norm, levels) = qsgd(&v, 4, t);
            for (m, &l) in mean.iter_mut().zip(&levels) {
                *m += f64::from(qsgd_value(norm, 4, l)) / trials as f64;
            }
        }
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        for (m, &x) in mean.iter().zip(&v) {
            // Each estimate has variance ≤ (norm/s)²/4; 5 standard errors of the mean.
            let tolerance = 5.0 * norm / 4.0 / 2.0 / (trials as f64).sqrt();
            assert!((m - f64::from(x)).abs() < tolerance, "{m} vs {x}");
        }
    }

    #[test]
    fn casts_round_trip_closely_and_saturate() {
        for v in [0.0f32, 1.0, -3.25, 1e-3, 65504.0] {
            assert!((from_f16(to_f16(v)) - v).abs() <= v.abs() * 1e-3);
            assert!((from_bf16(to_bf16(v)) - v).abs() <= v.abs() * 1e-2);
        }
        assert_eq!(from_f16(to_f16(1e9)), 65504.0);
        assert!(from_bf16(to_bf16(f32::MAX)).is_finite());
    }
}
