//! Staleness discounts of the asynchronous methods — ALGORITHMS.md §4.2, §4.3, §5.6.
//!
//! An update computed on version `τ` that arrives at version `n` has staleness `s = n − τ`; its
//! aggregation weight is multiplied by `w(s)`:
//! - `constant`: `w(s) = 1`;
//! - `polynomial`: `w(s) = (1 + s)^(−a)` (FedBuff and FedCompass use `a = 0.5`);
//! - `hinge`: `w(s) = 1` for `s ≤ b`, else `1 / (a (s − b) + 1)`.

use serde::{Deserialize, Serialize};

/// A staleness discount `w(s)`, with `w(0) = 1` and non-increasing in `s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Staleness {
    /// No discount.
    Constant,
    /// `(1 + s)^(−a)`.
    Polynomial {
        /// Exponent `a ≥ 0`.
        a: f64,
    },
    /// 1 up to `b`, then `1 / (a (s − b) + 1)`.
    Hinge {
        /// Slope `a ≥ 0`.
        a: f64,
        /// Staleness tolerated without discount.
        b: u64,
    },
}

impl Default for Staleness {
    fn default() -> Self {
        Staleness::Polynomial { a: 0.5 }
    }
}

impl Staleness {
    /// The discount for staleness `s`.
    pub fn weight(&self, s: u64) -> f64 {
        match *self {
            Staleness::Constant => 1.0,
            Staleness::Polynomial { a } => (1.0 + s as f64).powf(-a),
            Staleness::Hinge { a, b } => {
                if s <= b {
                    1.0
                } else {
                    1.0 / (a * (s - b) as f64 + 1.0)
                }
            }
        }
    }

    /// Fails unless the parameters give a discount in (0, 1].
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Staleness::Constant => Ok(()),
            Staleness::Polynomial { a } | Staleness::Hinge { a, .. } if !(a.is_finite() && a >= 0.0) => Err(
                format!("staleness exponent/slope a must be finite and ≥ 0, got {a}"),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_discount_is_one_when_fresh_and_never_increases() {
        for f in [
            Staleness::Constant,
            Staleness::Polynomial { a: 0.5 },
            Staleness::Hinge { a: 10.0, b: 4 },
        ] {
            assert_eq!(f.weight(0), 1.0);
            for s in 0..100 {
                assert!(f.weight(s + 1) <= f.weight(s), "{f:?} increases at {s}");
                assert!(f.weight(s) > 0.0);
            }
        }
        assert!((Staleness::Polynomial { a: 0.5 }.weight(3) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn hinge_is_continuous_at_b() {
        let h = Staleness::Hinge { a: 10.0, b: 4 };
        assert_eq!(h.weight(4), 1.0);
        assert!((h.weight(5) - 1.0 / 11.0).abs() < 1e-12);
        // The formula's value at s = b equals the flat part's value.
        assert_eq!(1.0 / (10.0 * 0.0 + 1.0), h.weight(4));
    }

    #[test]
    fn reads_from_toml_and_rejects_negative_exponents() {
        let f: Staleness = toml::from_str("kind = \"hinge\"\na = 10.0\nb = 4").unwrap();
        assert_eq!(f, Staleness::Hinge { a: 10.0, b: 4 });
        assert!(Staleness::Polynomial { a: -1.0 }.validate().is_err());
        assert!(Staleness::default().validate().is_ok());
    }
}
