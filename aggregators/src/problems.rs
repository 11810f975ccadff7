//! The federated least-squares problem of ALGORITHMS.md §10.2: `f_i(x) = ‖A_i x − b_i‖² / (2 m)`
//! with client-specific targets, a known global optimum, and a gradient oracle per client.
//!
//! Client `i` holds `m` rows `A_i` (standard normal) and `b_i = A_i x_i*`, where
//! `x_i* = x* + h·z_i` drifts from a common `x*` by the heterogeneity `h`. The global objective is
//! the uniform mean `(1/N) Σ f_i`; its minimiser solves `(Σ A_iᵀA_i) x = Σ A_iᵀ b_i` (equal `m`).
//! Oracles give full-batch gradients (deterministic) or seeded minibatch gradients.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use shoal_core::{GradientOracle, OracleError, check_dims};

/// One client's rows and targets.
#[derive(Debug, Clone, PartialEq)]
pub struct LeastSquaresClient {
    rows: usize,
    dim: usize,
    a: Vec<f64>,
    b: Vec<f64>,
}

/// A heterogeneous federated least-squares problem.
#[derive(Debug, Clone, PartialEq)]
pub struct LeastSquaresProblem {
    /// The clients' data.
    pub clients: Vec<LeastSquaresClient>,
    dim: usize,
}

fn normal(rng: &mut impl Rng) -> f64 {
    StandardNormal.sample(rng)
}

impl LeastSquaresProblem {
    /// `num_clients` clients of `rows` rows in dimension `dim`, targets drifting by `heterogeneity`.
    pub fn generate(num_clients: usize, dim: usize, rows: usize, heterogeneity: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let common: Vec<f64> = (0..dim).map(|_| normal(&mut rng)).collect();
        let clients = (0..num_clients)
            .map(|_| {
                let target: Vec<f64> = common
                    .iter()
                    .map(|c| c + heterogeneity * normal(&mut rng))
                    .collect();
                let a: Vec<f64> = (0..rows * dim).map(|_| normal(&mut rng)).collect();
                let b = a
                    .chunks_exact(dim)
                    .map(|row| row.iter().zip(&target).map(|(a, t)| a * t).sum())
                    .collect();
                LeastSquaresClient { rows, dim, a, b }
            })
            .collect();
        Self { clients, dim }
    }

    /// Dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `(1/N) Σ f_i(x)`.
    pub fn loss(&self, x: &[f32]) -> f64 {
        self.clients.iter().map(|c| c.loss(x)).sum::<f64>() / self.clients.len() as f64
    }

    /// The minimiser of `(1/N) Σ f_i`, from the normal equations.
    pub fn optimum(&self) -> Vec<f64> {
        let d = self.dim;
        let mut m = vec![0.0; d * d];
        let mut r = vec![0.0; d];
        for c in &self.clients {
            for (row, &b) in c.a.chunks_exact(d).zip(&c.b) {
                for i in 0..d {
                    r[i] += row[i] * b;
                    for j in 0..d {
                        m[i * d + j] += row[i] * row[j];
                    }
                }
            }
        }
        solve(m, r, d)
    }

    /// A full-batch (deterministic) oracle for client `i`.
    pub fn full_batch_oracle(&self, i: usize) -> LeastSquaresOracle {
        LeastSquaresOracle::new(self.clients[i].clone(), None, 0)
    }

    /// A minibatch oracle for client `i`, sampling `batch` rows without replacement per step.
    pub fn minibatch_oracle(&self, i: usize, batch: usize, seed: u64) -> LeastSquaresOracle {
        LeastSquaresOracle::new(self.clients[i].clone(), Some(batch), seed)
    }
}

impl LeastSquaresClient {
    /// `‖A x − b‖² / (2 m)`.
    pub fn loss(&self, x: &[f32]) -> f64 {
        self.a
            .chunks_exact(self.dim)
            .zip(&self.b)
            .map(|(row, b)| {
                let r: f64 = row.iter().zip(x).map(|(a, x)| a * f64::from(*x)).sum::<f64>() - b;
                r * r
            })
            .sum::<f64>()
            / (2.0 * self.rows as f64)
    }
}

/// Gaussian elimination with partial pivoting for the small normal equations (`d` ≈ 20).
fn solve(mut m: Vec<f64>, mut r: Vec<f64>, d: usize) -> Vec<f64> {
    for col in 0..d {
        let pivot = (col..d)
            .max_by(|&a, &b| m[a * d + col].abs().total_cmp(&m[b * d + col].abs()))
            .unwrap_or(col);
        if pivot != col {
            for j in 0..d {
                m.swap(col * d + j, pivot * d + j);
            }
            r.swap(col, pivot);
        }
        let p = m[col * d + col];
        for row in col + 1..d {
            let f = m[row * d + col] / p;
            for j in col..d {
                m[row * d + j] -= f * m[col * d + j];
            }
            r[row] -= f * r[col];
        }
    }
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let s: f64 = (i + 1..d).map(|j| m[i * d + j] * x[j]).sum();
        x[i] = (r[i] - s) / m[i * d + i];
    }
    x
}

/// Gradients of one client's least-squares loss.
#[derive(Debug)]
pub struct LeastSquaresOracle {
    client: LeastSquaresClient,
    batch: Option<usize>,
    rng: StdRng,
    current: Vec<usize>,
}

impl LeastSquaresOracle {
    fn new(client: LeastSquaresClient, batch: Option<usize>, seed: u64) -> Self {
        let all = (0..client.rows).collect();
        Self {
            client,
            batch,
            rng: StdRng::seed_from_u64(seed),
            current: all,
        }
    }

    fn gradient_on(&self, rows: &[usize], x: &[f32], grad: &mut [f32]) -> f32 {
        let d = self.client.dim;
        let mut g = vec![0.0f64; d];
        let mut loss = 0.0;
        for &r in rows {
            let row = &self.client.a[r * d..(r + 1) * d];
            let residual: f64 =
                row.iter().zip(x).map(|(a, x)| a * f64::from(*x)).sum::<f64>() - self.client.b[r];
            loss += residual * residual;
            for (g, a) in g.iter_mut().zip(row) {
                *g += residual * a;
            }
        }
        let n = rows.len() as f64;
        for (out, g) in grad.iter_mut().zip(g) {
            *out = (g / n) as f32;
        }
        (loss / (2.0 * n)) as f32
    }
}

impl GradientOracle for LeastSquaresOracle {
    fn dim(&self) -> usize {
        self.client.dim
    }

    fn num_samples(&self) -> usize {
        self.client.rows
    }

    fn gradient(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError> {
        check_dims(self.client.dim, params, grad)?;
        if self.client.rows == 0 {
            return Err(OracleError::NoData);
        }
        if let Some(batch) = self.batch {
            let batch = batch.clamp(1, self.client.rows);
            self.current = sample(&mut self.rng, self.client.rows, batch).into_vec();
        }
        Ok(self.gradient_on(&self.current, params, grad))
    }

    fn gradient_same_batch(&mut self, params: &[f32], grad: &mut [f32]) -> Result<f32, OracleError> {
        check_dims(self.client.dim, params, grad)?;
        Ok(self.gradient_on(&self.current, params, grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_optimum_zeroes_the_mean_gradient() {
        let p = LeastSquaresProblem::generate(5, 6, 12, 1.0, 3);
        let x: Vec<f32> = p.optimum().iter().map(|&v| v as f32).collect();
        let mut mean = vec![0.0f64; 6];
        for i in 0..5 {
            let mut g = vec![0.0; 6];
            p.full_batch_oracle(i).gradient(&x, &mut g).unwrap();
            mean.iter_mut()
                .zip(&g)
                .for_each(|(m, g)| *m += f64::from(*g) / 5.0);
        }
        assert!(mean.iter().all(|g| g.abs() < 1e-4), "{mean:?}");
    }

    #[test]
    fn gradients_match_finite_differences_of_the_loss() {
        let p = LeastSquaresProblem::generate(2, 4, 8, 0.5, 1);
        let x = [0.3f32, -0.2, 0.1, 0.7];
        let mut g = vec![0.0; 4];
        p.full_batch_oracle(1).gradient(&x, &mut g).unwrap();
        for i in 0..4 {
            let (mut plus, mut minus) = (x, x);
            plus[i] += 1e-3;
            minus[i] -= 1e-3;
            let fd = (p.clients[1].loss(&plus) - p.clients[1].loss(&minus)) / 2e-3;
            assert!(
                (f64::from(g[i]) - fd).abs() < 1e-3 * fd.abs().max(1.0),
                "{} vs {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn minibatches_are_seeded_and_repeatable() {
        let p = LeastSquaresProblem::generate(1, 3, 20, 0.0, 0);
        let (mut a, mut b) = (p.minibatch_oracle(0, 4, 9), p.minibatch_oracle(0, 4, 9));
        let x = [0.1f32, 0.2, 0.3];
        let (mut ga, mut gb, mut again) = (vec![0.0; 3], vec![0.0; 3], vec![0.0; 3]);
        for _ in 0..5 {
            assert_eq!(a.gradient(&x, &mut ga).unwrap(), b.gradient(&x, &mut gb).unwrap());
            assert_eq!(ga, gb);
            a.gradient_same_batch(&x, &mut again).unwrap();
            assert_eq!(ga, again);
        }
    }
}
