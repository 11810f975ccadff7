//! The device's state between starts of fl-client: its rule state and error-feedback memory, and
//! the update it sent last if the server has not acknowledged it yet — kept in one file per run
//! (`run-<id>.state` under the state folder, by default the identity folder), rewritten
//! atomically whenever it changes, so a restarted agent resumes where it stopped: its control
//! variates survive, and an update the server may have counted is sent again rather than lost.
//!
//! The file is `"SHDS" | format version (u32 LE) | postcard body | xxh3 of the body (u64 LE)`; a
//! damaged or foreign file is refused with its path, never taken for a fresh start.

use crate::trainer::EncodedUpdate;
use serde::{Deserialize, Serialize};
use shoal_core::durable::{self, DurableError, FramedError};
use shoal_core::{ClientId, TaskId};
use shoal_engine::DeviceState;
use std::path::{Path, PathBuf};
use thiserror::Error;

const MAGIC: &[u8; 4] = b"SHDS";
const FORMAT: u32 = 1;

/// What a device keeps across its restarts for one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// The id the server gave this device (a file of another client is refused).
    pub client: ClientId,
    /// The state of the last acknowledged update.
    pub state: DeviceState,
    /// The update sent last, not yet acknowledged (its state is the next task's).
    pub unacknowledged: Option<EncodedUpdate>,
}

/// Why the saved state cannot be used.
#[derive(Debug, Error)]
pub enum SavedStateError {
    /// The file system failed.
    #[error(transparent)]
    Io(#[from] DurableError),
    /// The file is damaged or is not a saved device state.
    #[error("{path}: {reason} (remove it to start this device over in the run)")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The saved state of one run under a state folder.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The file of run `run_id` under `dir`.
    pub fn for_run(dir: &Path, run_id: u64) -> Self {
        Self {
            path: dir.join(format!("run-{run_id:016x}.state")),
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn damaged(&self, reason: impl Into<String>) -> SavedStateError {
        SavedStateError::Damaged {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    /// The saved state, or `None` when this device has none for the run.
    pub fn load(&self) -> Result<Option<SavedDevice>, SavedStateError> {
        let body =
            durable::read_framed(&self.path, MAGIC, FORMAT, "a saved device state").map_err(|e| match e {
                FramedError::Io(e) => SavedStateError::Io(e),
                FramedError::Damaged { reason, .. } => self.damaged(reason),
            })?;
        let Some(body) = body else {
            return Ok(None);
        };
        postcard::from_bytes(&body)
            .map(Some)
            .map_err(|e| self.damaged(format!("unreadable: {e}")))
    }

    /// Replaces the saved state with `saved`, atomically and durably.
    pub fn save(&self, saved: &SavedDevice) -> Result<(), SavedStateError> {
        let body = postcard::to_stdvec(saved).map_err(|e| self.damaged(format!("encoding: {e}")))?;
        durable::write_framed(&self.path, MAGIC, FORMAT, &body)?;
        Ok(())
    }

    /// The update the most recently saved state under `dir` holds unacknowledged, if any: what a
    /// restarted device names as the task it holds in its first Hello, before the server's Welcome
    /// says which run it is (and so which file is its). A wrong guess costs nothing — the server
    /// then sends the task again — while a right one keeps the server from failing a task whose
    /// update the device is about to resend. Unreadable files are passed over: the run's own file
    /// is checked when it is loaded.
    pub fn latest_unacknowledged(dir: &Path) -> Option<TaskId> {
        let entries = std::fs::read_dir(dir).ok()?;
        let newest = entries
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("run-") && name.ends_with(".state")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max_by_key(|(modified, _)| *modified)?;
        let file = Self { path: newest.1 };
        file.load().ok()??.unacknowledged.map(|u| u.meta.task)
    }

    /// Removes the file (the run is over).
    pub fn remove(&self) -> Result<(), SavedStateError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DurableError {
                path: self.path.display().to_string(),
                source,
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_aggregators::ClientState;
    use shoal_core::{ModelVersion, UpdateMeta};

    fn saved() -> SavedDevice {
        SavedDevice {
            client: ClientId(4),
            state: DeviceState {
                rule: ClientState {
                    c: Some(vec![0.25, -1.5, 3.0]),
                    v: None,
                },
                feedback: vec![vec![0.125; 3]],
            },
            unacknowledged: Some(EncodedUpdate {
                meta: UpdateMeta {
                    client: ClientId(4),
                    task: TaskId(17),
                    base_version: ModelVersion(5),
                    num_samples: 600,
                    local_steps: 10,
                    loss: 0.5,
                    duration_s: 1.25,
                },
                parts: vec![vec![1, 2, 3, 4], vec![9; 10]],
                next_state: DeviceState::default(),
            }),
        }
    }

    #[test]
    fn a_saved_state_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let file = StateFile::for_run(dir.path(), 0xabc);
        assert!(file.load().expect("no file is fine").is_none());
        file.save(&saved()).expect("saved");
        assert_eq!(file.load().expect("loads"), Some(saved()));
        file.remove().expect("removed");
        assert!(file.load().expect("gone").is_none());
    }

    #[test]
    fn the_newest_state_names_the_task_a_restarted_device_holds() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        assert_eq!(StateFile::latest_unacknowledged(dir.path()), None);
        let mut older = saved();
        older.unacknowledged = None;
        StateFile::for_run(dir.path(), 1).save(&older).expect("saved");
        assert_eq!(StateFile::latest_unacknowledged(dir.path()), None);
        // Written later, so newer (file times can be coarse: wait them out).
        std::thread::sleep(std::time::Duration::from_millis(20));
        StateFile::for_run(dir.path(), 2).save(&saved()).expect("saved");
        assert_eq!(StateFile::latest_unacknowledged(dir.path()), Some(TaskId(17)));
        std::fs::write(dir.path().join("run-0000000000000003.state"), b"damaged").expect("written");
        assert_eq!(StateFile::latest_unacknowledged(dir.path()), None);
    }

    #[test]
    fn every_damaged_byte_is_refused_with_the_path() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let file = StateFile::for_run(dir.path(), 1);
        file.save(&saved()).expect("saved");
        let good = std::fs::read(file.path()).expect("readable");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            std::fs::write(file.path(), &bad).expect("written");
            let err = file.load().expect_err("a damaged file is refused");
            assert!(err.to_string().contains("run-0000000000000001.state"), "{err}");
        }
        for len in [0, 3, 8, good.len() - 1] {
            std::fs::write(file.path(), &good[..len]).expect("written");
            assert!(file.load().is_err(), "truncated to {len}");
        }
    }
}
