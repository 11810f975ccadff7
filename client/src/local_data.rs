//! A device's training data: its share of a dataset split by a partitioner (every client computes
//! the same split from the same seed and takes its index), or MNIST-format IDX files of its own.

use anyhow::{Context, Result, bail, ensure};
use shoal_model::data::partition::PartitionSpec;
use shoal_model::data::synthetic::SyntheticConfig;
use shoal_model::data::{Dataset, DatasetName, mnist};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a device's samples come from.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// Client `index` of `partition` over the training split of `dataset`.
    Partition {
        /// The dataset.
        dataset: DatasetName,
        /// Its data root (MNIST).
        data_dir: Option<PathBuf>,
        /// The split every client computes.
        partition: PartitionSpec,
        /// This client's index in it.
        index: usize,
        /// The split's seed (the same on every client).
        seed: u64,
    },
    /// MNIST-format IDX files.
    Idx {
        /// Images (`idx3`).
        images: PathBuf,
        /// Labels (`idx1`).
        labels: PathBuf,
    },
}

/// Parses a partitioner named on the command line: `iid`, `shards`, `dirichlet:ALPHA`,
/// `quantity-skew:ALPHA`, or an experiment's `[data] partition` as an inline TOML table
/// (`{ kind = "shards", num_clients = 100, shards_per_client = 2 }`, which names its own client
/// count; `fl-sim deployment` writes it).
pub fn parse_partition(text: &str, num_clients: usize) -> Result<PartitionSpec> {
    if text.trim_start().starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Table {
            partition: PartitionSpec,
        }
        let table: Table = toml::from_str(&format!("partition = {text}"))
            .with_context(|| format!("the partition table `{text}`"))?;
        return Ok(table.partition);
    }
    let (kind, arg) = match text.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (text, None),
    };
    let alpha = || -> Result<f64> {
        let a: f64 = arg
            .context("give the concentration, e.g. dirichlet:0.5")?
            .parse()
            .context("the concentration must be a number")?;
        ensure!(a.is_finite() && a > 0.0, "the concentration must be positive");
        Ok(a)
    };
    Ok(match kind {
        "iid" => PartitionSpec::Iid { num_clients },
        "shards" => PartitionSpec::Shards {
            num_clients,
            shards_per_client: 2,
            label_pure: true,
        },
        "dirichlet" => PartitionSpec::Dirichlet {
            num_clients,
            alpha: alpha()?,
            min_samples: 1,
        },
        "quantity-skew" => PartitionSpec::QuantitySkew {
            num_clients,
            alpha: alpha()?,
            min_samples: 1,
        },
        other => bail!("unknown partitioner `{other}` (iid, shards, dirichlet:ALPHA, quantity-skew:ALPHA)"),
    })
}

/// The samples a device trains on.
pub struct LocalData {
    /// The dataset holding them.
    pub dataset: Arc<Dataset>,
    /// Their indices in it.
    pub indices: Vec<usize>,
}

impl DataSource {
    /// Loads the device's samples.
    pub fn load(&self) -> Result<LocalData> {
        match self {
            DataSource::Partition {
                dataset,
                data_dir,
                partition,
                index,
                seed,
            } => {
                ensure!(
                    *index < partition.num_clients(),
                    "--index {index} is not below --num-clients {}",
                    partition.num_clients()
                );
                let data = dataset
                    .load(data_dir.as_deref(), &SyntheticConfig::default())
                    .context("loading the local dataset")?;
                let split = partition
                    .partition(data.train.labels(), data.train.num_classes(), *seed)
                    .context("splitting the dataset")?;
                Ok(LocalData {
                    indices: split.client(*index).to_vec(),
                    dataset: Arc::new(data.train),
                })
            }
            DataSource::Idx { images, labels } => {
                let data = mnist::load_idx_pair(images, labels, &display_name(images))
                    .context("loading the IDX files")?;
                Ok(LocalData {
                    indices: (0..data.len()).collect(),
                    dataset: Arc::new(data),
                })
            }
        }
    }
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| "local".into(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_experiment_partition_table_parses_as_the_experiment_reads_it() {
        assert_eq!(
            parse_partition(
                "{ kind = \"shards\", num_clients = 100, shards_per_client = 3 }",
                1
            )
            .unwrap(),
            PartitionSpec::Shards {
                num_clients: 100,
                shards_per_client: 3,
                label_pure: true
            }
        );
        let err = parse_partition("{ kind = \"shards\" }", 1).unwrap_err();
        assert!(format!("{err:#}").contains("num_clients"), "{err:#}");
    }

    #[test]
    fn partitioners_parse_and_errors_say_what_is_wrong() {
        assert_eq!(
            parse_partition("iid", 5).unwrap(),
            PartitionSpec::Iid { num_clients: 5 }
        );
        assert!(matches!(
            parse_partition("dirichlet:0.3", 5).unwrap(),
            PartitionSpec::Dirichlet { alpha, .. } if alpha == 0.3
        ));
        assert!(
            parse_partition("dirichlet", 5)
                .unwrap_err()
                .to_string()
                .contains("concentration")
        );
        assert!(parse_partition("dirichlet:-1", 5).is_err());
        assert!(
            parse_partition("stripes", 5)
                .unwrap_err()
                .to_string()
                .contains("unknown")
        );
    }
}
