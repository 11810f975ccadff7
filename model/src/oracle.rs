//! [`shoal_core::GradientOracle`] for a network on one client's data partition.
//!
//! Minibatches are drawn without replacement in a freshly shuffled order each epoch (the last batch
//! of an epoch may be smaller), from a seeded RNG, so two oracles with the same seed yield the same
//! sequence of minibatches.

use crate::data::Dataset;
use crate::model::{Model, Workspace};
use ndarray::ArrayD;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use shoal_core::{GradientOracle, OracleError, check_dims};
use std::sync::Arc;

/// Stochastic gradients of a model's mean cross-entropy on a client's samples.
#[derive(Debug)]
pub struct ModelOracle {
    model: Arc<Model>,
    data: Arc<Dataset>,
    indices: Vec<usize>,
    batch_size: usize,
    rng: StdRng,
    order: Vec<usize>,
    cursor: usize,
    current: Option<(ArrayD<f32>, Vec<u32>)>,
    workspace: Workspace,
}

impl ModelOracle {
    /// An oracle over the samples `indices` of `data`, drawing minibatches of `batch_size`.
    pub fn new(
        model: Arc<Model>,
        data: Arc<Dataset>,
        indices: Vec<usize>,
        batch_size: usize,
        seed: u64,
    ) -> Self {
        let workspace = model.workspace();
        Self {
            model,
            data,
            indices,
            batch_size: batch_size.max(1),
            rng: StdRng::seed_from_u64(seed),
            order: Vec::new(),
            cursor: 0,
            current: None,
            workspace,
        }
    }

    fn draw(&mut self) -> Result<(), OracleError> {
        if self.indices.is_empty() {
            return Err(OracleError::NoData);
        }
        if self.cursor == 0 || self.cursor >= self.order.len() {
            self.order.clone_from(&self.indices);
            self.order.shuffle(&mut self.rng);
            self.cursor = 0;
        }
        let end = (self.cursor + self.batch_size).min(self.order.len());
        self.current = Some(self.data.batch(&self.order[self.cursor..end]));
        self.cursor = end;
        Ok(())
    }

    fn evaluate_current(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError> {
        check_dims(self.model.num_params(), params, grad)?;
        let (x, y) = self.current.as_ref().ok_or(OracleError::NoCurrentBatch)?;
        let stats = self
            .model
            .loss_and_gradient(params, x.clone(), y, &mut self.workspace, grad)
            .map_err(|_| OracleError::DimensionMismatch {
                expected: self.model.num_params(),
                actual: params.len(),
            })?;
        if !stats.mean_loss.is_finite() || grad.iter().any(|g| !g.is_finite()) {
            return Err(OracleError::NonFinite(stats.mean_loss));
        }
        Ok(stats.mean_loss)
    }
}

impl GradientOracle for ModelOracle {
    fn dim(&self) -> usize {
        self.model.num_params()
    }

    fn num_samples(&self) -> usize {
        self.indices.len()
    }

    fn gradient(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError> {
        check_dims(self.model.num_params(), params, grad)?;
        self.draw()?;
        self.evaluate_current(params, grad)
    }

    fn gradient_same_batch(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError> {
        self.evaluate_current(params, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{SyntheticConfig, generate};
    use crate::train::{Sgd, SgdConfig};
    use crate::zoo;

    fn setup() -> (Arc<Model>, Arc<Dataset>, Vec<usize>) {
        let data = generate(&SyntheticConfig {
            num_clients: 4,
            seed: 2,
            ..Default::default()
        })
        .unwrap();
        let model = Arc::new(zoo::build("logreg", &[60], 10).unwrap());
        let client = data.natural_partition.unwrap().client(0).to_vec();
        (model, Arc::new(data.train), client)
    }

    #[test]
    fn same_seed_gives_the_same_gradient_sequence_and_same_batch_repeats() {
        let (model, data, idx) = setup();
        let params = model.init_params(1);
        let mut a = ModelOracle::new(model.clone(), data.clone(), idx.clone(), 8, 5);
        let mut b = ModelOracle::new(model.clone(), data, idx, 8, 5);
        let (mut ga, mut gb, mut again) = (vec![0.0; a.dim()], vec![0.0; a.dim()], vec![0.0; a.dim()]);
        for _ in 0..5 {
            let la = a.gradient(params.as_slice(), &mut ga).unwrap();
            let lb = b.gradient(params.as_slice(), &mut gb).unwrap();
            assert_eq!((la, &ga), (lb, &gb));
            let l2 = a.gradient_same_batch(params.as_slice(), &mut again).unwrap();
            assert_eq!((la, &ga), (l2, &again));
        }
    }

    #[test]
    fn sgd_on_oracle_gradients_reduces_the_loss() {
        let (model, data, idx) = setup();
        let mut params = model.init_params(1);
        let mut oracle = ModelOracle::new(model.clone(), data, idx.clone(), idx.len(), 0);
        let mut sgd = Sgd::new(
            SgdConfig {
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            model.layout(),
        );
        let mut grad = vec![0.0; oracle.dim()];
        let first = oracle.gradient(params.as_slice(), &mut grad).unwrap();
        let mut last = first;
        for _ in 0..50 {
            last = oracle.gradient(params.as_slice(), &mut grad).unwrap();
            sgd.step(model.layout(), params.as_mut_slice(), &grad);
        }
        assert!(last < 0.7 * first, "full-batch loss went from {first} to {last}");
    }

    #[test]
    fn misuse_is_a_typed_error() {
        let (model, data, idx) = setup();
        let mut oracle = ModelOracle::new(model.clone(), data.clone(), idx, 4, 0);
        let mut grad = vec![0.0; oracle.dim()];
        let params = model.init_params(0);
        assert_eq!(
            oracle.gradient_same_batch(params.as_slice(), &mut grad),
            Err(OracleError::NoCurrentBatch)
        );
        assert!(matches!(
            oracle.gradient(&[0.0; 3], &mut grad),
            Err(OracleError::DimensionMismatch { .. })
        ));
        let mut empty = ModelOracle::new(model, data, Vec::new(), 4, 0);
        assert_eq!(
            empty.gradient(params.as_slice(), &mut grad),
            Err(OracleError::NoData)
        );
    }
}
