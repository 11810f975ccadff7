//! Snapshots of the run's replayable state — the Coordinator's snapshot and what the run counts
//! from the log (the accepted tasks, the bytes sent) — and the compaction of the event log they
//! allow: a start restores the newest intact snapshot and replays only the events after it, so a
//! restart costs the same after 10 rounds and after 10 000. Two snapshots are kept
//! (`state/snapshot.bin` and the one before, `state/snapshot.prev.bin`), and the log keeps every
//! event after the older one, so a damaged newest snapshot falls back to the one before.

use super::*;
use shoal_core::durable::{FramedError, read_framed, write_framed};

const MAGIC: &[u8; 4] = b"SHSN";
const FORMAT: u32 = 1;
const NEWEST: &str = "snapshot.bin";
const PREVIOUS: &str = "snapshot.prev.bin";

/// What a start needs to continue from a point of the event log without replaying what came
/// before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    /// Events with a lower sequence number are in it; the replay starts at this one.
    pub through: u64,
    /// The time of the last event in it.
    pub at: Timestamp,
    /// The Coordinator's version when it was taken (a start whose committed version is older —
    /// its latest commit was undone — takes an older snapshot).
    pub version: ModelVersion,
    /// The Coordinator's snapshot.
    pub coordinator: Vec<u8>,
    /// The tasks whose updates were accepted, as half-open ranges of ids.
    pub accepted: Vec<(u64, u64)>,
    /// Bytes clients sent in accepted updates.
    pub bytes_up: u64,
    /// Bytes of models sent to clients.
    pub bytes_down: u64,
}

/// `tasks` as sorted, half-open ranges of ids.
pub fn task_ranges(tasks: &std::collections::HashSet<TaskId>) -> Vec<(u64, u64)> {
    let mut ids: Vec<u64> = tasks.iter().map(|t| t.0).collect();
    ids.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some((_, end)) if *end == id => *end = id + 1,
            _ => ranges.push((id, id + 1)),
        }
    }
    ranges
}

/// The task ids of [`task_ranges`].
pub fn tasks_in(ranges: &[(u64, u64)]) -> impl Iterator<Item = TaskId> + '_ {
    ranges.iter().flat_map(|&(start, end)| (start..end).map(TaskId))
}

fn damaged(e: FramedError) -> StoreError {
    match e {
        FramedError::Io(e) => FileError::from(e).into(),
        FramedError::Damaged { path, reason } => FileError::Corrupt { path, reason }.into(),
    }
}

impl Store {
    /// The sequence number the next logged event gets.
    pub fn next_event(&self) -> u64 {
        self.next_event
    }

    /// The furthest event any snapshot file covers (0 without one).
    pub(super) fn snapshot_ends(&self) -> u64 {
        [NEWEST, PREVIOUS]
            .iter()
            .filter_map(|name| self.read_snapshot(name).ok().flatten())
            .map(|s| s.through)
            .max()
            .unwrap_or(0)
    }

    fn read_snapshot(&self, name: &str) -> Result<Option<RunSnapshot>, StoreError> {
        let path = self.dir.join(name);
        match read_framed(&path, MAGIC, FORMAT, "a run snapshot").map_err(damaged)? {
            Some(body) => decode("snapshot", &body).map(Some),
            None => Ok(None),
        }
    }

    /// The newest intact snapshot taken at `committed` or before whose events after it are all in
    /// the log; `None` when there is none and the log starts at its first event (replay it
    /// whole). A damaged newest snapshot falls back to the one before, with a warning.
    pub fn snapshot(&self, committed: ModelVersion) -> Result<Option<RunSnapshot>, StoreError> {
        let first = match self.events.first()? {
            Some((k, _)) => u64_value(&k).unwrap_or(0),
            None => self.next_event,
        };
        let mut refusals = Vec::new();
        for name in [NEWEST, PREVIOUS] {
            match self.read_snapshot(name) {
                Ok(Some(snapshot)) if snapshot.version > committed => refusals.push(format!(
                    "state/{name} was taken at {}, after the committed {committed}",
                    snapshot.version
                )),
                Ok(Some(snapshot)) if snapshot.through >= first => return Ok(Some(snapshot)),
                Ok(Some(snapshot)) => refusals.push(format!(
                    "state/{name} ends at event {} but the log starts at {first}",
                    snapshot.through
                )),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "a run snapshot is damaged; trying the one before");
                    refusals.push(e.to_string());
                }
            }
        }
        if first == 0 {
            return Ok(None);
        }
        Err(StoreError::Record {
            tree: "events",
            reason: format!(
                "the event log starts at event {first} and no intact snapshot covers the events before \
                 it ({}); restore state/ from a backup",
                if refusals.is_empty() {
                    "there is none".to_string()
                } else {
                    refusals.join("; ")
                }
            ),
        })
    }

    /// Makes the log durable, writes `snapshot` (which covers the events below
    /// `snapshot.through`) as the newest, keeps the one it replaces as the previous, and drops
    /// the events the previous one covers.
    pub fn save_snapshot(&mut self, snapshot: &RunSnapshot) -> Result<(), StoreError> {
        self.db.flush()?;
        let newest = self.dir.join(NEWEST);
        let previous = self.dir.join(PREVIOUS);
        let kept = match self.read_snapshot(NEWEST) {
            Ok(Some(old)) => {
                std::fs::rename(&newest, &previous).map_err(|source| FileError::Io {
                    path: previous.display().to_string(),
                    source,
                })?;
                Some(old.through)
            }
            // No newest, or a damaged one: the previous stays as it is.
            Ok(None) | Err(_) => self.read_snapshot(PREVIOUS).ok().flatten().map(|s| s.through),
        };
        write_framed(&newest, MAGIC, FORMAT, &encode(snapshot)).map_err(FileError::from)?;
        if let Some(through) = kept {
            let mut batch = sled::Batch::default();
            for kv in self.events.range(..key(through)) {
                batch.remove(kv?.0);
            }
            self.events.apply_batch(batch)?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// The logged events from sequence number `from` on, oldest first, as [`Store::events`].
    pub fn events_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<(Timestamp, Event, u64), StoreError>> + '_ {
        self.events.range(key(from)..).map(|kv| {
            let (_, v) = kv?;
            log_entry(&v)
        })
    }

    /// Events in the log now.
    pub fn logged_events(&self) -> usize {
        self.events.len()
    }
}
