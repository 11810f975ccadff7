//! The two halves of an algorithm and what passes between them.
//!
//! A method is a [`ServerRule`] (what the server keeps, broadcasts, and how it applies the folded
//! uploads) and a [`ClientRule`] (how a client turns the broadcast into an upload, keeping its own
//! persistent [`ClientState`]). Both halves of one method live in one file under `rules/`.
//!
//! Sign conventions follow ALGORITHMS.md per method: FedAvg-family uploads are model deltas
//! `y − x`; SCAFFOLD-family uploads are control-variate increments `δ_i`; momentum-family uploads are
//! average directions `u_i = (x − y)/(η K)`.

use crate::accumulator::{Accumulator, FoldError};
use serde::{Deserialize, Serialize};
use shoal_core::{CompressError, Compressor, GradientOracle, OracleError};
use std::fmt::Debug;
use std::sync::Arc;
use thiserror::Error;

/// Local training a client is asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTask {
    /// Local optimisation steps `K`.
    pub local_steps: u32,
    /// Local learning rate `η_l`.
    pub lr: f32,
}

/// What the server sends with a task: the model and whatever global vectors the method uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    /// Global model `x`.
    pub x: Arc<[f32]>,
    /// Server control variate `c` (SCAFFOLD family).
    pub c: Option<Arc<[f32]>>,
    /// Global direction `g` (FedAvg-M, SCAFFOLD-M).
    pub g: Option<Arc<[f32]>>,
    /// Previous global model `x^{r−1}` (variance-reduced momentum variants).
    pub x_prev: Option<Arc<[f32]>>,
}

impl Broadcast {
    /// Bytes of every vector it carries, as f32 (what a device downloads for a task).
    pub fn bytes(&self) -> u64 {
        let vectors = [&self.c, &self.g, &self.x_prev]
            .iter()
            .filter(|v| v.is_some())
            .count()
            + 1;
        (vectors * self.x.len() * 4) as u64
    }
}

/// What a client keeps between tasks. Which fields a method uses is documented in its file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientState {
    /// Client control variate `c_i` (SCAFFOLD, SCAFFOLD-M, SCALLION, SCAFCOM).
    pub c: Option<Vec<f32>>,
    /// Local momentum `v_i` (SCAFCOM).
    pub v: Option<Vec<f32>>,
}

/// What a client sends back: the vectors its method uploads, and how training went.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The uploaded vectors, in the order the server rule folds them.
    pub parts: Vec<Vec<f32>>,
    /// Mean minibatch loss over the local steps.
    pub mean_loss: f32,
    /// Local steps run.
    pub local_steps: u32,
}

impl Upload {
    /// The parts as slices, ready for [`Accumulator::fold`].
    pub fn views(&self) -> Vec<&[f32]> {
        self.parts.iter().map(Vec::as_slice).collect()
    }
}

/// The server's state of a method.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    /// Global model `x`.
    pub x: Vec<f32>,
    /// Server control variate `c`.
    pub c: Option<Vec<f32>>,
    /// Global direction `g`.
    pub g: Option<Vec<f32>>,
    /// Server momentum buffer (FedAvgM).
    pub momentum: Option<Vec<f32>>,
    /// The model before the last `apply` (variance-reduced variants broadcast it).
    pub x_prev: Option<Vec<f32>>,
}

impl ServerState {
    /// A state holding only the model.
    pub fn new(x: Vec<f32>) -> Self {
        Self {
            x,
            c: None,
            g: None,
            momentum: None,
            x_prev: None,
        }
    }

    /// A state holding the model and a zero server control variate (SCAFFOLD family).
    pub fn with_control_variate(x: Vec<f32>) -> Self {
        let dim = x.len();
        Self {
            c: Some(vec![0.0; dim]),
            ..Self::new(x)
        }
    }

    /// The broadcast of this state (copies each vector once into shared storage).
    pub fn broadcast(&self) -> Broadcast {
        let share = |v: &Option<Vec<f32>>| v.as_deref().map(Arc::from);
        Broadcast {
            x: Arc::from(self.x.as_slice()),
            c: share(&self.c),
            g: share(&self.g),
            x_prev: share(&self.x_prev),
        }
    }
}

/// How a method turns its fold weights into a step — the contract between a rule and the scheduler
/// that computes the weights (see `schedulers` for which pairs are allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// Weights are relative importances; the rule divides by their sum (FedAvg, FedAvgM).
    WeightedMean,
    /// As `WeightedMean`, and every upload of an aggregation must be computed on the current
    /// version, because the method keeps a global direction built from one round (FedAvg-M).
    SynchronousWeightedMean,
    /// Every weight is 1 and every upload of an aggregation is computed on the current version:
    /// control-variate methods keep `c` equal to the mean of all `c_i` (SCAFFOLD family).
    SynchronousMean,
    /// Weights are per-update discounts; the rule divides the sum by the number of uploads (FedBuff).
    PerUpdateMean,
    /// Weights are step sizes; the rule adds the weighted sum as it is (FedFix, FedCompass).
    WeightedSum,
    /// Weights are mixing coefficients of uploaded models, summing to at most 1 (FedAsync).
    Mixing,
}

/// What `apply` needs to know about the aggregation beyond the sums.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApplyContext {
    /// The population `N`: every client registered in the run so far, connected or not, evicted
    /// or not (control variates are averaged over all of them).
    pub num_clients: usize,
    /// `N` at the previous aggregation (0 before the first). Clients that joined since hold
    /// `c_i = 0`, so a control variate averaged over the old population is rescaled by
    /// `previous / N` before this aggregation's increments are added: `c` stays the mean of all
    /// `c_i`.
    pub previous_num_clients: usize,
    /// The local task the folded uploads were computed with.
    pub task: LocalTask,
}

impl ApplyContext {
    /// The context for a population of `num_clients` that has not changed since the previous
    /// aggregation, the uploads computed with `task`.
    pub fn fixed_population(num_clients: usize, task: LocalTask) -> Self {
        Self {
            num_clients,
            previous_num_clients: num_clients,
            task,
        }
    }
}

/// Errors of the rules.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RuleError {
    /// The gradient oracle failed.
    #[error("local training: {0}")]
    Oracle(#[from] OracleError),
    /// The compressor failed.
    #[error("compression: {0}")]
    Compress(#[from] CompressError),
    /// An upload or partial sum was refused.
    #[error("aggregation: {0}")]
    Fold(#[from] FoldError),
    /// The broadcast lacks a vector the method needs.
    #[error("{rule} needs `{field}` in the broadcast")]
    MissingBroadcast {
        /// The method.
        rule: &'static str,
        /// The missing vector.
        field: &'static str,
    },
    /// A vector of the wrong length in the broadcast or the client state.
    #[error("{what} has {actual} values, the model has {expected}")]
    Dimension {
        /// Which vector.
        what: &'static str,
        /// The model dimension.
        expected: usize,
        /// Its length.
        actual: usize,
    },
    /// The method averages uniformly and cannot take another weight.
    #[error("{rule} averages uploads uniformly; weight {weight} is not supported")]
    WeightNotSupported {
        /// The method.
        rule: &'static str,
        /// The weight offered.
        weight: f64,
    },
    /// FedAsync's mixing weights of one aggregation sum to more than 1.
    #[error("mixing weights sum to {0}, more than 1")]
    MixingWeights(f64),
    /// The method needs at least one local step.
    #[error("a task needs at least one local step")]
    NoLocalSteps,
}

/// The client half of a method.
pub trait ClientRule: Debug + Send + Sync {
    /// Runs the task from the broadcast on the client's data (through `oracle`), updates the client's
    /// persistent `state`, and returns exactly what the method uploads. Methods that compress use
    /// `compressor`; the others ignore it.
    fn train(
        &self,
        task: &LocalTask,
        broadcast: &Broadcast,
        state: &mut ClientState,
        oracle: &mut dyn GradientOracle,
        compressor: &mut dyn Compressor,
    ) -> Result<Upload, RuleError>;
}

/// The server half of a method.
pub trait ServerRule: Debug + Send + Sync {
    /// The method's name, as in the configuration.
    fn name(&self) -> &'static str;

    /// Vectors per upload (one unless the method says otherwise).
    fn upload_parts(&self) -> usize {
        1
    }

    /// The initial server state around the initial model `x0`; methods that keep `c`, `g` or a
    /// momentum buffer start them at zero.
    fn init_state(&self, x0: Vec<f32>) -> ServerState {
        ServerState::new(x0)
    }

    /// What the method's fold weights mean, and so which schedulers it can run under.
    fn aggregation(&self) -> Aggregation {
        Aggregation::WeightedMean
    }

    /// An empty accumulator for this method's uploads.
    fn accumulator(&self, dim: usize) -> Accumulator {
        Accumulator::new(self.upload_parts(), dim)
    }

    /// Folds one upload with `weight`; refused uploads never reach the sums.
    fn fold(&self, acc: &mut Accumulator, upload: &[&[f32]], weight: f64) -> Result<(), RuleError> {
        if self.aggregation() == Aggregation::SynchronousMean && weight != 1.0 {
            return Err(RuleError::WeightNotSupported {
                rule: self.name(),
                weight,
            });
        }
        Ok(acc.fold(upload, weight)?)
    }

    /// Moves the server state with the (merged) sums. An empty accumulator leaves the state as it is.
    fn apply(&self, state: &mut ServerState, acc: &Accumulator, ctx: &ApplyContext) -> Result<(), RuleError>;
}

/// Checks that an optional broadcast vector is present with the model's dimension.
pub(crate) fn require<'a>(
    rule: &'static str,
    field: &'static str,
    v: &'a Option<Arc<[f32]>>,
    dim: usize,
) -> Result<&'a [f32], RuleError> {
    let v = v.as_deref().ok_or(RuleError::MissingBroadcast { rule, field })?;
    if v.len() != dim {
        return Err(RuleError::Dimension {
            what: field,
            expected: dim,
            actual: v.len(),
        });
    }
    Ok(v)
}

/// A persistent client vector, created as zeros on first use; fails if its length is wrong.
pub(crate) fn state_vector<'a>(
    what: &'static str,
    slot: &'a mut Option<Vec<f32>>,
    dim: usize,
) -> Result<&'a mut Vec<f32>, RuleError> {
    let v = slot.get_or_insert_with(|| vec![0.0; dim]);
    if v.len() != dim {
        return Err(RuleError::Dimension {
            what,
            expected: dim,
            actual: v.len(),
        });
    }
    Ok(v)
}

/// The result of a run of local steps.
pub(crate) struct LocalRun {
    /// The final local iterate `y^K`.
    pub y: Vec<f32>,
    /// Mean minibatch loss.
    pub mean_loss: f32,
}

/// Runs `K` local steps `y ← y − η · d_k` from `x`. For each step the oracle's stochastic gradient
/// at `y` is written into a buffer and `direction(oracle, y, buffer)` turns it into `d_k` in place
/// (e.g. adding a control-variate correction).
pub(crate) fn local_steps(
    task: &LocalTask,
    x: &[f32],
    oracle: &mut dyn GradientOracle,
    mut direction: impl FnMut(&mut dyn GradientOracle, &[f32], &mut [f32]) -> Result<(), RuleError>,
) -> Result<LocalRun, RuleError> {
    if task.local_steps == 0 {
        return Err(RuleError::NoLocalSteps);
    }
    if oracle.dim() != x.len() {
        return Err(RuleError::Dimension {
            what: "model",
            expected: oracle.dim(),
            actual: x.len(),
        });
    }
    let mut y = x.to_vec();
    let mut d = vec![0.0f32; x.len()];
    let mut loss = 0.0f64;
    for _ in 0..task.local_steps {
        loss += f64::from(oracle.gradient(&y, &mut d)?);
        direction(oracle, &y, &mut d)?;
        for (yi, di) in y.iter_mut().zip(&d) {
            *yi -= task.lr * di;
        }
    }
    Ok(LocalRun {
        y,
        mean_loss: (loss / f64::from(task.local_steps)) as f32,
    })
}

/// `(x − y) / (η K)`: the average local direction of a run.
pub(crate) fn average_direction(task: &LocalTask, x: &[f32], y: &[f32]) -> Vec<f32> {
    let scale = 1.0 / (f64::from(task.lr) * f64::from(task.local_steps));
    x.iter()
        .zip(y)
        .map(|(&a, &b)| ((f64::from(a) - f64::from(b)) * scale) as f32)
        .collect()
}
