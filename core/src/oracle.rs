//! The gradient oracle: how a client rule asks for stochastic gradients without knowing the model.
//!
//! `shoal-aggregators` writes every client rule against this trait. `shoal-model` implements it for
//! neural networks on a client's data partition; tests implement it with quadratics.

use thiserror::Error;

/// Failure to evaluate a gradient.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum OracleError {
    /// The parameter or gradient buffer has the wrong length.
    #[error("oracle expects {expected} parameters, got {actual}")]
    DimensionMismatch {
        /// The oracle's dimension.
        expected: usize,
        /// The length supplied.
        actual: usize,
    },
    /// The oracle holds no data to draw a minibatch from.
    #[error("oracle has no samples to draw a minibatch from")]
    NoData,
    /// [`GradientOracle::gradient_same_batch`] was called before any minibatch was drawn.
    #[error("no minibatch has been drawn yet")]
    NoCurrentBatch,
    /// The model behind the oracle could not evaluate the minibatch.
    #[error("model evaluation failed: {0}")]
    Model(String),
    /// The loss or gradient came out NaN or infinite.
    #[error("loss or gradient is not finite (loss = {0})")]
    NonFinite(f32),
}

/// A source of stochastic gradients of a client's local objective.
pub trait GradientOracle {
    /// Length of the parameter vector the oracle works on (the whole flat buffer, buffers included).
    fn dim(&self) -> usize;

    /// Number of training samples behind the oracle (`n_i`).
    fn num_samples(&self) -> usize;

    /// Draws the next minibatch and writes the stochastic gradient of the loss at `params` into
    /// `grad` (overwriting it); returns the minibatch loss.
    fn gradient(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError>;

    /// Evaluates the gradient at `params` on the minibatch the last [`gradient`](Self::gradient) call
    /// drew, without drawing a new one. Variance-reduced rules need two points on one minibatch.
    fn gradient_same_batch(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError>;
}

/// Checks that `params` and `grad` both have the oracle's dimension.
pub fn check_dims(dim: usize, params: &[f32], grad: &[f32]) -> Result<(), OracleError> {
    for actual in [params.len(), grad.len()] {
        if actual != dim {
            return Err(OracleError::DimensionMismatch {
                expected: dim,
                actual,
            });
        }
    }
    Ok(())
}
