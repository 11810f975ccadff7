//! The aggregation monoid: f64 weighted sums of client uploads.
//!
//! Every server rule reduces uploads into an [`Accumulator`]: for each uploaded vector ("part") the
//! sum `Σ w_i v_i` in f64, plus the total weight `Σ w_i` and the number of uploads folded.
//! [`Accumulator::fold`] adds one upload, [`Accumulator::merge`] adds another accumulator; both are
//! associative and commutative up to f64 rounding, so a runtime may fold eagerly as uploads arrive,
//! split the work over workers and merge partial sums in a tree without knowing which algorithm
//! runs. Division by the total weight happens only in the rule's `apply`.

use thiserror::Error;

/// Why an upload or a partial sum was refused. A refused upload never touches the sums.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FoldError {
    /// The upload has a different number of vectors than the rule uploads.
    #[error("upload has {actual} vectors, the rule expects {expected}")]
    PartCount {
        /// Vectors per upload for this rule.
        expected: usize,
        /// Vectors received.
        actual: usize,
    },
    /// A vector of the wrong length.
    #[error("upload vector {part} has {actual} values, the model has {expected}")]
    Length {
        /// Which vector.
        part: usize,
        /// The model dimension.
        expected: usize,
        /// What arrived.
        actual: usize,
    },
    /// A NaN or infinite value.
    #[error("upload vector {part} holds a non-finite value at index {index}")]
    NonFinite {
        /// Which vector.
        part: usize,
        /// First offending index.
        index: usize,
    },
    /// A negative, NaN or infinite weight.
    #[error("aggregation weight {0} is not a finite non-negative number")]
    Weight(f64),
    /// Two accumulators of different shapes cannot be merged.
    #[error("cannot merge accumulators of shapes {left:?} and {right:?}")]
    Shape {
        /// (parts, dimension) of the receiving accumulator.
        left: (usize, usize),
        /// (parts, dimension) of the other.
        right: (usize, usize),
    },
}

/// Weighted sums of uploads, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    sums: Vec<Vec<f64>>,
    dim: usize,
    total_weight: f64,
    count: u64,
    rejected: u64,
}

impl Accumulator {
    /// An empty accumulator for uploads of `parts` vectors of `dim` values each.
    pub fn new(parts: usize, dim: usize) -> Self {
        Self {
            sums: vec![vec![0.0; dim]; parts],
            dim,
            total_weight: 0.0,
            count: 0,
            rejected: 0,
        }
    }

    /// An accumulator holding given sums (each of one length), e.g. a partial aggregate received
    /// from another process; refuses non-finite sums, a bad total weight or ragged parts.
    pub fn from_sums(sums: Vec<Vec<f64>>, total_weight: f64, count: u64) -> Result<Self, FoldError> {
        if !(total_weight.is_finite() && total_weight >= 0.0) {
            return Err(FoldError::Weight(total_weight));
        }
        let dim = sums.first().map_or(0, Vec::len);
        for (part, sum) in sums.iter().enumerate() {
            if sum.len() != dim {
                return Err(FoldError::Length {
                    part,
                    expected: dim,
                    actual: sum.len(),
                });
            }
            if let Some(index) = sum.iter().position(|x| !x.is_finite()) {
                return Err(FoldError::NonFinite { part, index });
            }
        }
        Ok(Self {
            sums,
            dim,
            total_weight,
            count,
            rejected: 0,
        })
    }

    /// Empties the accumulator but keeps its memory, so a warm worker reuses it for the next
    /// aggregation without allocating or faulting in pages again.
    pub fn reset(&mut self) {
        for sum in &mut self.sums {
            sum.fill(0.0);
        }
        self.total_weight = 0.0;
        self.count = 0;
        self.rejected = 0;
    }

    /// Vectors per upload.
    pub fn parts(&self) -> usize {
        self.sums.len()
    }

    /// Values per vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `Σ w_i v_i` of one part.
    pub fn sum(&self, part: usize) -> &[f64] {
        &self.sums[part]
    }

    /// `Σ w_i`.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Uploads folded in.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Uploads refused (wrong shape, non-finite values, bad weight).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// True when nothing with positive weight has been folded.
    pub fn is_empty(&self) -> bool {
        self.count == 0 || self.total_weight == 0.0
    }

    /// Checks an upload against this accumulator without changing it.
    pub fn check(&self, upload: &[&[f32]], weight: f64) -> Result<(), FoldError> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(FoldError::Weight(weight));
        }
        if upload.len() != self.sums.len() {
            return Err(FoldError::PartCount {
                expected: self.sums.len(),
                actual: upload.len(),
            });
        }
        for (part, v) in upload.iter().enumerate() {
            if v.len() != self.dim {
                return Err(FoldError::Length {
                    part,
                    expected: self.dim,
                    actual: v.len(),
                });
            }
            if let Some(index) = v.iter().position(|x| !x.is_finite()) {
                return Err(FoldError::NonFinite { part, index });
            }
        }
        Ok(())
    }

    /// Adds `weight · v` to each part's sum. A refused upload is counted in [`rejected`](Self::rejected)
    /// and leaves the sums untouched.
    pub fn fold(&mut self, upload: &[&[f32]], weight: f64) -> Result<(), FoldError> {
        if let Err(e) = self.check(upload, weight) {
            self.rejected += 1;
            return Err(e);
        }
        for (sum, v) in self.sums.iter_mut().zip(upload) {
            add_scaled(sum, v, weight);
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds another accumulator's sums, weights and counts into this one.
    pub fn merge(&mut self, other: &Accumulator) -> Result<(), FoldError> {
        if (self.parts(), self.dim) != (other.parts(), other.dim) {
            return Err(FoldError::Shape {
                left: (self.parts(), self.dim),
                right: (other.parts(), other.dim),
            });
        }
        for (sum, theirs) in self.sums.iter_mut().zip(&other.sums) {
            for (s, &t) in sum.iter_mut().zip(theirs) {
                *s += t;
            }
        }
        self.total_weight += other.total_weight;
        self.count += other.count;
        self.rejected += other.rejected;
        Ok(())
    }

    /// `Σ w_i v_i / Σ w_i` of one part, or `None` when the total weight is zero.
    pub fn weighted_mean(&self, part: usize) -> Option<Vec<f64>> {
        (!self.is_empty()).then(|| self.sums[part].iter().map(|s| s / self.total_weight).collect())
    }
}

/// `sum += weight · v`, in fixed-width chunks so the compiler emits packed conversions and
/// multiply-adds.
fn add_scaled(sum: &mut [f64], v: &[f32], weight: f64) {
    const LANES: usize = 8;
    let mut sums = sum.chunks_exact_mut(LANES);
    let mut values = v.chunks_exact(LANES);
    for (s, x) in (&mut sums).zip(&mut values) {
        for lane in 0..LANES {
            s[lane] += weight * f64::from(x[lane]);
        }
    }
    for (s, &x) in sums.into_remainder().iter_mut().zip(values.remainder()) {
        *s += weight * f64::from(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn folded(updates: &[(Vec<f32>, f64)]) -> Accumulator {
        let mut acc = Accumulator::new(1, updates[0].0.len());
        for (v, w) in updates {
            acc.fold(&[v], *w).unwrap();
        }
        acc
    }

    #[test]
    fn weights_sum_to_one_and_identical_updates_average_to_themselves() {
        let delta = vec![0.5f32, -1.25, 3.0];
        let acc = folded(&[
            (delta.clone(), 600.0),
            (delta.clone(), 100.0),
            (delta.clone(), 1.0),
        ]);
        let mean = acc.weighted_mean(0).unwrap();
        for (m, d) in mean.iter().zip(&delta) {
            assert!((m - f64::from(*d)).abs() < 1e-12);
        }
        assert_eq!(acc.count(), 3);
    }

    #[test]
    fn zero_weight_has_no_influence_and_all_zero_is_empty() {
        let with = folded(&[(vec![1.0, 2.0], 3.0), (vec![100.0, -100.0], 0.0)]);
        let without = folded(&[(vec![1.0, 2.0], 3.0)]);
        assert_eq!(with.weighted_mean(0), without.weighted_mean(0));
        let zero = folded(&[(vec![1.0, 2.0], 0.0)]);
        assert!(zero.is_empty() && zero.weighted_mean(0).is_none());
    }

    #[test]
    fn bad_uploads_are_refused_counted_and_leave_the_sums_alone() {
        let mut acc = Accumulator::new(2, 3);
        acc.fold(&[&[1.0, 1.0, 1.0], &[2.0, 2.0, 2.0]], 1.0).unwrap();
        let before = acc.clone();
        let good = [1.0f32, 1.0, 1.0];
        assert_eq!(
            acc.fold(&[&good], 1.0),
            Err(FoldError::PartCount {
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            acc.fold(&[&good, &[1.0, 1.0]], 1.0),
            Err(FoldError::Length {
                part: 1,
                expected: 3,
                actual: 2
            })
        );
        assert_eq!(
            acc.fold(&[&good, &[1.0, f32::NAN, 1.0]], 1.0),
            Err(FoldError::NonFinite { part: 1, index: 1 })
        );
        assert_eq!(
            acc.fold(&[&good, &[1.0, 1.0, f32::INFINITY]], 1.0),
            Err(FoldError::NonFinite { part: 1, index: 2 })
        );
        assert_eq!(acc.fold(&[&good, &good], -1.0), Err(FoldError::Weight(-1.0)));
        assert!(acc.fold(&[&good, &good], f64::NAN).is_err());
        assert_eq!(acc.rejected(), 6);
        assert_eq!(
            (acc.sum(0), acc.sum(1), acc.count()),
            (before.sum(0), before.sum(1), before.count())
        );
        assert!(acc.merge(&Accumulator::new(1, 3)).is_err());
        acc.reset();
        assert_eq!(acc, Accumulator::new(2, 3));
    }

    fn arb_updates() -> impl Strategy<Value = Vec<(Vec<f32>, f64)>> {
        (1usize..8).prop_flat_map(|dim| {
            prop::collection::vec((prop::collection::vec(-1e3f32..1e3, dim), 0.0f64..100.0), 1..24)
        })
    }

    fn assert_close(a: &Accumulator, b: &Accumulator) {
        assert_eq!(a.count(), b.count());
        let scale = a.total_weight().abs().max(1.0);
        assert!((a.total_weight() - b.total_weight()).abs() <= 1e-9 * scale);
        for (x, y) in a.sum(0).iter().zip(b.sum(0)) {
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
                "{x} vs {y}"
            );
        }
    }

    proptest! {
        /// Folding order does not matter.
        #[test]
        fn any_arrival_order_gives_the_same_sums(updates in arb_updates(), seed in any::<u64>()) {
            let mut shuffled = updates.clone();
            // Deterministic Fisher-Yates driven by the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            assert_close(&folded(&updates), &folded(&shuffled));
        }

        /// Any tree of partial accumulators — updates spread over the leaves at random, arriving in
        /// a random order and folded eagerly as they come, leaves merged into middles and middles
        /// into a top with a random fan-out — equals folding everything into one flat accumulator
        /// lazily, after all arrived.
        #[test]
        fn hierarchical_eager_equals_flat_lazy(
            updates in arb_updates(),
            leaf_of in prop::collection::vec(0usize..7, 24),
            leaves in 1usize..7,
            fan_out in 2usize..4,
            seed in any::<u64>(),
        ) {
            let dim = updates[0].0.len();
            let mut arrivals: Vec<usize> = (0..updates.len()).collect();
            let mut s = seed;
            for i in (1..arrivals.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                arrivals.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut level: Vec<Accumulator> = vec![Accumulator::new(1, dim); leaves];
            for &k in &arrivals {
                let (v, w) = &updates[k];
                level[leaf_of[k] % leaves].fold(&[v], *w).unwrap();
            }
            while level.len() > 1 {
                level = level
                    .chunks(fan_out)
                    .map(|children| {
                        let mut parent = Accumulator::new(1, dim);
                        for child in children {
                            parent.merge(child).unwrap();
                        }
                        parent
                    })
                    .collect();
            }
            assert_close(&level[0], &folded(&updates));
        }
    }
}
