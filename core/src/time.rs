//! Time as a value: instants on a run's clock, in whole microseconds.
//!
//! The sans-IO core never reads a clock. Drivers pass [`Timestamp`]s in — fl-server from a monotonic
//! clock, fl-sim from its virtual clock — and the schedulers compare and add them exactly. Integer
//! ticks make ties at a boundary (FedFix's `t ≤ (n+1)·Δt`) deterministic, which float seconds do not.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// An instant on a run's clock: microseconds since the run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The start of the run.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The instant `micros` microseconds after the start.
    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// The instant `secs` seconds after the start, rounded to the nearest microsecond; negative or
    /// non-finite inputs give the start, huge ones saturate.
    pub fn from_secs_f64(secs: f64) -> Self {
        Self(micros_from_secs(secs))
    }

    /// Microseconds since the start.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Seconds since the start.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 * 1e-6
    }

    /// The instant `span` later (saturating).
    pub fn after(self, span: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(span.as_micros()).unwrap_or(u64::MAX)),
        )
    }

    /// The instant `micros` microseconds later (saturating).
    pub const fn after_micros(self, micros: u64) -> Self {
        Self(self.0.saturating_add(micros))
    }

    /// Microseconds from `earlier` to `self` (0 if `earlier` is later).
    pub const fn micros_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Whole microseconds in `secs` seconds, rounded; negative or non-finite inputs give 0.
pub fn micros_from_secs(secs: f64) -> u64 {
    if secs.is_finite() && secs > 0.0 {
        // `as` saturates at u64::MAX for huge values.
        (secs * 1e6).round() as u64
    } else {
        0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}s", self.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_and_saturate() {
        assert_eq!(Timestamp::from_secs_f64(1.5).as_micros(), 1_500_000);
        assert_eq!(Timestamp::from_secs_f64(-3.0), Timestamp::ZERO);
        assert_eq!(Timestamp::from_secs_f64(f64::NAN), Timestamp::ZERO);
        assert_eq!(Timestamp::from_secs_f64(1e30).as_micros(), u64::MAX);
        assert_eq!(Timestamp(u64::MAX - 1).after_micros(5).as_micros(), u64::MAX);
        assert_eq!(Timestamp(10).after(Duration::from_millis(2)), Timestamp(2010));
        assert_eq!(Timestamp(10).micros_since(Timestamp(30)), 0);
        assert_eq!(Timestamp(2_000_001).to_string(), "2.000001s");
    }
}
