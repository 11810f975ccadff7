//! The durable state of a run, under `DIR/state/`.
//!
//! - Tensors live in files written atomically ([`crate::files`]): `versions/v00000012.bin` (the
//!   server state of a committed version) and `updates/t000000000000002a.bin` (an acknowledged,
//!   not yet aggregated update, as it came off the wire).
//! - sled holds everything else: the index of those files with their hashes, the stable id of
//!   every client name, the committed version, and the **event log** — every event the
//!   Coordinator was fed, with its time. The Coordinator is deterministic in its seed, so replaying
//!   the log rebuilds its exact state (scheduler, rounds, running tasks) after a restart.
//!
//! Invariants that make `kill -9` safe at any instant:
//! - an update is acknowledged only after its file, its index entry and its arrival event are
//!   durable (one sled transaction, then a flush);
//! - a version is committed by one transaction that records it, advances the committed version and
//!   removes the index entries of the updates folded into it — so on replay an update with an
//!   entry is folded again, one without is already in a committed version, and none is lost or
//!   counted twice.

use crate::files::{self, FileError};
use serde::{Deserialize, Serialize};
use shoal_aggregators::{Event, ServerState};
use shoal_core::{ClientId, ModelVersion, TaskId, Timestamp, UpdateMeta};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// How long [`Store::open`] waits for a state directory another process just let go of.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors of the durable state.
#[derive(Debug, Error)]
pub enum StoreError {
    /// sled failed.
    #[error("state index: {0}")]
    Sled(#[from] sled::Error),
    /// A durable file failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A record did not decode.
    #[error("state index: damaged record in `{tree}`: {reason}")]
    Record {
        /// Which tree.
        tree: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The directory holds a run of another configuration.
    #[error(
        "{dir} holds a run of another configuration (algorithm, model, codec or seed changed); \
         restore the configuration or start a new data directory"
    )]
    OtherRun {
        /// The state directory.
        dir: String,
    },
    /// The index is empty, but the directory holds a run: the index was lost or damaged.
    #[error(
        "{dir}: the state index is empty but the run is there ({evidence}), so the index \
         (state/index) was lost or damaged; fl-server will not start a new run over it — restore \
         state/index from a backup, or move state/ aside to start a new run"
    )]
    IndexLost {
        /// The state directory.
        dir: String,
        /// What shows the run: its files, its commit record.
        evidence: String,
    },
    /// The index says an older version is committed than the files or the commit record show: it
    /// rolled back.
    #[error(
        "{dir}: the state index says version {index} is the last committed, but {evidence}, so the \
         index lost commits (damaged or restored from an old copy); fl-server will not serve an \
         older run state than its clients have seen — restore a current state/index, or move \
         state/ aside to start a new run"
    )]
    IndexBehind {
        /// The state directory.
        dir: String,
        /// The last version the index holds (0 when it holds none).
        index: u64,
        /// The newer version the directory shows.
        newer: u64,
        /// What shows it.
        evidence: String,
    },
    /// The index and the commit record outside it disagree on the committed version itself.
    #[error(
        "{dir}: the state index and state/committed.json disagree ({reason}); one of them is \
         damaged or was copied from another run — `fl-server check DIR` verifies every file; \
         restore state/ from a backup"
    )]
    IndexMismatch {
        /// The state directory.
        dir: String,
        /// How they disagree.
        reason: String,
    },
    /// The latest version's file is damaged and the version cannot be made again.
    #[error(
        "{dir}: the state of {version} is damaged ({damage}) and cannot be made again: {missing}; \
         `fl-server check DIR` lists what is damaged — restore state/ from a backup"
    )]
    Unrecoverable {
        /// The state directory.
        dir: String,
        /// The damaged version.
        version: ModelVersion,
        /// What is wrong with its file.
        damage: String,
        /// What a rebuild would need that is not there.
        missing: String,
    },
    /// Another process holds the state directory.
    #[error("{dir} is in use by another process (an fl-server running on this data directory?)")]
    Locked {
        /// The state directory.
        dir: String,
    },
    /// A directory could not be created.
    #[error("creating {path}: {source}")]
    Create {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Kept updates could not be written or read.
    #[error("kept updates at {path}: {reason}")]
    Kept {
        /// The file or directory.
        path: String,
        /// Why.
        reason: String,
    },
}

/// An event as logged (the Coordinator's [`Event`], in a serialisable form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum LoggedEvent {
    Joined {
        client: ClientId,
        num_samples: u64,
    },
    Left {
        client: ClientId,
    },
    UpdateArrived(UpdateMeta),
    TaskFailed {
        task: TaskId,
    },
    Timer,
    /// An update accepted with the bytes its client sent (logs before this variant hold
    /// `UpdateArrived` alone; new variants go last, so old logs still decode).
    Accepted {
        meta: UpdateMeta,
        wire_bytes: u64,
    },
}

impl From<&Event> for LoggedEvent {
    fn from(e: &Event) -> Self {
        match e {
            Event::Joined { client, num_samples } => LoggedEvent::Joined {
                client: *client,
                num_samples: *num_samples,
            },
            Event::Left { client } => LoggedEvent::Left { client: *client },
            Event::UpdateArrived(meta) => LoggedEvent::UpdateArrived(meta.clone()),
            Event::TaskFailed { task } => LoggedEvent::TaskFailed { task: *task },
            Event::Timer => LoggedEvent::Timer,
        }
    }
}

impl From<LoggedEvent> for Event {
    fn from(e: LoggedEvent) -> Self {
        match e {
            LoggedEvent::Joined { client, num_samples } => Event::Joined { client, num_samples },
            LoggedEvent::Left { client } => Event::Left { client },
            LoggedEvent::UpdateArrived(meta) => Event::UpdateArrived(meta),
            LoggedEvent::TaskFailed { task } => Event::TaskFailed { task },
            LoggedEvent::Timer => Event::Timer,
            LoggedEvent::Accepted { meta, .. } => Event::UpdateArrived(meta),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LogEntry {
    at: Timestamp,
    event: LoggedEvent,
}

/// An acknowledged update waiting to be aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingUpdate {
    /// Its metadata.
    pub meta: UpdateMeta,
    /// Bytes of each encoded part, in order.
    pub part_bytes: Vec<u64>,
    /// Hash of the file.
    pub hash: u64,
}

/// An update folded into the latest committed version, kept (its file and its index entry) until
/// the next commit, so that version can be made again if its state file is damaged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RetainedUpdate {
    /// The version it was folded into.
    version: u64,
    /// Its entry as it was pending.
    pending: PendingUpdate,
}

/// One update kept under `folded/VERSION/`: its file, weight and metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptUpdate {
    /// File name in the version's directory.
    pub file: String,
    /// The weight it was folded with.
    pub weight: f64,
    /// Bytes of each encoded part.
    pub part_bytes: Vec<u64>,
    /// Hash of the file.
    pub hash: u64,
    /// Its metadata.
    pub meta: UpdateMeta,
}

/// What the index says about a committed version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version.
    pub version: ModelVersion,
    /// Run time at which it was committed.
    pub at: Timestamp,
    /// Hash of its state file.
    pub hash: u64,
    /// The updates folded into it.
    pub tasks: Vec<TaskId>,
}

const COMMITTED: &[u8] = b"committed_version";
const FINGERPRINT: &[u8] = b"fingerprint";
const NEXT_CLIENT: &[u8] = b"next_client";
const RUN_ID: &[u8] = b"run_id";
const FINISHED: &[u8] = b"finished";

mod integrity;
mod snapshot;
pub use integrity::{CommitRecord, Finding, StoreReport, Undone};
pub use snapshot::{RunSnapshot, task_ranges, tasks_in};

fn key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn decode<T: serde::de::DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Record {
        tree,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own records always serialise; an empty value would fail to decode and be reported.
    postcard::to_stdvec(value).unwrap_or_default()
}

fn u64_value(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

/// The durable state of one run.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    events: sled::Tree,
    clients: sled::Tree,
    updates: sled::Tree,
    /// Updates folded into the latest committed version (see [`RetainedUpdate`]).
    retained: sled::Tree,
    versions: sled::Tree,
    next_event: u64,
}

impl Store {
    /// Opens (or creates) the state under `dir` for a run whose configuration hashes to
    /// `fingerprint`; refuses a directory holding another run.
    pub fn open(dir: &Path, fingerprint: u64) -> Result<Self, StoreError> {
        for sub in ["versions", "updates", "incoming"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| StoreError::Create {
                path: path.display().to_string(),
                source,
            })?;
        }
        let db = Self::open_index(dir)?;
        let meta = db.open_tree("meta")?;
        let versions = db.open_tree("versions")?;
        integrity::check_index(dir, &meta, &versions)?;
        match meta.get(FINGERPRINT)?.as_deref().and_then(u64_value) {
            Some(existing) if existing != fingerprint => {
                return Err(StoreError::OtherRun {
                    dir: dir.display().to_string(),
                });
            }
            Some(_) => {}
            None => {
                meta.insert(FINGERPRINT, &key(fingerprint))?;
            }
        }
        if meta.get(RUN_ID)?.is_none() {
            // Tells this run from another with the same configuration (a device keys its saved
            // state by it): the fingerprint mixed with the instant the run was created.
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let id = shoal_core::durable::content_hash(&[
                &fingerprint.to_le_bytes(),
                &created.to_le_bytes(),
                &std::process::id().to_le_bytes(),
            ]);
            meta.insert(RUN_ID, &key(id))?;
            db.flush()?;
        }
        let events = db.open_tree("events")?;
        let next_event = match events.last()? {
            Some((k, _)) => u64_value(&k).map_or(0, |n| n + 1),
            None => 0,
        };
        let mut store = Self {
            dir: dir.to_path_buf(),
            clients: db.open_tree("clients")?,
            updates: db.open_tree("updates")?,
            retained: db.open_tree("retained")?,
            versions,
            meta,
            events,
            db,
            next_event,
        };
        // Events below a snapshot's end may be compacted away: new ones are numbered past it.
        store.next_event = store.next_event.max(store.snapshot_ends());
        // A directory from before the commit record, or one stopped before its rewrite: write it.
        if let Some(latest) = store.committed_version()?
            && CommitRecord::read(dir)?.is_none_or(|r| r.version < latest.0)
        {
            store.write_commit_record(latest)?;
        }
        Ok(store)
    }

    fn write_commit_record(&self, version: ModelVersion) -> Result<(), StoreError> {
        let hash = self.version_record(version)?.map_or(0, |r| r.hash);
        CommitRecord {
            run_id: self.run_id()?,
            version: version.0,
            hash,
        }
        .write(&self.dir)
    }

    /// Opens the sled index under `dir`. The lock of a process that just closed it can outlive
    /// its handle for a moment (sled's flusher thread lets go of the file last), so a held lock
    /// is retried for up to [`LOCK_WAIT`] before the directory is reported in use.
    fn open_index(dir: &Path) -> Result<sled::Db, StoreError> {
        let config = sled::Config::new()
            .path(dir.join("index"))
            .flush_every_ms(Some(200));
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match config.open() {
                Ok(db) => return Ok(db),
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            dir: dir.display().to_string(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The run's id: chosen when the state directory was created, the same across restarts.
    pub fn run_id(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get(RUN_ID)?.as_deref().and_then(u64_value).unwrap_or(0))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The latest committed version, if any.
    pub fn committed_version(&self) -> Result<Option<ModelVersion>, StoreError> {
        Ok(self
            .meta
            .get(COMMITTED)?
            .as_deref()
            .and_then(u64_value)
            .map(ModelVersion))
    }

    fn version_path(&self, version: ModelVersion) -> PathBuf {
        self.dir.join("versions").join(format!("v{:08}.bin", version.0))
    }

    /// Where an acknowledged update's payload file lives.
    pub fn update_path(dir: &Path, task: TaskId) -> PathBuf {
        dir.join("updates").join(format!("t{:016x}.bin", task.0))
    }

    /// Where a connection writes a payload it received (`upload` is unique per transfer) before
    /// the run decides on it; accepted files are moved under `updates/`.
    pub fn incoming_path(dir: &Path, upload: u64) -> PathBuf {
        dir.join("incoming").join(format!("u{upload:016x}.bin"))
    }

    /// The record of a committed version.
    pub fn version_record(&self, version: ModelVersion) -> Result<Option<VersionRecord>, StoreError> {
        self.versions
            .get(key(version.0))?
            .map(|v| decode("versions", &v))
            .transpose()
    }

    /// Every committed version's record, oldest first.
    pub fn version_records(&self) -> Result<Vec<VersionRecord>, StoreError> {
        self.versions
            .iter()
            .map(|kv| decode("versions", &kv?.1))
            .collect()
    }

    /// The server state of a committed version, checked against its hash.
    pub fn load_version(&self, version: ModelVersion) -> Result<ServerState, StoreError> {
        let record = self.version_record(version)?.ok_or_else(|| StoreError::Record {
            tree: "versions",
            reason: format!("{version} is not recorded"),
        })?;
        let path = self.version_path(version);
        let bytes = files::read_checked(&path, record.hash)?;
        Ok(files::decode_state(&bytes, &path)?)
    }

    /// Writes the state of `version` and commits it: the version is recorded, becomes the
    /// committed one, and the updates folded into it leave the index — atomically; then the
    /// commit record outside the index is rewritten. The updates folded into `version` are
    /// retained (index entry and file) until the next commit, those of the version before are
    /// deleted: a damaged `version` file can be made again from the version before.
    pub fn commit_version(
        &self,
        version: ModelVersion,
        state: &ServerState,
        at: Timestamp,
        tasks: Vec<TaskId>,
    ) -> Result<(), StoreError> {
        let bytes = files::encode_state(state);
        let path = self.version_path(version);
        files::write_atomic(&path, &[&bytes])?;
        let record = VersionRecord {
            version,
            at,
            hash: files::content_hash(&[&bytes]),
            tasks,
        };
        let value = encode(&record);
        let mut retain = Vec::with_capacity(record.tasks.len());
        for task in &record.tasks {
            if let Some(pending) = self.pending_update(*task)? {
                let kept = RetainedUpdate {
                    version: version.0,
                    pending,
                };
                retain.push((key(task.0), encode(&kept)));
            }
        }
        let mut superseded = Vec::new();
        for kv in self.retained.iter() {
            let (_, value) = kv?;
            let kept: RetainedUpdate = decode("retained", &value)?;
            if kept.version < version.0 {
                superseded.push(kept.pending.meta.task);
            }
        }
        (&self.meta, &self.versions, &self.updates, &self.retained)
            .transaction(|(meta, versions, updates, retained)| {
                versions.insert(&key(version.0), value.as_slice())?;
                meta.insert(COMMITTED, &key(version.0))?;
                for task in &record.tasks {
                    updates.remove(&key(task.0))?;
                }
                for (task, kept) in &retain {
                    retained.insert(task, kept.as_slice())?;
                }
                for task in &superseded {
                    retained.remove(&key(task.0))?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        self.db.flush()?;
        self.write_commit_record(version)?;
        for task in &superseded {
            // Best effort: a file left behind is swept at the next start.
            let _ = std::fs::remove_file(Self::update_path(&self.dir, *task));
        }
        Ok(())
    }

    /// Keeps the update files of `folded` (hard links, before the commit removes them) under
    /// `folded/VERSION/`, with an index of their metadata and weights, for `fl-server audit`.
    pub fn keep_folded(&self, version: ModelVersion, folded: &[(TaskId, f64)]) -> Result<(), StoreError> {
        let dir = self.folded_dir(version);
        let kept_error = |path: &Path, e: &dyn std::fmt::Display| StoreError::Kept {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(|e| kept_error(&dir, &e))?;
        let mut index = Vec::with_capacity(folded.len());
        for &(task, weight) in folded {
            let Some(pending) = self.pending_update(task)? else {
                continue;
            };
            let file = format!("{task}.upd");
            let kept = dir.join(&file);
            if !kept.exists() {
                let source = Self::update_path(&self.dir, task);
                std::fs::hard_link(&source, &kept)
                    .or_else(|_| std::fs::copy(&source, &kept).map(|_| ()))
                    .map_err(|e| kept_error(&kept, &e))?;
            }
            index.push(KeptUpdate {
                file,
                weight,
                part_bytes: pending.part_bytes,
                hash: pending.hash,
                meta: pending.meta,
            });
        }
        let json = serde_json::to_vec_pretty(&index).map_err(|e| kept_error(&dir, &e))?;
        files::write_atomic(&dir.join("index.json"), &[&json])?;
        Ok(())
    }

    /// Where the kept updates of `version` are.
    pub fn folded_dir(&self, version: ModelVersion) -> PathBuf {
        self.dir.join("folded").join(version.0.to_string())
    }

    /// The kept updates of `version` (see [`Store::keep_folded`]) and their bytes, checked.
    pub fn kept_updates(&self, version: ModelVersion) -> Result<Vec<(KeptUpdate, Vec<u8>)>, StoreError> {
        let path = self.folded_dir(version).join("index.json");
        let kept_error = |e: &dyn std::fmt::Display| StoreError::Kept {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let index = std::fs::read(&path).map_err(|e| kept_error(&e))?;
        let index: Vec<KeptUpdate> = serde_json::from_slice(&index).map_err(|e| kept_error(&e))?;
        let dir = self.folded_dir(version);
        index
            .into_iter()
            .map(|kept| {
                let bytes = files::read_checked(&dir.join(&kept.file), kept.hash)?;
                Ok((kept, bytes))
            })
            .collect()
    }

    /// Deletes the state files of versions older than the newest `keep` (0 keeps all); their
    /// records stay in the index.
    pub fn prune_versions(&self, keep: usize) -> Result<(), StoreError> {
        let Some(latest) = self.committed_version()? else {
            return Ok(());
        };
        if keep == 0 || latest.0 < keep as u64 {
            return Ok(());
        }
        let oldest_kept = latest.0 + 1 - keep as u64;
        for v in oldest_kept.saturating_sub(4)..oldest_kept {
            let _ = std::fs::remove_file(self.version_path(ModelVersion(v)));
        }
        Ok(())
    }

    /// The stable id of the client called `name`, created (durably) at its first connection.
    pub fn client_id(&self, name: &str) -> Result<ClientId, StoreError> {
        if let Some(id) = self.clients.get(name.as_bytes())?.as_deref().and_then(u64_value) {
            return Ok(ClientId(id));
        }
        let next = self
            .meta
            .get(NEXT_CLIENT)?
            .as_deref()
            .and_then(u64_value)
            .unwrap_or(0);
        (&self.meta, &self.clients)
            .transaction(|(meta, clients)| {
                meta.insert(NEXT_CLIENT, &key(next + 1))?;
                clients.insert(name.as_bytes(), &key(next))?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        self.db.flush()?;
        Ok(ClientId(next))
    }

    /// Client names and ids, in id order.
    pub fn client_names(&self) -> Result<Vec<(ClientId, String)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.clients.iter() {
            let (k, v) = kv?;
            if let Some(id) = u64_value(&v) {
                out.push((ClientId(id), String::from_utf8_lossy(&k).into_owned()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Appends an event to the log (durable at the next flush; a lost suffix of non-acknowledged
    /// events is harmless — see the module documentation).
    pub fn log_event(&mut self, at: Timestamp, event: &Event) -> Result<(), StoreError> {
        let entry = LogEntry {
            at,
            event: event.into(),
        };
        self.events.insert(key(self.next_event), encode(&entry))?;
        self.next_event += 1;
        Ok(())
    }

    /// Records an acknowledged update: moves its payload file (already written and synced at
    /// `incoming`) under `updates/`, then writes the index entry and the arrival event in one
    /// transaction and makes everything durable.
    pub fn accept_update(
        &mut self,
        at: Timestamp,
        pending: &PendingUpdate,
        incoming: &Path,
        wire_bytes: u64,
    ) -> Result<(), StoreError> {
        let path = Self::update_path(&self.dir, pending.meta.task);
        std::fs::rename(incoming, &path).map_err(|source| FileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        files::sync_dir(&self.dir.join("updates"))?;
        let entry = encode(&LogEntry {
            at,
            event: LoggedEvent::Accepted {
                meta: pending.meta.clone(),
                wire_bytes,
            },
        });
        let index = encode(pending);
        let seq = key(self.next_event);
        let task = key(pending.meta.task.0);
        (&self.events, &self.updates)
            .transaction(|(events, updates)| {
                events.insert(&seq, entry.as_slice())?;
                updates.insert(&task, index.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        self.next_event += 1;
        self.db.flush()?;
        Ok(())
    }

    /// The logged events, oldest first, each with the bytes its client sent when it is an
    /// accepted update (0 otherwise, and for updates logged before the bytes were).
    pub fn events(&self) -> impl Iterator<Item = Result<(Timestamp, Event, u64), StoreError>> + '_ {
        self.events_from(0)
    }

    /// An acknowledged update not yet in a committed version.
    pub fn pending_update(&self, task: TaskId) -> Result<Option<PendingUpdate>, StoreError> {
        self.updates
            .get(key(task.0))?
            .map(|v| decode("updates", &v))
            .transpose()
    }

    /// The payload bytes of a pending update, checked against its hash.
    pub fn read_update(&self, pending: &PendingUpdate) -> Result<Vec<u8>, StoreError> {
        Ok(files::read_checked(
            &Self::update_path(&self.dir, pending.meta.task),
            pending.hash,
        )?)
    }

    /// Drops a pending update that will not be aggregated.
    pub fn discard_update(&self, task: TaskId) -> Result<(), StoreError> {
        self.updates.remove(key(task.0))?;
        let _ = std::fs::remove_file(Self::update_path(&self.dir, task));
        Ok(())
    }

    /// Removes update files that no index entry names, pending or retained (written, then not
    /// acknowledged).
    pub fn sweep_orphans(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(self.dir.join("incoming")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
                removed += 1;
            }
        }
        let dir = self.dir.join("updates");
        let entries = std::fs::read_dir(&dir).map_err(|source| StoreError::Create {
            path: dir.display().to_string(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let task = name
                .strip_prefix('t')
                .and_then(|n| n.strip_suffix(".bin"))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            let keep = match task {
                Some(t) => self.updates.contains_key(key(t))? || self.retained.contains_key(key(t))?,
                None => false,
            };
            if !keep {
                let _ = std::fs::remove_file(entry.path());
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Marks the run finished (a restart then only reports it).
    pub fn mark_finished(&self) -> Result<(), StoreError> {
        self.meta.insert(FINISHED, &[1u8])?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether the run finished.
    pub fn is_finished(&self) -> Result<bool, StoreError> {
        Ok(self.meta.contains_key(FINISHED)?)
    }

    /// Flushes everything written so far.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// A logged event with its time and, for an accepted update, the bytes its client sent.
fn log_entry(value: &[u8]) -> Result<(Timestamp, Event, u64), StoreError> {
    let entry: LogEntry = decode("events", value)?;
    let bytes = match &entry.event {
        LoggedEvent::Accepted { wire_bytes, .. } => *wire_bytes,
        _ => 0,
    };
    Ok((entry.at, entry.event.into(), bytes))
}

fn transaction_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        TransactionError::Abort(()) => StoreError::Record {
            tree: "transaction",
            reason: "aborted".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(task: u64) -> UpdateMeta {
        UpdateMeta {
            client: ClientId(1),
            task: TaskId(task),
            base_version: ModelVersion(0),
            num_samples: 10,
            local_steps: 1,
            loss: 0.5,
            duration_s: 0.1,
        }
    }

    /// Accepts an update of five bytes `task` for `task` at `at`, `wire` bytes on the wire.
    fn accept(store: &mut Store, task: u64, at: Timestamp, wire: u64) {
        let payload = vec![task as u8; 5];
        let incoming = Store::incoming_path(&store.dir, task + 100);
        files::write_atomic(&incoming, &[&payload]).unwrap();
        let pending = PendingUpdate {
            meta: meta(task),
            part_bytes: vec![5],
            hash: files::content_hash(&[&payload]),
        };
        store.accept_update(at, &pending, &incoming, wire).unwrap();
    }

    /// Commits version `v` (its state: the one value `v`) with `tasks` folded into it.
    fn commit(store: &Store, v: u64, tasks: Vec<TaskId>) {
        let state = ServerState::new(vec![v as f32]);
        store
            .commit_version(ModelVersion(v), &state, Timestamp::ZERO, tasks)
            .unwrap();
    }

    #[test]
    fn an_index_lost_or_rolled_back_is_refused_instead_of_starting_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 7).unwrap();
            for v in 0..=3 {
                commit(&store, v, Vec::new());
            }
        }
        // A version file one ahead of the index: an interrupted commit, which the replay redoes.
        let ahead = dir.path().join("versions").join("v00000004.bin");
        std::fs::copy(dir.path().join("versions").join("v00000003.bin"), &ahead).unwrap();
        drop(Store::open(dir.path(), 7).unwrap());
        // Two ahead: the index lost commits.
        std::fs::copy(&ahead, dir.path().join("versions").join("v00000005.bin")).unwrap();
        let behind = Store::open(dir.path(), 7).err().expect("refused");
        assert!(
            matches!(
                behind,
                StoreError::IndexBehind {
                    index: 3,
                    newer: 5,
                    ..
                }
            ),
            "{behind}"
        );
        // The index gone (as sled's file truncated to nothing opens): refused, files untouched.
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let lost = Store::open(dir.path(), 7).err().expect("refused");
        assert!(matches!(lost, StoreError::IndexLost { .. }), "{lost}");
        assert!(lost.to_string().contains("6 version and update files"), "{lost}");
        assert!(lost.to_string().contains("will not start a new run"), "{lost}");
        assert!(ahead.exists());
    }

    #[test]
    fn an_index_restored_from_an_older_copy_is_refused_by_the_commit_record() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("index");
        let copy = dir.path().join("index-copy");
        {
            let store = Store::open(dir.path(), 7).unwrap();
            commit(&store, 0, Vec::new());
            commit(&store, 1, Vec::new());
        }
        copy_dir(&index, &copy);
        {
            let store = Store::open(dir.path(), 7).unwrap();
            commit(&store, 2, Vec::new());
            commit(&store, 3, Vec::new());
            assert_eq!(CommitRecord::read(dir.path()).unwrap().unwrap().version, 3);
        }
        // The version files of 2 and 3 gone as well: only the record shows the rollback.
        for v in [2, 3] {
            std::fs::remove_file(dir.path().join("versions").join(format!("v{v:08}.bin"))).unwrap();
        }
        std::fs::remove_dir_all(&index).unwrap();
        std::fs::rename(&copy, &index).unwrap();
        let behind = Store::open(dir.path(), 7).err().expect("refused");
        assert!(
            matches!(
                behind,
                StoreError::IndexBehind {
                    index: 1,
                    newer: 3,
                    ..
                }
            ),
            "{behind}"
        );
        assert!(
            behind.to_string().contains("committed.json records version 3"),
            "{behind}"
        );
        // The record naming the index's version with another hash: they disagree.
        let mut record = CommitRecord::read(dir.path()).unwrap().unwrap();
        record.version = 1;
        record.hash ^= 1;
        record.write(dir.path()).unwrap();
        let mismatch = Store::open(dir.path(), 7).err().expect("refused");
        assert!(matches!(mismatch, StoreError::IndexMismatch { .. }), "{mismatch}");
        // The index lost altogether, no files left beside the record: still refused.
        std::fs::remove_dir_all(&index).unwrap();
        std::fs::remove_dir_all(dir.path().join("versions")).unwrap();
        let lost = Store::open(dir.path(), 7).err().expect("refused");
        assert!(matches!(lost, StoreError::IndexLost { .. }), "{lost}");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[test]
    fn the_updates_of_the_latest_version_are_retained_until_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 7).unwrap();
        for task in [1, 2] {
            accept(&mut store, task, Timestamp::ZERO, 5);
        }
        commit(&store, 0, Vec::new());
        commit(&store, 1, vec![TaskId(1)]);
        commit(&store, 2, vec![TaskId(2)]);
        // Version 2 folded task 2: it is retained (file and entry); task 1's is gone.
        assert!(Store::update_path(dir.path(), TaskId(2)).exists());
        assert!(!Store::update_path(dir.path(), TaskId(1)).exists());
        assert!(store.pending_update(TaskId(2)).unwrap().is_none());
        assert_eq!(
            store.sweep_orphans().unwrap(),
            0,
            "a retained file is not an orphan"
        );
        let damage = StoreError::Record {
            tree: "test",
            reason: "damaged".into(),
        };
        let undone = store.undo_damaged_commit(ModelVersion(2), &damage).unwrap();
        assert_eq!((undone.previous, undone.updates), (ModelVersion(1), 1));
        assert_eq!(undone.state.x, vec![1.0]);
        assert_eq!(store.committed_version().unwrap(), Some(ModelVersion(1)));
        assert!(
            store.pending_update(TaskId(2)).unwrap().is_some(),
            "pending again"
        );
        assert_eq!(CommitRecord::read(dir.path()).unwrap().unwrap().version, 1);
        assert!(store.check().unwrap().problems().next().is_none());
        // Version 1's own updates are no longer retained: it cannot be undone in turn.
        let refused = store.undo_damaged_commit(ModelVersion(1), &damage).err().unwrap();
        assert!(matches!(refused, StoreError::Unrecoverable { .. }), "{refused}");
        assert!(refused.to_string().contains("not retained"), "{refused}");
    }

    #[test]
    fn a_directory_held_by_another_store_is_reported_in_use_and_free_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path(), 7).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        // Released while the second open waits: it opens.
        let reopened = Store::open(dir.path(), 7);
        release.join().unwrap();
        let reopened = reopened.expect("opens once the first store lets go");
        // Held for good: reported in use, by name, after the wait.
        let refused = Store::open(dir.path(), 7).err().expect("in use");
        assert!(matches!(refused, StoreError::Locked { .. }), "{refused}");
        drop(reopened);
    }

    #[test]
    fn commits_remove_folded_updates_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), 7).unwrap();
            assert_eq!(store.client_id("a").unwrap(), ClientId(0));
            assert_eq!(store.client_id("b").unwrap(), ClientId(1));
            assert_eq!(store.client_id("a").unwrap(), ClientId(0));
            store
                .log_event(
                    Timestamp::ZERO,
                    &Event::Joined {
                        client: ClientId(0),
                        num_samples: 10,
                    },
                )
                .unwrap();
            for task in [1, 2] {
                accept(&mut store, task, Timestamp::from_micros(task), 40 + task);
            }
            std::fs::write(Store::incoming_path(dir.path(), 7), b"never accepted").unwrap();
            std::fs::write(Store::update_path(dir.path(), TaskId(99)), b"orphan").unwrap();
            store
                .commit_version(
                    ModelVersion(1),
                    &ServerState::new(vec![1.0, 2.0]),
                    Timestamp::from_micros(5),
                    vec![TaskId(1)],
                )
                .unwrap();
        }
        let store = Store::open(dir.path(), 7).unwrap();
        assert_eq!(store.committed_version().unwrap(), Some(ModelVersion(1)));
        assert_eq!(store.load_version(ModelVersion(1)).unwrap().x, vec![1.0, 2.0]);
        assert!(store.pending_update(TaskId(1)).unwrap().is_none());
        let pending = store.pending_update(TaskId(2)).unwrap().unwrap();
        assert_eq!(store.read_update(&pending).unwrap(), vec![2u8; 5]);
        assert_eq!(
            store.sweep_orphans().unwrap(),
            2,
            "the orphan and the unaccepted upload"
        );
        let events: Vec<_> = store.events().collect::<Result<_, _>>().unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[2].1, Event::UpdateArrived(meta(2)));
        assert_eq!(events[2].2, 42, "the bytes its client sent");
        assert_eq!(store.client_names().unwrap().len(), 2);
        drop(store);
        assert!(matches!(
            Store::open(dir.path(), 8),
            Err(StoreError::OtherRun { .. })
        ));
    }
}
