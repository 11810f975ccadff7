//! The synthetic federated benchmark of FedProx (Li et al., 2020) and LEAF: synthetic(α, β).
//!
//! Every client `k` has its own softmax-regression model and its own input distribution:
//! `u_k ~ N(0, α²)`, `W_k ~ N(u_k, 1)` (`dim × classes`), `b_k ~ N(u_k, 1)`; `B_k ~ N(0, β²)`,
//! `v_k ~ N(B_k, 1)` per coordinate; inputs `x ~ N(v_k, Σ)` with `Σ = diag(j^-1.2)`; labels
//! `y = argmax(W_kᵀ x + b_k)`. α controls how much the local models differ, β how much the local
//! inputs differ. Client sizes follow FedProx: `⌊lognormal(4, 2)⌋ + 50`. Each client's samples are
//! split 90 / 10 into train and test, as in FedProx. Needs no download: it is generated from a seed.

use super::partition::Partition;
use super::{Dataset, TrainTest};
use crate::error::DataError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Parameters of synthetic(α, β).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Spread of the clients' models (FedProx: 0, 0.5, 1).
    pub alpha: f64,
    /// Spread of the clients' input distributions (FedProx: 0, 0.5, 1).
    pub beta: f64,
    /// Number of clients (FedProx: 30).
    pub num_clients: usize,
    /// Input dimension (FedProx: 60).
    pub dim: usize,
    /// Number of classes (FedProx: 10).
    pub classes: usize,
    /// Fraction of each client's samples held out for testing (FedProx: 0.1).
    pub test_fraction: f64,
    /// Seed of every random draw.
    pub seed: u64,
}

/// Most clients, input dimensions or classes a synthetic set may have.
pub const MAX_SYNTHETIC_SIZE: usize = 100_000;
/// Most `num_clients × dim`: the set takes about 150 samples per client of `dim` floats, so this
/// bounds it near 1 GiB.
pub const MAX_SYNTHETIC_CLIENT_DIMS: usize = 2_000_000;

impl SyntheticConfig {
    /// Checks the parameters: finite non-negative α and β, sizes within their bounds, a test
    /// fraction in [0, 1). The error names the parameter and its bound.
    pub fn check(&self) -> Result<(), DataError> {
        let invalid = |m: String| Err(DataError::InvalidConfig(format!("synthetic: {m}")));
        if !(self.alpha >= 0.0 && self.beta >= 0.0 && self.alpha.is_finite() && self.beta.is_finite()) {
            return invalid("alpha and beta must be finite and non-negative".into());
        }
        for (name, value, least) in [
            ("num_clients", self.num_clients, 1),
            ("dim", self.dim, 1),
            ("classes", self.classes, 2),
        ] {
            if !(least..=MAX_SYNTHETIC_SIZE).contains(&value) {
                return invalid(format!(
                    "{name} must be between {least} and {MAX_SYNTHETIC_SIZE}, got {value}"
                ));
            }
        }
        if self.num_clients * self.dim > MAX_SYNTHETIC_CLIENT_DIMS {
            return invalid(format!(
                "num_clients × dim must be at most {MAX_SYNTHETIC_CLIENT_DIMS} (about 1 GiB of samples), got {} × {}",
                self.num_clients, self.dim
            ));
        }
        if !(0.0..1.0).contains(&self.test_fraction) {
            return invalid("test_fraction must be in [0, 1)".into());
        }
        Ok(())
    }
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: 1.0,
            num_clients: 30,
            dim: 60,
            classes: 10,
            test_fraction: 0.1,
            seed: 0,
        }
    }
}

fn normal(rng: &mut impl Rng, mean: f64, std: f64) -> f64 {
    let z: f64 = StandardNormal.sample(rng);
    mean + std * z
}

/// Generates synthetic(α, β): train and test sets, with each client's training indices as the
/// natural partition.
pub fn generate(cfg: &SyntheticConfig) -> Result<TrainTest, DataError> {
    cfg.check()?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (dim, classes) = (cfg.dim, cfg.classes);
    let sizes: Vec<usize> = (0..cfg.num_clients)
        .map(|_| normal(&mut rng, 4.0, 2.0).exp().min(1e6) as usize + 50)
        .collect();
    let model_means: Vec<f64> = (0..cfg.num_clients)
        .map(|_| normal(&mut rng, 0.0, cfg.alpha))
        .collect();
    let input_shifts: Vec<f64> = (0..cfg.num_clients)
        .map(|_| normal(&mut rng, 0.0, cfg.beta))
        .collect();
    let stds: Vec<f64> = (1..=dim).map(|j| (j as f64).powf(-1.2).sqrt()).collect();

    let (mut train_x, mut train_y, mut test_x, mut test_y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut clients = Vec::with_capacity(cfg.num_clients);
    for k in 0..cfg.num_clients {
        let centre: Vec<f64> = (0..dim).map(|_| normal(&mut rng, input_shifts[k], 1.0)).collect();
        let weight: Vec<f64> = (0..dim * classes)
            .map(|_| normal(&mut rng, model_means[k], 1.0))
            .collect();
        let bias: Vec<f64> = (0..classes)
            .map(|_| normal(&mut rng, model_means[k], 1.0))
            .collect();
        let train_len = ((1.0 - cfg.test_fraction) * sizes[k] as f64) as usize;
        let mut indices = Vec::with_capacity(train_len);
        for s in 0..sizes[k] {
            let x: Vec<f64> = (0..dim).map(|j| normal(&mut rng, centre[j], stds[j])).collect();
            let label = (0..classes)
                .map(|c| bias[c] + (0..dim).map(|j| x[j] * weight[j * classes + c]).sum::<f64>())
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |best, (c, v)| if v > best.1 { (c, v) } else { best },
                )
                .0 as u32;
            if s < train_len {
                indices.push(train_y.len());
                train_x.extend(x.iter().map(|&v| v as f32));
                train_y.push(label);
            } else {
                test_x.extend(x.iter().map(|&v| v as f32));
                test_y.push(label);
            }
        }
        clients.push(indices);
    }
    let name = format!("synthetic({},{})", cfg.alpha, cfg.beta);
    Ok(TrainTest {
        train: Dataset::new(format!("{name}-train"), vec![dim], classes, train_x, train_y)?,
        test: Dataset::new(format!("{name}-test"), vec![dim], classes, test_x, test_y)?,
        natural_partition: Some(Partition::new(clients)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_federated() {
        let cfg = SyntheticConfig {
            num_clients: 8,
            seed: 3,
            ..SyntheticConfig::default()
        };
        let a = generate(&cfg).unwrap();
        let b = generate(&cfg).unwrap();
        assert_eq!(a.train, b.train);
        let parts = a.natural_partition.as_ref().unwrap();
        assert_eq!(parts.num_clients(), 8);
        assert_eq!(parts.total(), a.train.len());
        assert!(parts.sizes().iter().all(|&s| s >= 45));
        assert_eq!(a.train.sample_shape(), &[60]);
        let c = generate(&SyntheticConfig { seed: 4, ..cfg }).unwrap();
        assert_ne!(a.train, c.train);
    }

    #[test]
    fn larger_alpha_and_beta_make_clients_more_different() {
        // Mean distance between client label histograms grows with heterogeneity.
        let spread = |alpha: f64, beta: f64| {
            let data = generate(&SyntheticConfig {
                alpha,
                beta,
                num_clients: 20,
                seed: 1,
                ..Default::default()
            })
            .unwrap();
            let parts = data.natural_partition.unwrap();
            let hist = parts.label_distributions(data.train.labels(), 10);
            let mean: Vec<f64> = (0..10)
                .map(|c| hist.iter().map(|h| h[c]).sum::<f64>() / hist.len() as f64)
                .collect();
            hist.iter()
                .map(|h| h.iter().zip(&mean).map(|(a, b)| (a - b).abs()).sum::<f64>())
                .sum::<f64>()
                / hist.len() as f64
        };
        assert!(
            spread(1.0, 1.0) > spread(0.0, 0.0),
            "{} vs {}",
            spread(1.0, 1.0),
            spread(0.0, 0.0)
        );
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        assert!(
            generate(&SyntheticConfig {
                alpha: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            generate(&SyntheticConfig {
                num_clients: 0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            generate(&SyntheticConfig {
                test_fraction: 1.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}
