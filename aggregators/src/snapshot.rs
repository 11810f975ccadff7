//! Snapshots of the Coordinator: its bookkeeping, its scheduler's state and the position of its
//! random generator, as bytes a driver persists, so a restart starts from the latest snapshot
//! and replays only the events after it instead of every event since the run began. A
//! Coordinator built from the same configuration, restored from a snapshot taken after event `k`
//! and fed the events after `k`, makes exactly the decisions the original made (a test checks it
//! for every scheduler). The configuration is not in the snapshot: the run builds it again.

use crate::coordinator::{ClientRecord, CoordinatorStats, TaskRecord};
use chacha20::ChaCha12Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::{ClientId, ModelVersion, TaskId, Timestamp};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// A snapshot that cannot be restored.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SnapshotError {
    /// Its bytes do not decode.
    #[error("the Coordinator snapshot does not decode: {0}")]
    Decode(String),
    /// It was taken of another scheduler than the run's.
    #[error("the Coordinator snapshot is of the {saved} scheduler, the run's is {running}")]
    OtherScheduler {
        /// The snapshot's.
        saved: String,
        /// The run's.
        running: String,
    },
    /// It was written in another format.
    #[error("the Coordinator snapshot has format {0}, this build reads {FORMAT}")]
    Format(u32),
}

/// The snapshot format this build writes and reads.
const FORMAT: u32 = 1;

/// Encodes a piece of state (our own types always serialise).
pub(crate) fn encode_state<T: Serialize + ?Sized>(state: &T) -> Vec<u8> {
    postcard::to_stdvec(state).unwrap_or_default()
}

/// Decodes what [`encode_state`] wrote.
pub(crate) fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))
}

/// Where a ChaCha12 generator is: its key, stream and word position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedRng {
    seed: [u8; 32],
    stream: u64,
    word_pos: u128,
}

impl SavedRng {
    pub(crate) fn save(rng: &ChaCha12Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    pub(crate) fn restore(&self) -> ChaCha12Rng {
        let mut rng = <ChaCha12Rng as rand::SeedableRng>::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// The Coordinator's bookkeeping as saved (its configuration apart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CoreState {
    pub(crate) now: Timestamp,
    pub(crate) version: ModelVersion,
    pub(crate) clients: BTreeMap<ClientId, ClientRecord>,
    /// The idle set's members, in its order (sampling depends on it).
    pub(crate) idle: Vec<ClientId>,
    pub(crate) total_samples: u64,
    pub(crate) running: BTreeMap<TaskId, TaskRecord>,
    pub(crate) held: BTreeMap<TaskId, TaskRecord>,
    pub(crate) next_task: u64,
    pub(crate) pending_folds: usize,
    pub(crate) timers: BTreeSet<Timestamp>,
    pub(crate) rng: SavedRng,
    pub(crate) stats: CoordinatorStats,
    pub(crate) population: BTreeMap<ClientId, u64>,
    pub(crate) population_at_last_aggregate: usize,
}

/// A whole snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub(crate) format: u32,
    pub(crate) scheduler: String,
    pub(crate) core: CoreState,
    pub(crate) scheduler_state: Vec<u8>,
}

impl Snapshot {
    pub(crate) fn new(scheduler: &str, core: CoreState, scheduler_state: Vec<u8>) -> Self {
        Self {
            format: FORMAT,
            scheduler: scheduler.to_string(),
            core,
            scheduler_state,
        }
    }

    pub(crate) fn decode(bytes: &[u8], running: &str) -> Result<Self, SnapshotError> {
        let snapshot: Snapshot = decode_state(bytes)?;
        if snapshot.format != FORMAT {
            return Err(SnapshotError::Format(snapshot.format));
        }
        if snapshot.scheduler != running {
            return Err(SnapshotError::OtherScheduler {
                saved: snapshot.scheduler,
                running: running.to_string(),
            });
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_generator_is_rands_std_generator_and_resumes_where_it_was_saved() {
        let mut std = rand::rngs::StdRng::seed_from_u64(42);
        let mut chacha = ChaCha12Rng::seed_from_u64(42);
        // The same stream as the StdRng the Coordinator drew from before (results stay the same).
        for _ in 0..1000 {
            assert_eq!(std.next_u64(), chacha.next_u64());
        }
        // Saved at an odd word position, restored, it goes on with the same words.
        let _ = chacha.next_u32();
        let saved = SavedRng::save(&chacha);
        let saved = decode_state::<SavedRng>(&encode_state(&saved)).unwrap();
        let mut restored = saved.restore();
        for _ in 0..1000 {
            assert_eq!(chacha.next_u64(), restored.next_u64());
        }
    }
}
