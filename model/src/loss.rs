//! Softmax cross-entropy over a batch of logits, with its gradient.

use ndarray::{ArrayD, IxDyn};

/// Loss statistics of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLoss {
    /// Mean cross-entropy over the batch (natural log).
    pub mean_loss: f32,
    /// Samples whose arg-max logit equals the label.
    pub correct: usize,
}

/// Softmax cross-entropy of `logits` (`[batch, classes]`) against `labels`.
///
/// Returns the batch statistics and, when `with_grad` is set, the gradient of the *mean* loss with
/// respect to the logits, `(softmax − onehot) / batch`. Labels must be below the class count (the
/// datasets check this when they load).
pub fn softmax_cross_entropy(
    logits: &ArrayD<f32>,
    labels: &[u32],
    with_grad: bool,
) -> (BatchLoss, Option<ArrayD<f32>>) {
    let classes = logits.shape()[1];
    let batch = labels.len();
    let z = logits.as_slice().expect("logits are kept in standard layout");
    let mut grad = with_grad.then(|| vec![0.0f32; z.len()]);
    let mut total = 0.0f64;
    let mut correct = 0;
    for (n, row) in z.chunks_exact(classes).enumerate() {
        let label = labels[n] as usize;
        let (argmax, max) =
            row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
            );
        if argmax == label {
            correct += 1;
        }
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        let log_sum = sum.ln();
        total += log_sum - f64::from(row[label] - max);
        if let Some(g) = grad.as_mut() {
            let scale = 1.0 / batch as f64;
            for (i, (gi, &v)) in g[n * classes..(n + 1) * classes].iter_mut().zip(row).enumerate() {
                let p = (f64::from(v - max) - log_sum).exp();
                let target = if i == label { 1.0 } else { 0.0 };
                *gi = ((p - target) * scale) as f32;
            }
        }
    }
    let stats = BatchLoss {
        mean_loss: (total / batch.max(1) as f64) as f32,
        correct,
    };
    let grad =
        grad.map(|g| ArrayD::from_shape_vec(IxDyn(&[batch, classes]), g).expect("loss gradient shape"));
    (stats, grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradient_check::assert_close;

    #[test]
    fn uniform_logits_give_log_classes() {
        let logits = ArrayD::zeros(IxDyn(&[3, 10]));
        let (stats, _) = softmax_cross_entropy(&logits, &[0, 4, 9], false);
        assert!((stats.mean_loss - 10f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn huge_logits_stay_finite() {
        let logits = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![1e30, -1e30, 0.0]).unwrap();
        let (stats, grad) = softmax_cross_entropy(&logits, &[1], true);
        assert!(stats.mean_loss.is_finite());
        assert!(grad.unwrap().iter().all(|g| g.is_finite()));
        assert_eq!(stats.correct, 0);
    }

    #[test]
    fn loss_gradient_matches_finite_differences() {
        let z: Vec<f32> = (0..12).map(|i| ((i * 37) % 11) as f32 / 3.0 - 1.5).collect();
        let labels = [2, 0, 3];
        let logits = ArrayD::from_shape_vec(IxDyn(&[3, 4]), z.clone()).unwrap();
        let (_, grad) = softmax_cross_entropy(&logits, &labels, true);
        let grad = grad.unwrap();
        let eps = 1e-3f32;
        for i in 0..z.len() {
            let mut zp = z.clone();
            zp[i] += eps;
            let plus = softmax_cross_entropy(
                &ArrayD::from_shape_vec(IxDyn(&[3, 4]), zp.clone()).unwrap(),
                &labels,
                false,
            )
            .0;
            zp[i] -= 2.0 * eps;
            let minus = softmax_cross_entropy(
                &ArrayD::from_shape_vec(IxDyn(&[3, 4]), zp).unwrap(),
                &labels,
                false,
            )
            .0;
            let numeric = (f64::from(plus.mean_loss) - f64::from(minus.mean_loss)) / (2.0 * f64::from(eps));
            assert_close("logit", i, grad.as_slice().unwrap()[i], numeric);
        }
    }
}
