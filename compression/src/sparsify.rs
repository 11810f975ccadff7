//! Sparsifiers: which entries of a layer are sent.
//!
//! - Top-k keeps the `k` largest magnitudes, exactly `k`, ties broken by the lower index.
//! - Rand-k keeps `k` entries drawn uniformly from a seed both sides know (the payload carries it),
//!   scaled by `m/k` so that `E[C(v)] = v`; the indices are never sent.
//!
//! Both use `k = max(1, ⌈z·m⌉)`, capped at `m`.

use rand::SeedableRng;
use rand::rngs::StdRng;
use std::cmp::Ordering;

/// Entries kept of a layer of `m` values at fraction `z`.
pub fn kept(m: usize, z: f64) -> usize {
    ((z * m as f64).ceil() as usize).clamp(1, m.max(1)).min(m)
}

/// Indices of the `k` largest `|v|`, ascending; ties go to the lower index.
pub fn top_k(v: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(v.len());
    if k == v.len() {
        return (0..v.len() as u32).collect();
    }
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    // Larger magnitude first, then lower index: a total order, so the selection is exact.
    let order = |a: &u32, b: &u32| -> Ordering {
        let (ma, mb) = (v[*a as usize].abs(), v[*b as usize].abs());
        mb.total_cmp(&ma).then(a.cmp(b))
    };
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// `k` distinct indices of `0..m` drawn from `seed`, ascending.
pub fn rand_k(m: usize, k: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut idx: Vec<u32> = rand::seq::index::sample(&mut rng, m, k.min(m))
        .into_iter()
        .map(|i| i as u32)
        .collect();
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ties_go_to_the_lower_index() {
        assert_eq!(top_k(&[1.0, -3.0, 3.0, 0.5, 3.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.0; 5], 3), vec![0, 1, 2]);
        assert_eq!(kept(10, 0.2), 2);
        assert_eq!(kept(1, 0.01), 1);
        assert_eq!(kept(3, 1.0), 3);
    }

    proptest! {
        /// Exactly k kept, and no dropped entry is larger than a kept one (ALGORITHMS.md §7.5.1).
        #[test]
        fn top_k_keeps_exactly_the_largest(v in prop::collection::vec(-100f32..100.0, 1..200), z in 0.01f64..1.0) {
            let k = kept(v.len(), z);
            let idx = top_k(&v, k);
            prop_assert_eq!(idx.len(), k);
            prop_assert!(idx.windows(2).all(|w| w[0] < w[1]));
            let smallest_kept = idx.iter().map(|&i| v[i as usize].abs()).fold(f32::INFINITY, f32::min);
            for (i, x) in v.iter().enumerate() {
                if !idx.contains(&(i as u32)) {
                    prop_assert!(x.abs() <= smallest_kept);
                }
            }
        }

        #[test]
        fn rand_k_is_reproducible_from_the_seed(m in 1usize..500, z in 0.01f64..1.0, seed in any::<u64>()) {
            let k = kept(m, z);
            let a = rand_k(m, k, seed);
            prop_assert_eq!(&a, &rand_k(m, k, seed));
            prop_assert_eq!(a.len(), k);
            prop_assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&i| (i as usize) < m));
        }
    }
}
