//! Partitioners: how a training set is split across clients.
//!
//! Every partitioner is deterministic in its seed and assigns every sample to exactly one client.
//! - `iid`: shuffle, then near-equal contiguous chunks.
//! - `shards`: the FedAvg paper's pathological split: sort by label, cut into
//!   `num_clients · shards_per_client` shards, deal `shards_per_client` random shards to each
//!   client. By default shards are cut inside each label (shard counts per label proportional to
//!   the label's frequency), so a client with 2 shards holds at most 2 labels; `label_pure = false`
//!   cuts the sorted order into equal shards exactly as the paper does, where a shard may straddle
//!   two labels.
//! - `dirichlet`: label skew; for each class, proportions over clients drawn from Dirichlet(α).
//!   Small α gives each client few classes, large α approaches IID. Redrawn until every client has
//!   `min_samples`.
//! - `quantity_skew`: client sizes drawn from Dirichlet(α) over clients; labels stay IID.

use crate::error::DataError;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// How to partition, as written in an experiment file (`kind = "dirichlet"`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PartitionSpec {
    /// Uniformly at random, equal sizes.
    Iid {
        /// Number of clients.
        num_clients: usize,
    },
    /// FedAvg's pathological non-IID shards.
    Shards {
        /// Number of clients.
        num_clients: usize,
        /// Shards per client (FedAvg: 2).
        #[serde(default = "default_shards_per_client")]
        shards_per_client: usize,
        /// Cut shards inside labels so no shard mixes two labels.
        #[serde(default = "default_true")]
        label_pure: bool,
    },
    /// Dirichlet(α) label skew.
    Dirichlet {
        /// Number of clients.
        num_clients: usize,
        /// Concentration; small is skewed.
        alpha: f64,
        /// Minimum samples per client; proportions are redrawn until it holds.
        #[serde(default = "default_min_samples")]
        min_samples: usize,
    },
    /// Dirichlet(α) client sizes, IID labels.
    QuantitySkew {
        /// Number of clients.
        num_clients: usize,
        /// Concentration; small gives very unequal sizes.
        alpha: f64,
        /// Minimum samples per client; sizes are redrawn until it holds.
        #[serde(default = "default_min_samples")]
        min_samples: usize,
    },
}

fn default_shards_per_client() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_min_samples() -> usize {
    1
}

/// Redraws allowed before a Dirichlet partitioner gives up on `min_samples`.
const MAX_DRAWS: usize = 1000;

/// Each client's sample indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    clients: Vec<Vec<usize>>,
}

impl Partition {
    /// Wraps per-client index lists.
    pub fn new(clients: Vec<Vec<usize>>) -> Self {
        Self { clients }
    }

    /// Number of clients.
    pub fn num_clients(&self) -> usize {
        self.clients.len()
    }

    /// Client `i`'s sample indices.
    pub fn client(&self, i: usize) -> &[usize] {
        &self.clients[i]
    }

    /// All clients' index lists.
    pub fn clients(&self) -> &[Vec<usize>] {
        &self.clients
    }

    /// Samples per client.
    pub fn sizes(&self) -> Vec<usize> {
        self.clients.iter().map(Vec::len).collect()
    }

    /// Samples over all clients.
    pub fn total(&self) -> usize {
        self.clients.iter().map(Vec::len).sum()
    }

    /// Per client, the fraction of its samples in each class.
    pub fn label_distributions(&self, labels: &[u32], classes: usize) -> Vec<Vec<f64>> {
        self.clients
            .iter()
            .map(|idx| {
                let mut h = vec![0.0; classes];
                for &i in idx {
                    h[labels[i] as usize] += 1.0;
                }
                let n = idx.len().max(1) as f64;
                h.iter_mut().for_each(|v| *v /= n);
                h
            })
            .collect()
    }
}

impl PartitionSpec {
    /// Number of clients the spec asks for.
    pub fn num_clients(&self) -> usize {
        match self {
            PartitionSpec::Iid { num_clients }
            | PartitionSpec::Shards { num_clients, .. }
            | PartitionSpec::Dirichlet { num_clients, .. }
            | PartitionSpec::QuantitySkew { num_clients, .. } => *num_clients,
        }
    }

    /// Splits samples with these `labels` (each below `classes`) across clients.
    pub fn partition(&self, labels: &[u32], classes: usize, seed: u64) -> Result<Partition, DataError> {
        let n = labels.len();
        let clients = self.num_clients();
        if clients == 0 || clients > n {
            return Err(DataError::Partition(format!(
                "cannot split {n} samples across {clients} clients"
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut parts = match *self {
            PartitionSpec::Iid { num_clients } => {
                let mut all: Vec<usize> = (0..n).collect();
                all.shuffle(&mut rng);
                equal_chunks(&all, num_clients)
            }
            PartitionSpec::Shards {
                num_clients,
                shards_per_client,
                label_pure,
            } => shards(
                labels,
                classes,
                num_clients,
                shards_per_client,
                label_pure,
                &mut rng,
            )?,
            PartitionSpec::Dirichlet {
                num_clients,
                alpha,
                min_samples,
            } => {
                check_alpha(alpha)?;
                let by_class = indices_by_class(labels, classes);
                redraw_until(min_samples, || {
                    let mut parts = vec![Vec::new(); num_clients];
                    for class in &by_class {
                        let mut class = class.clone();
                        class.shuffle(&mut rng);
                        let p = dirichlet(alpha, num_clients, &mut rng);
                        for (client, chunk) in split_by_proportions(&class, &p).into_iter().enumerate() {
                            parts[client].extend(chunk);
                        }
                    }
                    parts
                })?
            }
            PartitionSpec::QuantitySkew {
                num_clients,
                alpha,
                min_samples,
            } => {
                check_alpha(alpha)?;
                redraw_until(min_samples, || {
                    let mut all: Vec<usize> = (0..n).collect();
                    all.shuffle(&mut rng);
                    let p = dirichlet(alpha, num_clients, &mut rng);
                    split_by_proportions(&all, &p)
                })?
            }
        };
        for part in &mut parts {
            part.sort_unstable();
        }
        Ok(Partition::new(parts))
    }
}

fn check_alpha(alpha: f64) -> Result<(), DataError> {
    if alpha > 0.0 && alpha.is_finite() {
        Ok(())
    } else {
        Err(DataError::Partition(format!(
            "Dirichlet concentration must be positive and finite, got {alpha}"
        )))
    }
}

fn redraw_until(
    min_samples: usize,
    mut draw: impl FnMut() -> Vec<Vec<usize>>,
) -> Result<Vec<Vec<usize>>, DataError> {
    for _ in 0..MAX_DRAWS {
        let parts = draw();
        if parts.iter().all(|p| p.len() >= min_samples) {
            return Ok(parts);
        }
    }
    Err(DataError::Partition(format!(
        "no draw in {MAX_DRAWS} gave every client at least {min_samples} samples; raise alpha or lower min_samples"
    )))
}

fn indices_by_class(labels: &[u32], classes: usize) -> Vec<Vec<usize>> {
    let mut by_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    by_class
}

/// `parts` near-equal contiguous chunks (sizes differ by at most one); none when `parts` is 0.
fn equal_chunks(items: &[usize], parts: usize) -> Vec<Vec<usize>> {
    if parts == 0 {
        return Vec::new();
    }
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        out.push(items[start..start + len].to_vec());
        start += len;
    }
    out
}

/// A Dirichlet(α·1) draw over `k` outcomes, through normalised Gamma(α, 1) samples.
fn dirichlet(alpha: f64, k: usize, rng: &mut impl Rng) -> Vec<f64> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha was checked positive and finite");
    let mut p: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|v| *v /= sum);
    } else {
        // Every draw underflowed (tiny α): the limit of Dirichlet is a point mass on one outcome.
        let winner = rng.random_range(0..k);
        p.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = f64::from(u8::from(i == winner)));
    }
    p
}

/// Cuts `items` into consecutive pieces whose sizes follow the proportions `p`.
fn split_by_proportions(items: &[usize], p: &[f64]) -> Vec<Vec<usize>> {
    let n = items.len();
    let mut out = Vec::with_capacity(p.len());
    let (mut cumulative, mut start) = (0.0, 0);
    for (i, &share) in p.iter().enumerate() {
        cumulative += share;
        let end = if i + 1 == p.len() {
            n
        } else {
            ((cumulative * n as f64).round() as usize).clamp(start, n)
        };
        out.push(items[start..end].to_vec());
        start = end;
    }
    out
}

fn shards(
    labels: &[u32],
    classes: usize,
    clients: usize,
    per_client: usize,
    label_pure: bool,
    rng: &mut StdRng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let total_shards = clients * per_client;
    let n = labels.len();
    if per_client == 0 || total_shards > n {
        return Err(DataError::Partition(format!(
            "{clients} clients × {per_client} shards needs between 1 and {n} shards"
        )));
    }
    let by_class = indices_by_class(labels, classes);
    let mut shard_list: Vec<Vec<usize>> = if label_pure {
        let counts: Vec<usize> = by_class.iter().map(Vec::len).collect();
        let per_class = shards_per_class(&counts, total_shards)?;
        by_class
            .iter()
            .zip(per_class)
            .flat_map(|(idx, k)| equal_chunks(idx, k))
            .collect()
    } else {
        let sorted: Vec<usize> = by_class.concat();
        equal_chunks(&sorted, total_shards)
    };
    shard_list.shuffle(rng);
    Ok(shard_list
        .chunks(per_client)
        .map(|group| group.concat())
        .collect())
}

/// Splits `total` shards over classes in proportion to their counts (largest remainder), giving
/// every non-empty class at least one shard and none more shards than samples.
fn shards_per_class(counts: &[usize], total: usize) -> Result<Vec<usize>, DataError> {
    let non_empty = counts.iter().filter(|&&c| c > 0).count();
    if total < non_empty {
        return Err(DataError::Partition(format!(
            "label-pure shards need at least one shard per label: {total} shards for {non_empty} labels \
             (use more clients or shards, or label_pure = false)"
        )));
    }
    let n: usize = counts.iter().sum();
    let quota: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64 * total as f64 / n as f64)
        .collect();
    let mut alloc: Vec<usize> = counts
        .iter()
        .zip(&quota)
        .map(|(&c, &q)| {
            if c == 0 {
                0
            } else {
                (q.floor() as usize).clamp(1, c)
            }
        })
        .collect();
    let mut assigned: usize = alloc.iter().sum();
    while assigned > total {
        // Take from the class furthest above its quota that can spare one.
        let i = (0..counts.len())
            .filter(|&i| alloc[i] > 1)
            .max_by(|&a, &b| (alloc[a] as f64 - quota[a]).total_cmp(&(alloc[b] as f64 - quota[b])))
            .expect("total ≥ non-empty classes, so some class holds more than one shard");
        alloc[i] -= 1;
        assigned -= 1;
    }
    while assigned < total {
        // Give to the class furthest below its quota that still has samples to spare.
        let i = (0..counts.len())
            .filter(|&i| alloc[i] < counts[i])
            .max_by(|&a, &b| (quota[a] - alloc[a] as f64).total_cmp(&(quota[b] - alloc[b] as f64)))
            .expect("total ≤ samples, so some class can take another shard");
        alloc[i] += 1;
        assigned += 1;
    }
    Ok(alloc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_exact_cover(p: &Partition, n: usize) {
        let mut seen = vec![0u32; n];
        for client in p.clients() {
            for &i in client {
                seen[i] += 1;
            }
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "some sample is missing or assigned twice"
        );
    }

    fn labels(n: usize, classes: u32, seed: u64) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..classes)).collect()
    }

    fn specs(clients: usize) -> Vec<PartitionSpec> {
        vec![
            PartitionSpec::Iid { num_clients: clients },
            PartitionSpec::Shards {
                num_clients: clients,
                shards_per_client: 2,
                label_pure: true,
            },
            PartitionSpec::Shards {
                num_clients: clients,
                shards_per_client: 2,
                label_pure: false,
            },
            PartitionSpec::Dirichlet {
                num_clients: clients,
                alpha: 0.5,
                min_samples: 0,
            },
            PartitionSpec::QuantitySkew {
                num_clients: clients,
                alpha: 1.0,
                min_samples: 0,
            },
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_sample_is_assigned_exactly_once(n in 40usize..400, clients in 5usize..20, seed in 0u64..1000) {
            let y = labels(n, 10, seed);
            for spec in specs(clients) {
                let p = spec.partition(&y, 10, seed).unwrap();
                prop_assert_eq!(p.num_clients(), clients);
                assert_exact_cover(&p, n);
            }
        }

        #[test]
        fn two_label_pure_shards_hold_at_most_two_labels(n in 100usize..600, clients in 5usize..40, seed in 0u64..1000) {
            let y = labels(n, 10, seed);
            let spec = PartitionSpec::Shards { num_clients: clients, shards_per_client: 2, label_pure: true };
            let p = spec.partition(&y, 10, seed).unwrap();
            for dist in p.label_distributions(&y, 10) {
                prop_assert!(dist.iter().filter(|&&f| f > 0.0).count() <= 2);
            }
        }
    }

    #[test]
    fn fedavg_shards_on_mnist_sized_labels() {
        // 60,000 samples, 100 clients × 2 shards: 200 shards of about 300.
        let y = labels(60_000, 10, 1);
        let spec = PartitionSpec::Shards {
            num_clients: 100,
            shards_per_client: 2,
            label_pure: true,
        };
        let p = spec.partition(&y, 10, 7).unwrap();
        assert_exact_cover(&p, 60_000);
        assert!(
            p.sizes().iter().all(|&s| (560..=640).contains(&s)),
            "{:?}",
            p.sizes()
        );
    }

    #[test]
    fn labels_absent_from_the_data_get_no_shards() {
        // Classes 3..10 never occur: the shard allocation must skip them, not divide by zero.
        let y: Vec<u32> = (0..60).map(|i| i % 3).collect();
        let spec = PartitionSpec::Shards {
            num_clients: 6,
            shards_per_client: 2,
            label_pure: true,
        };
        let p = spec.partition(&y, 10, 1).unwrap();
        assert_exact_cover(&p, 60);
    }

    #[test]
    fn iid_sizes_differ_by_at_most_one() {
        let p = PartitionSpec::Iid { num_clients: 7 }
            .partition(&labels(100, 3, 0), 3, 0)
            .unwrap();
        let sizes = p.sizes();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
    }

    fn mean_max_label_share(alpha: f64) -> f64 {
        let y = labels(20_000, 10, 3);
        let spec = PartitionSpec::Dirichlet {
            num_clients: 20,
            alpha,
            min_samples: 1,
        };
        let dists = spec.partition(&y, 10, 11).unwrap().label_distributions(&y, 10);
        dists
            .iter()
            .map(|d| d.iter().cloned().fold(0.0, f64::max))
            .sum::<f64>()
            / dists.len() as f64
    }

    #[test]
    fn small_dirichlet_alpha_is_skewed_and_large_alpha_is_near_uniform() {
        let skewed = mean_max_label_share(0.05);
        let uniform = mean_max_label_share(1000.0);
        assert!(skewed > 0.6, "α = 0.05: mean largest label share {skewed}");
        assert!(
            uniform < 0.15,
            "α = 1000: mean largest label share {uniform} (uniform is 0.1)"
        );
    }

    #[test]
    fn quantity_skew_varies_sizes_but_not_labels() {
        let y = labels(20_000, 10, 5);
        let spec = PartitionSpec::QuantitySkew {
            num_clients: 10,
            alpha: 0.3,
            min_samples: 50,
        };
        let p = spec.partition(&y, 10, 2).unwrap();
        let sizes = p.sizes();
        assert!(
            *sizes.iter().max().unwrap() > 4 * *sizes.iter().min().unwrap(),
            "{sizes:?}"
        );
        assert!(sizes.iter().all(|&s| s >= 50));
        let largest = sizes.iter().enumerate().max_by_key(|(_, s)| **s).unwrap().0;
        let dist = &p.label_distributions(&y, 10)[largest];
        assert!(dist.iter().all(|&f| (f - 0.1).abs() < 0.03), "{dist:?}");
    }

    #[test]
    fn partitions_are_deterministic_in_the_seed() {
        let y = labels(500, 10, 9);
        for spec in specs(8) {
            assert_eq!(
                spec.partition(&y, 10, 4).unwrap(),
                spec.partition(&y, 10, 4).unwrap()
            );
            assert_ne!(
                spec.partition(&y, 10, 4).unwrap(),
                spec.partition(&y, 10, 5).unwrap(),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn impossible_requests_are_errors() {
        let y = labels(10, 10, 0);
        assert!(
            PartitionSpec::Iid { num_clients: 11 }
                .partition(&y, 10, 0)
                .is_err()
        );
        assert!(
            PartitionSpec::Dirichlet {
                num_clients: 2,
                alpha: 0.0,
                min_samples: 1
            }
            .partition(&y, 10, 0)
            .is_err()
        );
        assert!(
            PartitionSpec::Dirichlet {
                num_clients: 5,
                alpha: 0.01,
                min_samples: 5
            }
            .partition(&y, 10, 0)
            .is_err()
        );
        let shards = PartitionSpec::Shards {
            num_clients: 2,
            shards_per_client: 2,
            label_pure: true,
        };
        assert!(shards.partition(&labels(100, 10, 0), 10, 0).is_err());
    }

    #[test]
    fn specs_read_from_toml() {
        let spec: PartitionSpec =
            toml::from_str("kind = \"dirichlet\"\nnum_clients = 10\nalpha = 0.3").unwrap();
        assert_eq!(
            spec,
            PartitionSpec::Dirichlet {
                num_clients: 10,
                alpha: 0.3,
                min_samples: 1
            }
        );
        assert!(toml::from_str::<PartitionSpec>("kind = \"shards\"\nnum_clients = 1\ntypo = 1").is_err());
    }
}
