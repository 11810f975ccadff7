//! The server core: what becomes of an accepted update until it is part of a version, in fl-sim
//! and fl-server alike.
//!
//! The Coordinator decides (fold this task with this weight, discard that one, aggregate now with
//! this population); [`ServerCore`] carries those decisions out on the server rule's state: it
//! holds each accepted contribution until its decision, folds it into the aggregation in progress,
//! merges the aggregation, applies the rule in the context of the configured local task and the
//! population `N`, and keeps the state to broadcast and to persist.
//!
//! *Where* folds run is the driver's: a [`FoldExecutor`] opens an aggregation and runs its folds.
//! fl-sim folds in place on its own thread ([`InPlace`]); fl-server on its serverless runtime of
//! leaf, middle and top workers. Both fold with the rule's own `fold` and merge with the
//! accumulator's monoid, so the merged sums, and every version, are the same.

use crate::upload::{Contribution, SharedUpload};
use shoal_aggregators::{
    Accumulator, AlgorithmConfig, ApplyContext, Broadcast, RuleError, ServerRule, ServerState,
};
use shoal_core::TaskId;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use thiserror::Error;

/// An executor's error, boxed: each driver's runtime has its own.
pub type ExecutorError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a driver runs the folds of an aggregation.
pub trait FoldExecutor {
    /// An aggregation in progress.
    type Open: OpenFolds;
    /// Opens an aggregation of uploads of `parts` vectors of `dim` values for `rule`, expecting
    /// about `expected` updates.
    fn open(
        &mut self,
        rule: &Arc<dyn ServerRule>,
        parts: usize,
        dim: usize,
        expected: usize,
    ) -> Result<Self::Open, ExecutorError>;
}

/// An aggregation in progress on a [`FoldExecutor`].
pub trait OpenFolds {
    /// The merged sums once it is finished.
    type Merged: Deref<Target = Accumulator>;
    /// Folds a client's upload with `weight` (with the rule's `fold`).
    fn submit(&mut self, task: TaskId, upload: SharedUpload, weight: f64) -> Result<(), ExecutorError>;
    /// Merges a partial aggregate as it is (its sums already carry their weights).
    fn absorb(&mut self, task: TaskId, sums: Accumulator) -> Result<(), ExecutorError>;
    /// Finishes every fold and merges the sums.
    fn finish(self) -> Result<Self::Merged, ExecutorError>;
}

/// Folds in place, on the caller's thread, into one accumulator.
#[derive(Debug, Clone, Copy, Default)]
pub struct InPlace;

/// An aggregation folding in place.
#[derive(Debug)]
pub struct InPlaceFolds {
    rule: Arc<dyn ServerRule>,
    acc: Box<Accumulator>,
}

impl FoldExecutor for InPlace {
    type Open = InPlaceFolds;
    fn open(
        &mut self,
        rule: &Arc<dyn ServerRule>,
        parts: usize,
        dim: usize,
        _expected: usize,
    ) -> Result<InPlaceFolds, ExecutorError> {
        let acc = rule.accumulator(dim);
        if acc.parts() != parts {
            return Err(format!("the rule folds {} parts, not {parts}", acc.parts()).into());
        }
        Ok(InPlaceFolds {
            rule: rule.clone(),
            acc: Box::new(acc),
        })
    }
}

impl OpenFolds for InPlaceFolds {
    type Merged = Box<Accumulator>;
    fn submit(&mut self, _task: TaskId, upload: SharedUpload, weight: f64) -> Result<(), ExecutorError> {
        let views: Vec<&[f32]> = upload.iter().map(Vec::as_slice).collect();
        Ok(self.rule.fold(&mut self.acc, &views, weight)?)
    }
    fn absorb(&mut self, _task: TaskId, sums: Accumulator) -> Result<(), ExecutorError> {
        Ok(self.acc.merge(&sums)?)
    }
    fn finish(self) -> Result<Box<Accumulator>, ExecutorError> {
        Ok(self.acc)
    }
}

/// Why the core could not carry out a decision.
#[derive(Debug, Error)]
pub enum CoreError {
    /// The executor refused or lost a fold.
    #[error("folding {task}: {source}")]
    Fold {
        /// The task whose update it was.
        task: TaskId,
        /// Why.
        #[source]
        source: ExecutorError,
    },
    /// The executor could not open or finish the aggregation.
    #[error("aggregating: {0}")]
    Aggregate(#[source] ExecutorError),
    /// The rule refused the merged sums.
    #[error("applying the rule: {0}")]
    Apply(#[from] RuleError),
}

/// An accepted contribution waiting for the Coordinator's decision.
#[derive(Debug)]
struct Held {
    contribution: Contribution,
    loss: f32,
}

/// The population an aggregation is applied for ([ALGORITHMS.md §3.1]: `N` is the registered
/// population, as the Coordinator counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Population {
    /// `N` now.
    pub num_clients: usize,
    /// `N` at the aggregation before.
    pub previous_num_clients: usize,
}

/// The server rule's state and the aggregation in progress, moved only by the Coordinator's
/// decisions.
pub struct ServerCore<E: FoldExecutor> {
    rule: Arc<dyn ServerRule>,
    config: AlgorithmConfig,
    state: ServerState,
    executor: E,
    open: Option<E::Open>,
    held: HashMap<TaskId, Held>,
    /// Tasks folded into the aggregation in progress (or just merged), with their weights.
    folded: Vec<(TaskId, f64)>,
    /// Updates in the last merged aggregation (the next one's expected count).
    last_updates: usize,
}

impl<E: FoldExecutor> std::fmt::Debug for ServerCore<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCore")
            .field("rule", &self.rule.name())
            .field("dim", &self.state.x.len())
            .field("held", &self.held.len())
            .field("folded", &self.folded.len())
            .field("open", &self.open.is_some())
            .finish()
    }
}

impl<E: FoldExecutor> ServerCore<E> {
    /// A core for `rule` (configured by `config`) from `state`, folding on `executor`.
    pub fn new(rule: Arc<dyn ServerRule>, config: AlgorithmConfig, state: ServerState, executor: E) -> Self {
        Self {
            rule,
            config,
            state,
            executor,
            open: None,
            held: HashMap::new(),
            folded: Vec::new(),
            last_updates: 0,
        }
    }

    /// The rule's state: the model and the global vectors it keeps (what a version persists).
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// The rule's state, leaving the core.
    pub fn into_state(self) -> ServerState {
        self.state
    }

    /// What tasks on the current state receive.
    pub fn broadcast(&self) -> Broadcast {
        self.state.broadcast()
    }

    /// Vectors per upload of the rule.
    pub fn upload_parts(&self) -> usize {
        self.rule.upload_parts()
    }

    /// The executor (for its figures).
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// An accepted update of `task`, with the loss its client reported, waits for its fold or
    /// discard.
    pub fn hold(&mut self, task: TaskId, contribution: Contribution, loss: f32) {
        self.held.insert(task, Held { contribution, loss });
    }

    /// Whether `task`'s update is held.
    pub fn holds(&self, task: TaskId) -> bool {
        self.held.contains_key(&task)
    }

    /// Drops `task`'s held update, if any.
    pub fn discard(&mut self, task: TaskId) -> bool {
        self.held.remove(&task).is_some()
    }

    /// Folds `task`'s held update with `weight` into the aggregation in progress, opening it first
    /// (for as many updates as the last one had, or `running` if more). Returns the loss its
    /// client reported, or `None` when nothing is held for it (a committed version holds it).
    pub fn fold(&mut self, task: TaskId, weight: f64, running: usize) -> Result<Option<f32>, CoreError> {
        let Some(held) = self.held.remove(&task) else {
            return Ok(None);
        };
        let open = self.open(running)?;
        match held.contribution {
            Contribution::Upload(parts) => open.submit(task, parts, weight),
            Contribution::Partial(sums) => open.absorb(task, sums),
        }
        .map_err(|source| CoreError::Fold { task, source })?;
        self.folded.push((task, weight));
        Ok(Some(held.loss))
    }

    /// A new aggregation on the executor, planned for as many updates as the last one had, or
    /// `expected` if more.
    fn begin(&mut self, expected: usize) -> Result<E::Open, CoreError> {
        self.executor
            .open(
                &self.rule,
                self.rule.upload_parts(),
                self.state.x.len(),
                self.last_updates.max(expected),
            )
            .map_err(CoreError::Aggregate)
    }

    /// The aggregation in progress, opened now if there is none.
    fn open(&mut self, expected: usize) -> Result<&mut E::Open, CoreError> {
        match self.open {
            Some(ref mut open) => Ok(open),
            None => {
                let open = self.begin(expected)?;
                Ok(self.open.insert(open))
            }
        }
    }

    /// Finishes the aggregation in progress (an empty one if nothing was folded) and returns its
    /// merged sums; the rule's state does not move. A leaf of a federation sends these sums up
    /// instead of applying them.
    pub fn merge(&mut self) -> Result<<E::Open as OpenFolds>::Merged, CoreError> {
        let open = match self.open.take() {
            Some(open) => open,
            None => self.begin(0)?,
        };
        let merged = open.finish().map_err(CoreError::Aggregate)?;
        self.last_updates = usize::try_from(merged.count()).unwrap_or(usize::MAX);
        Ok(merged)
    }

    /// Applies merged sums to the rule's state, for `population`, with the uploads computed by
    /// the configured local task.
    pub fn apply(&mut self, merged: &Accumulator, population: Population) -> Result<(), CoreError> {
        let ctx = ApplyContext {
            num_clients: population.num_clients,
            previous_num_clients: population.previous_num_clients,
            task: self.config.local_task(self.config.local_steps),
        };
        Ok(self.rule.apply(&mut self.state, merged, &ctx)?)
    }

    /// Merges the aggregation in progress and applies it: the next version's state. Returns the
    /// updates folded into it.
    pub fn aggregate(&mut self, population: Population) -> Result<u64, CoreError> {
        let merged = self.merge()?;
        self.apply(&merged, population)?;
        Ok(merged.count())
    }

    /// Drops the aggregation in progress and its list of folded tasks (a replayed aggregation
    /// that a committed version already holds).
    pub fn abandon(&mut self) {
        self.open = None;
        self.folded.clear();
    }

    /// The tasks folded since the last call, with their weights.
    pub fn take_folded(&mut self) -> Vec<(TaskId, f64)> {
        std::mem::take(&mut self.folded)
    }

    /// The tasks folded since the last [`take_folded`](Self::take_folded).
    pub fn folded(&self) -> &[(TaskId, f64)] {
        &self.folded
    }

    /// Replaces the global model (a leaf of a federation adopting its top's).
    pub fn set_model(&mut self, x: Vec<f32>) {
        self.state.x = x;
    }

    /// The global model, to write in place (a split run's shared tail, trained by the server).
    pub fn model_mut(&mut self) -> &mut [f32] {
        &mut self.state.x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_aggregators::AlgorithmConfig;

    fn config(rule_table: &str) -> AlgorithmConfig {
        toml::from_str(&format!("local_steps = 2\nlocal_lr = 0.1\n[rule]\n{rule_table}"))
            .expect("a valid [algorithm] table")
    }

    fn upload(values: &[f32]) -> Contribution {
        Contribution::Upload(Arc::from(vec![values.to_vec()]))
    }

    #[test]
    fn folds_only_what_is_held_and_applies_the_weighted_mean() {
        let config = config("rule = \"fedavg\"");
        let (algorithm, _) = config.build(1).expect("builds");
        let state = algorithm.server.init_state(vec![0.0; 3]);
        let mut core = ServerCore::new(algorithm.server.clone(), config, state, InPlace);
        core.hold(TaskId(1), upload(&[1.0, 2.0, 3.0]), 0.5);
        core.hold(TaskId(2), upload(&[3.0, 2.0, 1.0]), 0.7);
        core.hold(TaskId(3), upload(&[9.0, 9.0, 9.0]), 0.9);
        assert_eq!(core.fold(TaskId(1), 1.0, 2).expect("folds"), Some(0.5));
        assert_eq!(core.fold(TaskId(2), 3.0, 2).expect("folds"), Some(0.7));
        assert_eq!(core.fold(TaskId(2), 3.0, 2).expect("nothing held"), None);
        assert!(core.discard(TaskId(3)));
        assert!(!core.holds(TaskId(3)));
        let population = Population {
            num_clients: 2,
            previous_num_clients: 2,
        };
        assert_eq!(core.aggregate(population).expect("aggregates"), 2);
        assert_eq!(core.folded(), &[(TaskId(1), 1.0), (TaskId(2), 3.0)]);
        // FedAvg at server_lr 1: x + the weighted mean of the deltas.
        let expected = [2.5f32, 2.0, 1.5];
        for (x, e) in core.state().x.iter().zip(expected) {
            assert!((x - e).abs() < 1e-6, "{x} vs {e}");
        }
        assert_eq!(core.take_folded().len(), 2);
        assert!(core.folded().is_empty());
    }

    #[test]
    fn a_partial_aggregate_merges_as_the_uploads_it_sums() {
        let config = config("rule = \"fedavg\"");
        let (algorithm, _) = config.build(1).expect("builds");
        let init = || algorithm.server.init_state(vec![1.0; 2]);
        let population = Population {
            num_clients: 3,
            previous_num_clients: 3,
        };
        let mut flat = ServerCore::new(algorithm.server.clone(), config.clone(), init(), InPlace);
        let mut leaf = ServerCore::new(algorithm.server.clone(), config.clone(), init(), InPlace);
        let mut top = ServerCore::new(algorithm.server.clone(), config, init(), InPlace);
        let updates = [([1.0f32, -1.0], 2.0), ([0.5, 0.5], 1.0), ([-2.0, 4.0], 4.0)];
        for (i, (u, w)) in updates.iter().enumerate() {
            let task = TaskId(i as u64);
            flat.hold(task, upload(u), 0.0);
            flat.fold(task, *w, 3).expect("folds");
        }
        for (i, (u, w)) in updates[..2].iter().enumerate() {
            let task = TaskId(i as u64);
            leaf.hold(task, upload(u), 0.0);
            leaf.fold(task, *w, 2).expect("folds");
        }
        let partial = leaf.merge().expect("merges");
        top.hold(TaskId(10), Contribution::Partial((*partial).clone()), 0.0);
        top.fold(TaskId(10), 123.0, 2).expect("absorbs");
        top.hold(TaskId(2), upload(&updates[2].0), 0.0);
        top.fold(TaskId(2), updates[2].1, 2).expect("folds");
        flat.aggregate(population).expect("aggregates");
        top.aggregate(population).expect("aggregates");
        assert_eq!(flat.state().x, top.state().x);
    }
}
