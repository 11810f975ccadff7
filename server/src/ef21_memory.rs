//! EF21's server-side memory (`feedback = "ef21"`): every client's `h_i`, kept durably under
//! `state/ef21/`, one file per client.
//!
//! A client sends `c = C(u − h_i)`; the engine's [`shoal_engine::ef21_receive`] moves `h_i` by it,
//! and the server folds the new `h_i`. Acceptance is where the memory moves, so an update that is
//! acknowledged and then discarded (too stale, say) moves it as it moved the device's. The stored
//! update file holds the folded `h_i` itself, densely, so a replay folds it without the memory.
//!
//! Durability: before an update of task T is accepted, its client's file is rewritten with T,
//! `h_i` before and `h_i` after. On a restart a file whose task the event log accepted gives
//! "after", any other "before" — so a crash between the file and the acceptance leaves the memory
//! as the device, which never got the acknowledgement and resends T, expects it.

use crate::files::FileError;
use serde::{Deserialize, Serialize};
use shoal_core::durable::{self, FramedError};
use shoal_core::{ClientId, TaskId};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"SHEF";
const FORMAT: u32 = 1;

/// One client's file.
#[derive(Debug, Serialize, Deserialize)]
struct MemoryFile {
    task: TaskId,
    before: Vec<Vec<f32>>,
    after: Vec<Vec<f32>>,
}

/// A memory moved by an update not yet accepted (see [`Ef21Memories::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    client: ClientId,
    after: Vec<Vec<f32>>,
}

impl Prepared {
    /// What the server folds for the update: the client's new `h_i`.
    pub fn folded(&self) -> &[Vec<f32>] {
        &self.after
    }
}

/// Every client's `h_i`.
#[derive(Debug)]
pub struct Ef21Memories {
    dir: PathBuf,
    memories: HashMap<ClientId, Vec<Vec<f32>>>,
}

fn damaged(path: &Path, reason: String) -> FileError {
    FileError::Corrupt {
        path: path.display().to_string(),
        reason,
    }
}

impl Ef21Memories {
    /// The memories under `state_dir/ef21`, as of the updates in `accepted`.
    pub fn open(state_dir: &Path, accepted: &HashSet<TaskId>) -> Result<Self, FileError> {
        let dir = state_dir.join("ef21");
        std::fs::create_dir_all(&dir).map_err(|source| FileError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut memories = HashMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|source| FileError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| FileError::Io {
                    path: dir.display().to_string(),
                    source,
                })?
                .path();
            let Some(client) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("client-"))
                .and_then(|n| n.strip_suffix(".h"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let body = match durable::read_framed(&path, MAGIC, FORMAT, "an EF21 memory") {
                Ok(Some(body)) => body,
                Ok(None) => continue,
                Err(FramedError::Io(e)) => return Err(e.into()),
                Err(FramedError::Damaged { reason, .. }) => return Err(damaged(&path, reason)),
            };
            let file: MemoryFile =
                postcard::from_bytes(&body).map_err(|e| damaged(&path, format!("unreadable: {e}")))?;
            let h = if accepted.contains(&file.task) {
                file.after
            } else {
                file.before
            };
            memories.insert(ClientId(client), h);
        }
        Ok(Self { dir, memories })
    }

    fn path(&self, client: ClientId) -> PathBuf {
        self.dir.join(format!("client-{}.h", client.0))
    }

    /// Moves `client`'s memory by the message of `task` and makes the move durable, without
    /// adopting it: [`adopt`](Self::adopt) once the update is accepted.
    pub fn prepare(
        &self,
        client: ClientId,
        task: TaskId,
        message: &[Vec<f32>],
    ) -> Result<Prepared, anyhow::Error> {
        let before = self.memories.get(&client).cloned().unwrap_or_default();
        let mut after = before.clone();
        shoal_engine::ef21_receive(&mut after, message)?;
        let file = MemoryFile { task, before, after };
        let body = postcard::to_stdvec(&file)?;
        let path = self.path(client);
        durable::write_framed(&path, MAGIC, FORMAT, &body).map_err(FileError::from)?;
        Ok(Prepared {
            client,
            after: file.after,
        })
    }

    /// The update of a [`Prepared`] memory was accepted: the memory is its client's.
    pub fn adopt(&mut self, prepared: Prepared) {
        self.memories.insert(prepared.client, prepared.after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_moves_when_its_update_is_accepted_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("shoal-ef21-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (ClientId(1), ClientId(2));
        let mut accepted = HashSet::new();
        let mut memories = Ef21Memories::open(&dir, &accepted).expect("opens");
        let first = memories
            .prepare(a, TaskId(1), &[vec![1.0, 2.0]])
            .expect("prepares");
        assert_eq!(first.folded(), &[vec![1.0, 2.0]]);
        memories.adopt(first);
        accepted.insert(TaskId(1));
        let second = memories
            .prepare(a, TaskId(3), &[vec![0.5, 0.5]])
            .expect("prepares");
        assert_eq!(second.folded(), &[vec![1.5, 2.5]]);
        // Task 3 is not accepted (a crash before its acceptance): its client resends it.
        memories
            .prepare(b, TaskId(2), &[vec![-1.0, 0.0]])
            .map(|p| memories.adopt(p))
            .expect("prepares");
        accepted.insert(TaskId(2));
        let restarted = Ef21Memories::open(&dir, &accepted).expect("reopens");
        assert_eq!(restarted.memories.get(&a), Some(&vec![vec![1.0, 2.0]]));
        assert_eq!(restarted.memories.get(&b), Some(&vec![vec![-1.0, 0.0]]));
        let resent = restarted
            .prepare(a, TaskId(3), &[vec![0.5, 0.5]])
            .expect("prepares");
        assert_eq!(resent.folded(), &[vec![1.5, 2.5]]);
        accepted.insert(TaskId(3));
        let again = Ef21Memories::open(&dir, &accepted).expect("reopens");
        assert_eq!(again.memories.get(&a), Some(&vec![vec![1.5, 2.5]]));
        // A damaged file is refused by name, not taken for a fresh memory.
        let path = again.path(a);
        let mut bytes = std::fs::read(&path).expect("readable");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).expect("damaged");
        let refused = Ef21Memories::open(&dir, &accepted).expect_err("refused");
        assert!(refused.to_string().contains("client-1.h"), "{refused}");
        std::fs::remove_dir_all(&dir).expect("removed");
    }
}
