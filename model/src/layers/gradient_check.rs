//! Finite-difference gradient checks shared by every layer's tests.
//!
//! The scalar probed is `L = Σ y ⊙ R` for a fixed random `R`, so the gradient fed into the backward
//! pass is `R` itself. Inputs are distinct values on a 0.01 grid, offset from zero by half a step,
//! so no finite-difference probe crosses a ReLU kink or swaps a max-pool winner.

use super::{Layer, LayerCache};
use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

const EPS: f32 = 1e-3;
const MAX_PROBES: usize = 300;

fn spaced_values(n: usize, rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|i| (i as f32 - (n / 2) as f32) * 0.01 + 0.005)
        .collect();
    v.shuffle(rng);
    v
}

fn probe(layer: &Layer, params: &[f32], x: &[f32], shape: &[usize], r: &[f32]) -> f64 {
    let input = ArrayD::from_shape_vec(IxDyn(shape), x.to_vec()).expect("probe shape");
    let y = layer.forward(params, input, &mut LayerCache::default(), false);
    y.iter().zip(r).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

fn probe_indices(n: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(rng);
    idx.truncate(MAX_PROBES);
    idx
}

/// Asserts an analytic derivative matches a finite-difference estimate, relative to their size.
pub(crate) fn assert_close(what: &str, i: usize, analytic: f32, numeric: f64) {
    let scale = 1.0f64.max(f64::from(analytic).abs()).max(numeric.abs());
    assert!(
        (f64::from(analytic) - numeric).abs() <= 1e-2 * scale,
        "{what}[{i}]: analytic {analytic} vs finite difference {numeric}"
    );
}

/// Checks a layer's parameter and input gradients against central differences.
pub(crate) fn check_layer(layer: &Layer, sample_shape: &[usize], batch: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n_params: usize = layer
        .param_specs()
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let params: Vec<f32> = (0..n_params).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut shape = vec![batch];
    shape.extend_from_slice(sample_shape);
    let x = spaced_values(shape.iter().product(), &mut rng);
    let out_sample = layer
        .output_shape(sample_shape)
        .expect("test shape fits the layer");
    let mut out_shape = vec![batch];
    out_shape.extend_from_slice(&out_sample);
    let r: Vec<f32> = (0..out_shape.iter().product())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();

    let mut cache = LayerCache::default();
    let input = ArrayD::from_shape_vec(IxDyn(&shape), x.clone()).expect("input shape");
    let y = layer.forward(&params, input, &mut cache, true);
    assert_eq!(y.shape(), out_shape.as_slice(), "forward output shape");
    let grad_out = ArrayD::from_shape_vec(IxDyn(&out_shape), r.clone()).expect("grad shape");
    let mut grads = vec![f32::NAN; n_params];
    let dx = layer
        .backward(&params, &mut cache, grad_out, &mut grads, true)
        .expect("input gradient requested");
    assert_eq!(dx.shape(), shape.as_slice(), "input gradient shape");

    let probe_params = |p: &[f32]| probe(layer, p, &x, &shape, &r);
    check_coordinates("param", &params, &grads, &mut rng, probe_params);
    let probe_input = |xp: &[f32]| probe(layer, &params, xp, &shape, &r);
    check_coordinates(
        "input",
        &x,
        dx.as_slice().expect("contiguous"),
        &mut rng,
        probe_input,
    );
}

/// Compares `analytic[i]` with the central difference of `f` along coordinate `i` of `point`, for
/// up to `MAX_PROBES` random coordinates.
pub(crate) fn check_coordinates(
    what: &str,
    point: &[f32],
    analytic: &[f32],
    rng: &mut StdRng,
    f: impl Fn(&[f32]) -> f64,
) {
    for i in probe_indices(point.len(), rng) {
        let mut p = point.to_vec();
        p[i] = point[i] + EPS;
        let plus = f(&p);
        p[i] = point[i] - EPS;
        let minus = f(&p);
        assert_close(what, i, analytic[i], (plus - minus) / (2.0 * f64::from(EPS)));
    }
}
