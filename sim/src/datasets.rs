//! Choosing a dataset by name, as every fl-sim command does.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use shoal_model::DataError;
use shoal_model::data::synthetic::{self, SyntheticConfig};
use shoal_model::data::{TrainTest, mnist, resolve_data_root};
use std::path::Path;

/// The datasets fl-sim can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetName {
    /// MNIST digits from the IDX files under the data directory (`mnist/`).
    Mnist,
    /// FedProx's synthetic(α, β) benchmark, generated from the seed (no files needed).
    Synthetic,
}

/// Loads `name`: MNIST from the data root (explicit or `$SHOAL_DATA`), synthetic from `synthetic`.
pub fn load(
    name: DatasetName,
    data_dir: Option<&Path>,
    synthetic: &SyntheticConfig,
) -> Result<TrainTest, DataError> {
    match name {
        DatasetName::Mnist => mnist::load(&resolve_data_root(data_dir)?),
        DatasetName::Synthetic => synthetic::generate(synthetic),
    }
}

/// The sample shape and class count of `name` without loading it (systems-only runs size the model
/// from these).
pub fn shape(name: DatasetName, synthetic: &SyntheticConfig) -> (Vec<usize>, usize) {
    match name {
        DatasetName::Mnist => (vec![mnist::ROWS, mnist::COLS, 1], 10),
        DatasetName::Synthetic => (vec![synthetic.dim], synthetic.classes),
    }
}
