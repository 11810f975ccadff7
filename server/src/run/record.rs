//! What a run records: a line of `metrics.jsonl` per committed version (with the held-out
//! evaluation when it is due), `summary.json` when the run finishes, and the counters a restart
//! takes back from the metrics of the starts before.

use super::*;

/// One line of `metrics.jsonl`: a committed version, in the schema fl-sim writes too.
#[derive(Debug, Clone, Serialize)]
pub struct VersionMetrics {
    /// The fields fl-sim's records have, with the same meanings.
    #[serde(flatten)]
    pub record: VersionRecord,
    /// fl-server only: the aggregation runtime when the version was committed (this start).
    pub runtime: RuntimeStats,
}

/// What `summary.json` holds when a run finishes.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The fields fl-sim's summary has, with the same meanings (`time_s` is real run time here).
    #[serde(flatten)]
    pub totals: RunTotals,
    /// fl-server only, split runs: what crossed the cut during this start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::split::SplitTraffic>,
    /// fl-server only: the aggregation runtime over this start (invocations, cold starts, warm
    /// reuses, queues).
    pub runtime: RuntimeStats,
    /// fl-server only: process figures the daemon adds when it stops (this start only).
    #[serde(flatten)]
    pub process: Option<ProcessFigures>,
}

/// What the server process cost, measured by the daemon over one start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessFigures {
    /// UDP bytes received on client connections (QUIC and TLS overhead included).
    pub wire_bytes_in: u64,
    /// UDP bytes sent on client connections.
    pub wire_bytes_out: u64,
    /// Seconds the coordinator thread spent handling requests and timers.
    pub coordinator_busy_s: f64,
    /// CPU seconds of the whole process (all threads).
    pub cpu_time_s: Option<f64>,
    /// Peak resident memory of the process, bytes.
    pub peak_memory_bytes: Option<u64>,
}

impl Run {
    /// Takes the counters of a previous start from `metrics.jsonl` (initial accuracy, bytes so far,
    /// the last accuracy), so a restarted run reports the whole run.
    pub(super) fn restore_metrics(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.metrics_path) else {
            return;
        };
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let accuracy = record.get("accuracy").and_then(serde_json::Value::as_f64);
            if record.get("version").and_then(serde_json::Value::as_u64) == Some(0) {
                self.initial_accuracy = accuracy;
            }
            if accuracy.is_some() {
                self.last_accuracy = accuracy;
                self.best_accuracy = self.best_accuracy.into_iter().chain(accuracy).reduce(f64::max);
            }
            if let Some(v) = record.get("version").and_then(serde_json::Value::as_u64) {
                self.recorded_through = self.recorded_through.max(Some(ModelVersion(v)));
            }
            let count = |key: &str| record.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
            self.bytes_up = self.bytes_up.max(count("bytes_up"));
            self.bytes_down = self.bytes_down.max(count("bytes_down"));
            self.updates_folded = self.updates_folded.max(count("updates_folded"));
        }
    }

    pub(super) fn due_for_eval(&self, version: ModelVersion) -> bool {
        let last = self.config.stop.rounds.is_some_and(|r| version.0 >= r);
        version.0 == 0 || last || self.config.eval.every.is_none_or(|k| version.0 % k == 0)
    }

    pub(super) fn record_version(&mut self, version: ModelVersion, updates: usize) -> Result<()> {
        if self.recorded_through.is_some_and(|r| version <= r) {
            // Made again after its damaged file was set aside: metrics.jsonl already has its line.
            self.window.take();
            return Ok(());
        }
        let evaluation = match &self.eval {
            Some(test) if self.due_for_eval(version) => Some(
                match &self.split {
                    Some(split) => split.evaluate(&self.core.state().x, test, self.config.eval.batch_size),
                    None => Ok(evaluate(
                        &self.model,
                        &self.core.state().x,
                        test,
                        self.config.eval.batch_size,
                    )?),
                }
                .context("evaluating the global model")?,
            ),
            _ => None,
        };
        let accuracy = evaluation.as_ref().map(|e| e.accuracy);
        if version == ModelVersion(0) {
            self.initial_accuracy = accuracy;
        }
        if accuracy.is_some() {
            self.last_accuracy = accuracy;
            self.best_accuracy = self.best_accuracy.into_iter().chain(accuracy).reduce(f64::max);
        }
        let folded = self.window.take();
        let record = VersionMetrics {
            record: VersionRecord {
                version: version.0,
                time_s: self.now().as_secs_f64(),
                wall_s: self.clock_start.elapsed().as_secs_f64(),
                accuracy,
                loss: evaluation.as_ref().map(|e| e.loss),
                client_loss: folded.client_loss.filter(|l| l.is_finite()),
                bytes_up: self.bytes_up,
                bytes_down: self.bytes_down,
                // A leaf's round reaches the top as one partial: its own clients count here.
                updates: (updates as u64).max(folded.updates),
                updates_folded: self.updates_folded,
                staleness_mean: folded.staleness_mean,
                staleness_max: folded.staleness_max,
            },
            runtime: self.core.executor().stats(),
        };
        tracing::info!(
            version = version.0,
            updates,
            accuracy = accuracy.map(|a| format!("{a:.4}")),
            "committed"
        );
        let line = serde_json::to_string(&record)?;
        self.committed_metrics.push(record);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.metrics_path)
            .with_context(|| format!("opening {}", self.metrics_path.display()))?;
        writeln!(file, "{line}")?;
        Ok(())
    }

    pub(super) fn finish(&mut self) -> Result<()> {
        self.finished = true;
        self.store.mark_finished()?;
        let summary = self.summary();
        std::fs::write(&self.summary_path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", self.summary_path.display()))?;
        tracing::info!(
            rounds = summary.totals.rounds,
            final_accuracy = summary.totals.final_accuracy,
            "the run is finished"
        );
        Ok(())
    }

    /// The run's summary so far.
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            totals: RunTotals {
                rule: self.config.algorithm.rule.name().to_string(),
                scheduler: self.coordinator.scheduler_name().to_string(),
                codec: self.config.codec.to_string(),
                feedback: self.config.feedback.to_string(),
                rounds: self.committed.0,
                initial_accuracy: self.initial_accuracy,
                final_accuracy: self.last_accuracy,
                best_accuracy: self.best_accuracy,
                bytes_up: self.bytes_up,
                bytes_down: self.bytes_down,
                updates_folded: self.updates_folded,
                time_s: self.now().as_secs_f64(),
                wall_time_s: self.clock_start.elapsed().as_secs_f64(),
            },
            split: self.split.as_ref().map(|s| s.traffic()),
            runtime: self.core.executor().stats(),
            process: None,
        }
    }

    /// The versions committed since the last call.
    pub fn take_committed(&mut self) -> Vec<VersionMetrics> {
        std::mem::take(&mut self.committed_metrics)
    }

    /// Held-out accuracy of the latest evaluated version.
    pub fn last_accuracy(&self) -> Option<f64> {
        self.last_accuracy
    }

    /// Where `summary.json` is written.
    pub fn summary_path(&self) -> &Path {
        &self.summary_path
    }
}
