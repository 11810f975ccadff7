//! Real device traces read from the shared data folder (never copied into the repository):
//! phone compute scores (FLASH's AI-Benchmark table) and measured 3G/HSDPA throughput series
//! (Riiser et al., as prepared by Pensieve). Fleets turn them into per-device speeds and
//! bandwidth over time.
//!
//! - `device_traces/flash/benchmark2score.json`: object, phone name → total AI score.
//! - `device_traces/pensieve_norway_hsdpa/norway_*`: lines `time_s throughput_Mbit_per_s`.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// A trace file that is missing or malformed.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The file or folder cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line or value does not parse.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 for a whole-file error).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file or folder holds no usable entries.
    #[error("{0} holds no usable entries")]
    Empty(PathBuf),
}

/// Where the traces live under the data root.
pub const AI_SCORES: &str = "device_traces/flash/benchmark2score.json";
/// The folder of HSDPA throughput series under the data root.
pub const HSDPA_DIR: &str = "device_traces/pensieve_norway_hsdpa";

fn read(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A phone and its AI-Benchmark total score.
#[derive(Debug, Clone, PartialEq)]
pub struct PhoneScore {
    /// The phone's name.
    pub name: String,
    /// Total AI score (higher is faster).
    pub score: u64,
}

/// Reads the phone scores, sorted by name.
pub fn load_ai_scores(path: &Path) -> Result<Vec<PhoneScore>, TraceError> {
    let text = read(path)?;
    let map: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| TraceError::Parse {
            path: path.to_path_buf(),
            line: e.line(),
            reason: e.to_string(),
        })?;
    let mut scores = Vec::with_capacity(map.len());
    for (name, value) in map {
        let score = value
            .as_u64()
            .filter(|&s| s > 0)
            .ok_or_else(|| TraceError::Parse {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("`{name}` has score {value}, not a positive integer"),
            })?;
        scores.push(PhoneScore {
            name: name.trim().to_string(),
            score,
        });
    }
    if scores.is_empty() {
        return Err(TraceError::Empty(path.to_path_buf()));
    }
    Ok(scores)
}

/// Throughput measured over time, replayed as a step function and looped past its end.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthTrace {
    /// The file's name.
    pub name: String,
    /// Sample times, seconds from the start, increasing.
    pub times_s: Vec<f64>,
    /// Throughput at each sample, bytes per second.
    pub bytes_per_s: Vec<f64>,
}

impl BandwidthTrace {
    /// Parses `time_s throughput_Mbit_per_s` lines; `path` names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TraceError> {
        let fail = |line: usize, reason: String| TraceError::Parse {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let (mut times_s, mut bytes_per_s) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            let [t, mbit] = fields[..] else {
                return Err(fail(
                    i + 1,
                    format!("expected `time Mbit/s`, got {} fields", fields.len()),
                ));
            };
            let t: f64 = t
                .parse()
                .map_err(|_| fail(i + 1, format!("`{t}` is not a time")))?;
            let mbit: f64 = mbit
                .parse()
                .map_err(|_| fail(i + 1, format!("`{mbit}` is not a throughput")))?;
            if !(t.is_finite() && mbit.is_finite() && mbit >= 0.0) || times_s.last().is_some_and(|&p| t <= p)
            {
                return Err(fail(
                    i + 1,
                    "times must increase and throughput be finite and ≥ 0".into(),
                ));
            }
            times_s.push(t);
            bytes_per_s.push(mbit * 1e6 / 8.0);
        }
        if times_s.is_empty() {
            return Err(TraceError::Empty(path.to_path_buf()));
        }
        Ok(Self {
            name: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            times_s,
            bytes_per_s,
        })
    }

    /// Seconds the trace covers before it loops (its last sample time, at least one second).
    pub fn period_s(&self) -> f64 {
        self.times_s.last().copied().unwrap_or(0.0).max(1.0)
    }

    /// Throughput at `t_s` seconds (the latest sample at or before it, looping), bytes per second.
    pub fn at(&self, t_s: f64) -> f64 {
        let t = t_s.max(0.0) % self.period_s();
        let i = self.times_s.partition_point(|&s| s <= t);
        self.bytes_per_s[i.saturating_sub(1)]
    }

    /// Bytes one period carries, following [`BandwidthTrace::at`] (the first sample also holds
    /// before its own time).
    pub fn bytes_per_period(&self) -> f64 {
        let period = self.period_s();
        let mut total = self.bytes_per_s[0] * self.times_s[0].min(period);
        for (k, &rate) in self.bytes_per_s.iter().enumerate() {
            let start = self.times_s[k].min(period);
            let end = self.times_s.get(k + 1).copied().unwrap_or(period).min(period);
            total += rate * (end - start).max(0.0);
        }
        total
    }

    /// Mean throughput over one period, bytes per second.
    pub fn mean_bytes_per_s(&self) -> f64 {
        self.bytes_per_period() / self.period_s()
    }
}

/// Reads every trace in `dir`, sorted by file name.
pub fn load_bandwidth_traces(dir: &Path) -> Result<Vec<BandwidthTrace>, TraceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TraceError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let traces = paths
        .iter()
        .map(|p| BandwidthTrace::parse(p, &read(p)?))
        .collect::<Result<Vec<_>, _>>()?;
    if traces.is_empty() {
        return Err(TraceError::Empty(dir.to_path_buf()));
    }
    Ok(traces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_replays_as_a_looping_step_function() {
        let t = BandwidthTrace::parse(Path::new("t"), "0.0 8.0\n1.0 16.0\n\n4.0 8.0\n").unwrap();
        assert_eq!(t.at(0.5), 1e6);
        assert_eq!(t.at(1.0), 2e6);
        assert_eq!(t.at(3.9), 2e6);
        assert_eq!(t.at(4.5), 1e6, "loops after 4 s");
        // 1 s at 1 MB/s, 3 s at 2 MB/s.
        assert!((t.mean_bytes_per_s() - 1.75e6).abs() < 1e-6);
    }

    #[test]
    fn malformed_traces_name_the_line() {
        for (text, line) in [
            ("0 1\nx 2\n", 2),
            ("0 1\n0 2\n", 2),
            ("0 1 2\n", 1),
            ("0 -1\n", 1),
        ] {
            match BandwidthTrace::parse(Path::new("bad"), text) {
                Err(TraceError::Parse { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            BandwidthTrace::parse(Path::new("e"), "\n"),
            Err(TraceError::Empty(_))
        ));
    }
}
