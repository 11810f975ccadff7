//! The compressing rules with real codecs: SCALLION with an unbiased chain (rand-k) and SCAFCOM
//! with a biased one (top-k) reach the optimum of the heterogeneous least-squares problem, the
//! codec plugged in through the core `Compressor` trait.

use shoal_aggregators::problems::LeastSquaresProblem;
use shoal_aggregators::rules::scallion::AlphaPlacement;
use shoal_aggregators::{ApplyContext, ClientState, LocalTask, RuleConfig};
use shoal_compression::CodecCompressor;
use shoal_core::{LayoutBuilder, SegmentKind};
use std::sync::Arc;

const N: usize = 8;
const D: usize = 20;

fn optimality_gap(rule: RuleConfig, codec: &str, rounds: usize) -> (f64, f64) {
    let problem = LeastSquaresProblem::generate(N, D, 30, 1.0, 42);
    let mut b = LayoutBuilder::new();
    b.push("w", &[1, D], SegmentKind::Trainable)
        .expect("valid layout");
    let layout = Arc::new(b.build());
    let algorithm = rule.build().expect("valid rule");
    let mut state = algorithm.server.init_state(vec![0.0; D]);
    let mut clients = vec![ClientState::default(); N];
    let mut oracles: Vec<_> = (0..N).map(|i| problem.full_batch_oracle(i)).collect();
    let mut compressors: Vec<_> = (0..N)
        .map(|i| CodecCompressor::new(codec.parse().expect("valid chain"), layout.clone(), i as u64))
        .collect();
    let task = LocalTask {
        local_steps: 10,
        lr: 0.01,
    };
    let optimum: Vec<f32> = problem.optimum().iter().map(|&v| v as f32).collect();
    let best = problem.loss(&optimum);
    let initial = problem.loss(&state.x) - best;
    for _ in 0..rounds {
        let broadcast = state.broadcast();
        let mut acc = algorithm.server.accumulator(D);
        for i in 0..N {
            let upload = algorithm
                .client
                .train(
                    &task,
                    &broadcast,
                    &mut clients[i],
                    &mut oracles[i],
                    &mut compressors[i],
                )
                .expect("trains");
            algorithm
                .server
                .fold(&mut acc, &upload.views(), 1.0)
                .expect("folds");
        }
        algorithm
            .server
            .apply(&mut state, &acc, &ApplyContext::fixed_population(N, task))
            .expect("applies");
    }
    (initial, problem.loss(&state.x) - best)
}

#[test]
fn scallion_with_rand_k_reaches_the_optimum() {
    let rule = RuleConfig::Scallion {
        global_lr: 1.0,
        alpha: 0.5,
        alpha_placement: AlphaPlacement::ControlVariates,
    };
    let (initial, last) = optimality_gap(rule, "randk(0.5)", 300);
    assert!(last < 1e-3 * initial, "gap {last} of {initial}");
}

#[test]
fn scafcom_with_top_k_reaches_the_optimum() {
    let rule = RuleConfig::Scafcom {
        global_lr: 1.0,
        beta: 0.2,
    };
    let (initial, last) = optimality_gap(rule, "topk(0.25)", 300);
    assert!(last < 1e-3 * initial, "gap {last} of {initial}");
}
