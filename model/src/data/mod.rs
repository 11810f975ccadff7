//! Datasets and partitioners.
//!
//! A [`Dataset`] holds samples as one row-major `f32` matrix plus `u32` labels; a batch is gathered
//! from it by index. Sources: MNIST from its original IDX files ([`mnist`]) and the synthetic
//! federated benchmark of FedProx/LEAF ([`synthetic`]). [`partition`] splits a training set across
//! clients (IID, pathological shards, Dirichlet label skew, quantity skew).

pub mod mnist;
pub mod partition;
pub mod synthetic;

use crate::error::DataError;
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use synthetic::SyntheticConfig;

/// Environment variable naming the data root (a folder holding `mnist/`).
pub const DATA_DIR_ENV: &str = "SHOAL_DATA";

/// Labelled samples of one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    name: String,
    sample_shape: Vec<usize>,
    num_classes: usize,
    features: Vec<f32>,
    labels: Vec<u32>,
}

impl Dataset {
    /// Wraps samples; fails unless `features` holds `labels.len()` samples of `sample_shape` and
    /// every label is below `num_classes`.
    pub fn new(
        name: impl Into<String>,
        sample_shape: Vec<usize>,
        num_classes: usize,
        features: Vec<f32>,
        labels: Vec<u32>,
    ) -> Result<Self, DataError> {
        let name = name.into();
        let sample_len: usize = sample_shape.iter().product();
        if sample_len == 0 || features.len() != sample_len * labels.len() {
            return Err(DataError::InvalidConfig(format!(
                "dataset `{name}`: {} values do not make {} samples of shape {sample_shape:?}",
                features.len(),
                labels.len()
            )));
        }
        if let Some(l) = labels.iter().find(|&&l| l as usize >= num_classes) {
            return Err(DataError::InvalidConfig(format!(
                "dataset `{name}`: label {l} with {num_classes} classes"
            )));
        }
        Ok(Self {
            name,
            sample_shape,
            num_classes,
            features,
            labels,
        })
    }

    /// The dataset's name (`mnist-train`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Per-sample shape (`[28, 28, 1]` for MNIST, NHWC).
    pub fn sample_shape(&self) -> &[usize] {
        &self.sample_shape
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The features of sample `i`.
    pub fn sample(&self, i: usize) -> &[f32] {
        let len = self.sample_len();
        &self.features[i * len..(i + 1) * len]
    }

    fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Gathers the samples at `indices` into a batch `[indices.len(), sample_shape…]` and its labels.
    /// Indices come from partitions of this dataset; one out of range is a programming error.
    pub fn batch(&self, indices: &[usize]) -> (ArrayD<f32>, Vec<u32>) {
        let len = self.sample_len();
        let mut values = Vec::with_capacity(indices.len() * len);
        for &i in indices {
            values.extend_from_slice(self.sample(i));
        }
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&self.sample_shape);
        let batch = ArrayD::from_shape_vec(IxDyn(&shape), values).expect("gathered batch has its shape");
        (batch, indices.iter().map(|&i| self.labels[i]).collect())
    }

    /// The first `n` samples (all of them if there are fewer), e.g. a quicker evaluation set.
    pub fn head(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            name: self.name.clone(),
            sample_shape: self.sample_shape.clone(),
            num_classes: self.num_classes,
            features: self.features[..n * self.sample_len()].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// Number of samples of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// A training and a test set, and the clients' natural split when the source defines one.
#[derive(Debug, Clone)]
pub struct TrainTest {
    /// Training samples.
    pub train: Dataset,
    /// Held-out samples.
    pub test: Dataset,
    /// Per-client training indices when the dataset is federated by construction (synthetic).
    pub natural_partition: Option<partition::Partition>,
}

/// The data root: the explicit path if given, else `$SHOAL_DATA`; an error says how to set either.
pub fn resolve_data_root(explicit: Option<&Path>) -> Result<PathBuf, DataError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    match std::env::var_os(DATA_DIR_ENV) {
        Some(value) if !value.is_empty() => Ok(PathBuf::from(value)),
        _ => Err(DataError::NoDataDir(format!(
            "pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, where DIR holds mnist/ (in a checkout: ../shared/data)"
        ))),
    }
}

/// The datasets every Shoal program can load by name (fl-sim experiments, fl-server's held-out
/// evaluation, fl-client's local data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetName {
    /// MNIST digits from the IDX files under the data root (`mnist/`).
    Mnist,
    /// FedProx's synthetic(α, β) benchmark, generated from its seed (no files needed).
    Synthetic,
}

impl DatasetName {
    /// Loads the dataset: MNIST from the data root (explicit or `$SHOAL_DATA`), synthetic from
    /// `synthetic`.
    pub fn load(self, data_dir: Option<&Path>, synthetic: &SyntheticConfig) -> Result<TrainTest, DataError> {
        match self {
            DatasetName::Mnist => mnist::load(&resolve_data_root(data_dir)?),
            DatasetName::Synthetic => synthetic::generate(synthetic),
        }
    }

    /// Checks what the dataset's configuration can check without reading files (the synthetic
    /// set's sizes).
    pub fn check(self, synthetic: &SyntheticConfig) -> Result<(), DataError> {
        match self {
            DatasetName::Mnist => Ok(()),
            DatasetName::Synthetic => synthetic.check(),
        }
    }

    /// The sample shape and class count, without loading anything (to size a model).
    pub fn shape(self, synthetic: &SyntheticConfig) -> (Vec<usize>, usize) {
        match self {
            DatasetName::Mnist => (vec![mnist::ROWS, mnist::COLS, 1], 10),
            DatasetName::Synthetic => (vec![synthetic.dim], synthetic.classes),
        }
    }
}

impl std::str::FromStr for DatasetName {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mnist" => Ok(DatasetName::Mnist),
            "synthetic" => Ok(DatasetName::Synthetic),
            other => Err(DataError::InvalidConfig(format!(
                "unknown dataset `{other}` (expected mnist or synthetic)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_gather_samples_in_index_order() {
        let data = Dataset::new("t", vec![2], 3, vec![0., 1., 10., 11., 20., 21.], vec![0, 1, 2]).unwrap();
        let (x, y) = data.batch(&[2, 0]);
        assert_eq!(x.shape(), &[2, 2]);
        assert_eq!(x.as_slice().unwrap(), &[20., 21., 0., 1.]);
        assert_eq!(y, vec![2, 0]);
        assert_eq!(data.class_counts(), vec![1, 1, 1]);
    }

    #[test]
    fn inconsistent_datasets_are_rejected() {
        assert!(Dataset::new("t", vec![2], 3, vec![0.; 5], vec![0, 1, 2]).is_err());
        assert!(Dataset::new("t", vec![2], 2, vec![0.; 6], vec![0, 1, 2]).is_err());
        assert!(resolve_data_root(Some(Path::new("/x"))).is_ok());
    }
}
