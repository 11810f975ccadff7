//! What keeps a damaged state directory from being taken for a good one: the commit record kept
//! outside sled (`state/committed.json`), the checks [`Store::open`] makes of the index against
//! that record and against the files, the undoing of a latest commit whose file is damaged (the
//! replay then makes that version again from the one before and its retained updates), and the
//! full verification `fl-server check` prints.

use super::*;

/// The last committed version as recorded outside the index, rewritten after every commit: an
/// index that lost commits, or was replaced, disagrees with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The run's id (see [`Store::run_id`]).
    pub run_id: u64,
    /// The committed version.
    pub version: u64,
    /// The hash of its state file.
    pub hash: u64,
}

const RECORD_FILE: &str = "committed.json";

impl CommitRecord {
    fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    /// The record under `dir`, if one was written.
    pub fn read(dir: &Path) -> Result<Option<Self>, StoreError> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FileError::Io {
                    path: path.display().to_string(),
                    source,
                }
                .into());
            }
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            FileError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
            .into()
        })
    }

    /// Writes the record under `dir` atomically and durably.
    pub(super) fn write(&self, dir: &Path) -> Result<(), StoreError> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        files::write_atomic(&Self::path(dir), &[&json])?;
        Ok(())
    }
}

/// The version numbers of the state files under `dir/versions/`.
fn version_files(dir: &Path) -> Vec<u64> {
    names(dir, "versions")
        .iter()
        .filter_map(|n| n.strip_prefix('v')?.strip_suffix(".bin")?.parse().ok())
        .collect()
}

fn names(dir: &Path, sub: &str) -> Vec<String> {
    std::fs::read_dir(dir.join(sub))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Refuses an index that does not account for the files and the commit record beside it: an
/// empty index over a run (it was lost), one behind the newest version file by more than one (a
/// commit interrupted between its file and its index entry is one ahead, which the replay redoes)
/// or behind the record (it rolled back), or one whose committed version the record names with
/// another hash or run.
pub(super) fn check_index(dir: &Path, meta: &sled::Tree, versions: &sled::Tree) -> Result<(), StoreError> {
    let files = version_files(dir);
    let updates = names(dir, "updates")
        .iter()
        .filter(|n| n.ends_with(".bin"))
        .count();
    let record = CommitRecord::read(dir)?;
    let shown = dir.display().to_string();
    if meta.get(FINGERPRINT)?.is_none() {
        let mut evidence = Vec::new();
        if !files.is_empty() || updates > 0 {
            evidence.push(format!("{} version and update files", files.len() + updates));
        }
        if let Some(record) = &record {
            evidence.push(format!("state/{RECORD_FILE} records version {}", record.version));
        }
        if !evidence.is_empty() {
            return Err(StoreError::IndexLost {
                dir: shown,
                evidence: evidence.join("; "),
            });
        }
        return Ok(());
    }
    let committed = meta.get(COMMITTED)?.as_deref().and_then(u64_value);
    // With nothing committed, only version 0's file may be there (its commit was interrupted).
    let allowed = committed.map_or(0, |c| c.saturating_add(1));
    if let Some(newest) = files.iter().copied().max()
        && newest > allowed
    {
        return Err(StoreError::IndexBehind {
            dir: shown,
            index: committed.unwrap_or(0),
            newer: newest,
            evidence: format!("version files up to {newest} are there"),
        });
    }
    let Some(record) = record else {
        return Ok(());
    };
    let index = committed.unwrap_or(0);
    if committed.is_none() || record.version > index {
        return Err(StoreError::IndexBehind {
            dir: shown,
            index,
            newer: record.version,
            evidence: format!("state/{RECORD_FILE} records version {} committed", record.version),
        });
    }
    let run_id = meta.get(RUN_ID)?.as_deref().and_then(u64_value);
    if run_id.is_some_and(|id| id != record.run_id) {
        return Err(StoreError::IndexMismatch {
            dir: shown,
            reason: "they belong to different runs".into(),
        });
    }
    if record.version == index {
        let indexed: Option<VersionRecord> = versions
            .get(key(index))?
            .map(|v| decode("versions", &v))
            .transpose()?;
        if indexed.is_some_and(|r| r.hash != record.hash) {
            return Err(StoreError::IndexMismatch {
                dir: shown,
                reason: format!("version {index} has another hash in each"),
            });
        }
    }
    // Older by one: the process stopped between the index's commit and the record's rewrite.
    Ok(())
}

/// A latest commit undone because its state file was damaged.
pub struct Undone {
    /// The version committed now (the one before the damaged one).
    pub previous: ModelVersion,
    /// Its state.
    pub state: ServerState,
    /// The updates folded into the damaged version, pending again.
    pub updates: usize,
}

/// One thing `fl-server check` verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Whether it is intact.
    pub ok: bool,
    /// What was verified, and what is wrong.
    pub what: String,
}

/// What `fl-server check` found in a state directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreReport {
    /// Each verification, in order.
    pub findings: Vec<Finding>,
}

impl StoreReport {
    fn push(&mut self, ok: bool, what: String) {
        self.findings.push(Finding { ok, what });
    }

    /// The findings that are not intact.
    pub fn problems(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| !f.ok)
    }
}

impl Store {
    /// Undoes the commit of `version`, the latest, whose state file is damaged (`damage`): its
    /// record leaves the index, the version before becomes the committed one, and the updates
    /// folded into `version` (retained since its commit) are pending again — so the replay of the
    /// event log folds them and commits `version` again, as it would after a stop in the middle
    /// of that commit. Nothing acknowledged is lost. Refused, saying what is missing, unless the
    /// version before is intact and every update folded into `version` is retained intact.
    pub fn undo_damaged_commit(
        &self,
        version: ModelVersion,
        damage: &StoreError,
    ) -> Result<Undone, StoreError> {
        let unrecoverable = |missing: String| StoreError::Unrecoverable {
            dir: self.dir.display().to_string(),
            version,
            damage: damage.to_string(),
            missing,
        };
        let Some(previous) = version.0.checked_sub(1).map(ModelVersion) else {
            return Err(unrecoverable("it is the first version".into()));
        };
        let state = self
            .load_version(previous)
            .map_err(|e| unrecoverable(format!("the version before, {previous}, is not intact ({e})")))?;
        let record = self
            .version_record(version)?
            .ok_or_else(|| unrecoverable(format!("{version} is not recorded")))?;
        let mut restored = Vec::with_capacity(record.tasks.len());
        for task in &record.tasks {
            let retained = self
                .retained
                .get(key(task.0))?
                .map(|v| decode::<RetainedUpdate>("retained", &v))
                .transpose()?
                .filter(|r| r.version == version.0)
                .ok_or_else(|| {
                    unrecoverable(format!("the update of {task} folded into it is not retained"))
                })?;
            self.read_update(&retained.pending)
                .map_err(|e| unrecoverable(format!("the retained update of {task} is damaged ({e})")))?;
            restored.push((key(task.0), encode(&retained.pending)));
        }
        (&self.meta, &self.versions, &self.updates, &self.retained)
            .transaction(|(meta, versions, updates, retained)| {
                versions.remove(&key(version.0))?;
                meta.insert(COMMITTED, &key(previous.0))?;
                for (task, pending) in &restored {
                    retained.remove(task)?;
                    updates.insert(task, pending.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        self.db.flush()?;
        let path = self.version_path(version);
        let aside = path.with_extension("bin.damaged");
        let _ = std::fs::rename(&path, aside);
        let hash = self.version_record(previous)?.map_or(0, |r| r.hash);
        CommitRecord {
            run_id: self.run_id()?,
            version: previous.0,
            hash,
        }
        .write(&self.dir)?;
        Ok(Undone {
            previous,
            state,
            updates: restored.len(),
        })
    }

    /// Verifies every file the index names (versions, pending and retained updates) against its
    /// hash, the commit record against the index, and that every logged event decodes.
    pub fn check(&self) -> Result<StoreReport, StoreError> {
        let mut report = StoreReport::default();
        let committed = self.committed_version()?;
        match (CommitRecord::read(&self.dir), committed) {
            (Ok(Some(r)), Some(c)) => report.push(
                r.version + 1 >= c.0,
                format!("state/{RECORD_FILE} records version {}, the index {c}", r.version),
            ),
            (Ok(None), Some(c)) => {
                report.push(true, format!("the index: {c} committed (no commit record yet)"))
            }
            (Ok(_), None) => report.push(true, "nothing committed yet".into()),
            (Err(e), _) => report.push(false, format!("state/{RECORD_FILE}: {e}")),
        }
        for record in self.version_records()? {
            let path = self.version_path(record.version);
            let latest = Some(record.version) == committed;
            if !path.exists() && !latest {
                continue; // pruned
            }
            match self.load_version(record.version) {
                Ok(state) => report.push(
                    true,
                    format!("{}: intact ({} parameters)", record.version, state.x.len()),
                ),
                Err(e) => {
                    let mut what = format!("{}: {e}", record.version);
                    if latest {
                        what.push_str(&self.rebuild_prospect(record.version));
                    }
                    report.push(false, what);
                }
            }
        }
        for kv in self.updates.iter() {
            let pending: PendingUpdate = decode("updates", &kv?.1)?;
            let task = pending.meta.task;
            match self.read_update(&pending) {
                Ok(_) => report.push(true, format!("pending update of {task}: intact")),
                Err(e) => report.push(
                    false,
                    format!(
                        "pending update of {task} ({}): {e} — `fl-server drop-update DIR --task {}` drops it",
                        pending.meta.client, task.0
                    ),
                ),
            }
        }
        let mut retained = 0;
        for kv in self.retained.iter() {
            let kept: RetainedUpdate = decode("retained", &kv?.1)?;
            match self.read_update(&kept.pending) {
                Ok(_) => retained += 1,
                Err(e) => report.push(
                    false,
                    format!(
                        "retained update of {} (folded into version {}): {e}",
                        kept.pending.meta.task, kept.version
                    ),
                ),
            }
        }
        report.push(true, format!("{retained} retained updates intact"));
        let from = match self.snapshot(committed.unwrap_or(ModelVersion(0))) {
            Ok(Some(snapshot)) => {
                report.push(
                    true,
                    format!(
                        "Coordinator snapshot at {} through event {}",
                        snapshot.version, snapshot.through
                    ),
                );
                snapshot.through
            }
            Ok(None) => 0,
            Err(e) => {
                report.push(false, e.to_string());
                0
            }
        };
        let mut events = 0u64;
        for event in self.events_from(from) {
            match event {
                Ok(_) => events += 1,
                Err(e) => {
                    report.push(false, format!("event {events} of the log: {e}"));
                    break;
                }
            }
        }
        report.push(true, format!("{events} logged events to replay decode"));
        Ok(report)
    }

    /// Whether the damaged latest `version` can be made again at the next start.
    fn rebuild_prospect(&self, version: ModelVersion) -> String {
        let Some(previous) = version.0.checked_sub(1).map(ModelVersion) else {
            return " — the next start makes it again from the seed".into();
        };
        let tasks = self
            .version_record(version)
            .ok()
            .flatten()
            .map(|r| r.tasks)
            .unwrap_or_default();
        let retained = tasks
            .iter()
            .filter(|t| self.retained.contains_key(key(t.0)).unwrap_or(false))
            .count();
        if self.load_version(previous).is_ok() && retained == tasks.len() {
            format!(" — the next start makes it again from {previous} and its {retained} retained updates")
        } else {
            format!(
                " — it cannot be made again ({previous} intact: {}, {retained} of {} updates retained)",
                self.load_version(previous).is_ok(),
                tasks.len()
            )
        }
    }
}
