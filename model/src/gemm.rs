//! Matrix multiply on row-major slices, the one place where layers spend their arithmetic.
//!
//! Dense and convolution layers (through im2col) reduce forward and backward passes to calls of
//! [`gemm`], which views the flat buffers as ndarray matrices and hands them to ndarray's
//! `general_mat_mul` (matrixmultiply's blocked, multi-threaded sgemm).

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// Whether an operand is used as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Use the matrix as stored.
    N,
    /// Use its transpose.
    T,
}

/// A row-major matrix operand: data, stored rows and columns, and how to use it.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    /// Row-major values, `rows * cols` of them.
    pub data: &'a [f32],
    /// Stored rows.
    pub rows: usize,
    /// Stored columns.
    pub cols: usize,
    /// As stored or transposed.
    pub op: Op,
}

impl<'a> Mat<'a> {
    /// The matrix as stored.
    pub fn n(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            op: Op::N,
        }
    }

    /// The transpose of the stored matrix.
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            op: Op::T,
        }
    }

    fn view(self) -> ArrayView2<'a, f32> {
        let view = ArrayView2::from_shape((self.rows, self.cols), self.data)
            .expect("gemm operand length must equal rows * cols");
        match self.op {
            Op::N => view,
            Op::T => view.reversed_axes(),
        }
    }
}

/// `c = alpha · a · b + beta · c`, with `c` a row-major `m × n` buffer.
pub fn gemm(alpha: f32, a: Mat<'_>, b: Mat<'_>, beta: f32, c: &mut [f32], m: usize, n: usize) {
    let a = a.view();
    let b = b.view();
    let mut c = ArrayViewMut2::from_shape((m, n), c).expect("gemm output length must equal m * n");
    general_mat_mul(alpha, &a, &b, beta, &mut c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = x[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn all_transpose_combinations_match_the_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let expected = naive(&a, &b, m, k, n);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (lhs, rhs) in [
            (Mat::n(&a, m, k), Mat::n(&b, k, n)),
            (Mat::t(&at, k, m), Mat::n(&b, k, n)),
            (Mat::n(&a, m, k), Mat::t(&bt, n, k)),
            (Mat::t(&at, k, m), Mat::t(&bt, n, k)),
        ] {
            let mut c = vec![1.0; m * n];
            gemm(1.0, lhs, rhs, 0.0, &mut c, m, n);
            for (x, y) in c.iter().zip(&expected) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        // beta = 1 accumulates.
        let mut c = expected.clone();
        gemm(2.0, Mat::n(&a, m, k), Mat::n(&b, k, n), 1.0, &mut c, m, n);
        for (x, y) in c.iter().zip(&expected) {
            assert!((x - 3.0 * y).abs() < 1e-4);
        }
    }
}
