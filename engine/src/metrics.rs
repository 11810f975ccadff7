//! The metrics both drivers write, with one meaning on both sides: a line of `metrics.jsonl` per
//! recorded version ([`VersionRecord`]) and the part of `summary.json` every run has
//! ([`RunTotals`]). fl-sim records a version when it evaluates it, fl-server every version it
//! commits; fields that only one side has live in that side's summary and say so there.

use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The global version.
    pub version: u64,
    /// Run time when the version was ready, seconds: virtual in fl-sim; in fl-server real time
    /// since the run began, time the server was down not counted.
    pub time_s: f64,
    /// Wall-clock seconds since this process started the run (in fl-sim the only field that
    /// differs between two runs of one experiment).
    pub wall_s: f64,
    /// Held-out accuracy, if evaluated.
    pub accuracy: Option<f64>,
    /// Held-out loss, if evaluated.
    pub loss: Option<f64>,
    /// Mean local training loss the clients reported with the updates folded since the previous
    /// record (absent when none were folded or the run evaluates nothing).
    pub client_loss: Option<f64>,
    /// Update payload bytes accepted since the run began.
    pub bytes_up: u64,
    /// Model bytes sent to devices since the run began.
    pub bytes_down: u64,
    /// Updates folded since the previous record.
    pub updates: u64,
    /// Updates folded since the run began.
    pub updates_folded: u64,
    /// Mean staleness (versions between an update's base and the version it was folded into) of
    /// the updates folded since the previous record.
    pub staleness_mean: f64,
    /// Largest staleness among them.
    pub staleness_max: u64,
}

/// What was folded since the previous record: the updates, their staleness and reported losses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FoldWindow {
    updates: u64,
    staleness_sum: f64,
    staleness_max: u64,
    loss_sum: f64,
}

/// The figures of a [`FoldWindow`] for a record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowFigures {
    /// Updates folded.
    pub updates: u64,
    /// Their mean reported loss (`None` when there were none).
    pub client_loss: Option<f64>,
    /// Their mean staleness.
    pub staleness_mean: f64,
    /// Their largest staleness.
    pub staleness_max: u64,
}

impl FoldWindow {
    /// Counts `updates` folded updates whose staleness averaged `staleness_mean` (at most
    /// `staleness_max`) and whose reported loss averaged `loss_mean`.
    pub fn add(&mut self, updates: u64, staleness_mean: f64, staleness_max: u64, loss_mean: f64) {
        self.updates += updates;
        self.staleness_sum += staleness_mean * updates as f64;
        self.staleness_max = self.staleness_max.max(staleness_max);
        self.loss_sum += loss_mean * updates as f64;
    }

    /// Counts one folded update.
    pub fn fold(&mut self, staleness: u64, loss: f32) {
        self.add(1, staleness as f64, staleness, f64::from(loss));
    }

    /// The figures so far, and a fresh window.
    pub fn take(&mut self) -> WindowFigures {
        let w = std::mem::take(self);
        let n = w.updates.max(1) as f64;
        WindowFigures {
            updates: w.updates,
            client_loss: (w.updates > 0).then(|| w.loss_sum / n),
            staleness_mean: w.staleness_sum / n,
            staleness_max: w.staleness_max,
        }
    }
}

/// What every `summary.json` holds, in fl-sim and fl-server alike (each flattens it into its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTotals {
    /// The rule's name.
    pub rule: String,
    /// The scheduler's name.
    pub scheduler: String,
    /// The codec chain.
    pub codec: String,
    /// Error feedback around it.
    pub feedback: String,
    /// Global versions produced.
    pub rounds: u64,
    /// Held-out accuracy of the initial model, if evaluated.
    pub initial_accuracy: Option<f64>,
    /// Held-out accuracy at the last evaluation.
    pub final_accuracy: Option<f64>,
    /// Best held-out accuracy seen.
    pub best_accuracy: Option<f64>,
    /// Update payload bytes accepted.
    pub bytes_up: u64,
    /// Model bytes sent.
    pub bytes_down: u64,
    /// Updates folded over the run.
    pub updates_folded: u64,
    /// Run time, seconds: virtual in fl-sim; in fl-server real, time the server was down not
    /// counted.
    pub time_s: f64,
    /// Wall-clock seconds of this process's part of the run.
    pub wall_time_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_averages_what_was_folded_and_starts_over() {
        let mut w = FoldWindow::default();
        w.fold(0, 2.0);
        w.fold(3, 1.0);
        w.add(2, 1.0, 2, 0.5);
        let f = w.take();
        assert_eq!(f.updates, 4);
        assert_eq!(f.staleness_max, 3);
        assert!((f.staleness_mean - 5.0 / 4.0).abs() < 1e-12);
        assert_eq!(f.client_loss, Some(4.0 / 4.0));
        let empty = w.take();
        assert_eq!(
            (empty.updates, empty.client_loss, empty.staleness_max),
            (0, None, 0)
        );
    }
}
