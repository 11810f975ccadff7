//! A leaf of a federation, as its run sees it: the partial aggregate of each round owed to the
//! top, the top's tasks and models, and when the leaf must hold its own tasks back.

use super::*;

/// A partial aggregate a leaf owes the top: the sums of its round on the top's version `base`.
#[derive(Debug, Clone)]
pub struct OwedPartial {
    /// The top's version the round trained from.
    pub base: ModelVersion,
    /// The encoded partial aggregate.
    pub bytes: Arc<Vec<u8>>,
    /// Samples of the clients folded into it.
    pub num_samples: u64,
    /// Their mean training loss.
    pub loss: f32,
}

/// A leaf's upload to the top: the partial of `owed` as the update of the top's `task`.
#[derive(Debug, Clone)]
pub struct LeafUpload {
    /// The top's task.
    pub task: TaskId,
    /// What is sent.
    pub owed: OwedPartial,
}

/// Where a leaf stands with its top.
#[derive(Debug, Default)]
pub(super) struct LeafLink {
    /// The top's task for the version this leaf is on.
    top_task: Option<(TaskId, ModelVersion)>,
    /// The version whose model the leaf waits for from the top (its round is aggregated).
    awaiting: Option<ModelVersion>,
    /// The partial of the aggregated round, kept until the top's next version arrives.
    owed: Option<OwedPartial>,
    /// Uploads for the daemon to send.
    uploads: Vec<LeafUpload>,
    /// Losses reported with the updates of the round in progress.
    losses: Vec<f32>,
}

impl LeafLink {
    /// Counts the loss a client reported with an update of the round in progress.
    pub(super) fn report_loss(&mut self, loss: f32) {
        self.losses.push(loss);
    }
}

impl Run {
    /// A leaf's round is aggregated: its partial is owed to the top, and the leaf waits for the
    /// top's `version` before it commits anything or sends another task.
    pub(super) fn owe_partial(&mut self, version: ModelVersion, merged: &Accumulator) -> Result<()> {
        let sums: Vec<&[f64]> = (0..merged.parts()).map(|p| merged.sum(p)).collect();
        let bytes = shoal_compression::partial::encode_partial(
            &sums,
            merged.total_weight(),
            merged.count(),
            &self.layout(),
        )
        .context("encoding the partial aggregate")?;
        let Some(leaf) = self.leaf.as_mut() else {
            return Ok(());
        };
        let losses = std::mem::take(&mut leaf.losses);
        let owed = OwedPartial {
            base: self.committed,
            bytes: Arc::new(bytes),
            num_samples: merged.total_weight().round() as u64,
            loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
        };
        tracing::info!(
            base = %owed.base,
            updates = merged.count(),
            bytes = owed.bytes.len(),
            "round aggregated: partial owed to the top"
        );
        if let Some((task, base)) = leaf.top_task.take()
            && base == owed.base
        {
            leaf.uploads.push(LeafUpload {
                task,
                owed: owed.clone(),
            });
        }
        leaf.owed = Some(owed);
        leaf.awaiting = Some(version);
        Ok(())
    }

    /// A leaf: the top gave this leaf `task` on its `version`, whose model is `x`. The first task
    /// aligns the leaf with the top; a task on the version the leaf waits for commits the top's
    /// model as that version; a task on the version of the owed partial (after a reconnection or a
    /// restart) sends the partial again.
    pub fn top_task(&mut self, task: TaskId, version: ModelVersion, x: Vec<f32>) -> Result<()> {
        if x.len() != self.layout().len() {
            bail!(
                "the top's model has {} parameters, this leaf's {}",
                x.len(),
                self.layout().len()
            );
        }
        let committed = self.committed;
        let Some(leaf) = self.leaf.as_mut() else {
            bail!("a top task for a server that is not a leaf");
        };
        if let Some(owed) = leaf.owed.clone().filter(|o| o.base == version) {
            tracing::info!(%task, %version, "the top asks for the owed partial");
            leaf.uploads.push(LeafUpload { task, owed });
            return Ok(());
        }
        match leaf.awaiting {
            Some(awaiting) if awaiting == version => {
                leaf.awaiting = None;
                leaf.owed = None;
                leaf.top_task = Some((task, version));
                let updates = self.last_round_updates;
                self.core.set_model(x);
                self.commit(version, updates)
            }
            None if version == committed => {
                leaf.top_task = Some((task, version));
                if self.core.state().x != x {
                    tracing::info!(%version, "adopting the top's model");
                    self.core.set_model(x);
                    let head = self.split.as_ref().map(|s| s.head_dim());
                    self.broadcast = SharedBroadcast::new(version, &self.core.broadcast(), head);
                }
                Ok(())
            }
            _ => bail!(
                "the top is at {version}, this leaf at {committed} (waiting for {:?}): a leaf must deliver \
                 every round of its top; restart it with a fresh data directory",
                leaf.awaiting
            ),
        }
    }

    /// A leaf: the top finished the run at `version`. When that version holds this leaf's last
    /// round, its folded updates are kept for `fl-server audit` (the leaf never receives the final
    /// model: the top does not send tasks on it).
    pub fn top_finished(&mut self, version: ModelVersion) -> Result<()> {
        let last_round = self.leaf.as_ref().is_some_and(|l| l.awaiting == Some(version));
        if last_round && self.config.storage.keep_updates {
            self.store
                .keep_folded(version, self.core.folded())
                .with_context(|| format!("keeping the updates of {version}"))?;
        }
        if !self.finished {
            self.finish()?;
        }
        Ok(())
    }

    /// A leaf: whether tasks must wait (not aligned with the top yet, or waiting for its model).
    pub fn holds_tasks(&self) -> bool {
        self.leaf
            .as_ref()
            .is_some_and(|l| l.top_task.is_none() || l.awaiting.is_some())
    }

    /// A leaf: the uploads to send to the top.
    pub fn take_leaf_uploads(&mut self) -> Vec<LeafUpload> {
        self.leaf
            .as_mut()
            .map(|l| std::mem::take(&mut l.uploads))
            .unwrap_or_default()
    }
}
