//! The equivalences and invariants of ALGORITHMS.md §1–§3 and §10.2 for every rule, on the
//! heterogeneous federated least-squares problem (d = 20, N = 8).

use shoal_aggregators::problems::{LeastSquaresOracle, LeastSquaresProblem};
use shoal_aggregators::rules::scaffold::Uplink;
use shoal_aggregators::rules::scallion::AlphaPlacement;
use shoal_aggregators::{Algorithm, ApplyContext, ClientState, LocalTask, RuleConfig, ServerState};
use shoal_core::{GradientOracle, IdentityCompressor};

const N: usize = 8;
const D: usize = 20;

fn problem() -> LeastSquaresProblem {
    LeastSquaresProblem::generate(N, D, 30, 1.0, 42)
}

/// A synchronous run: per round, the listed participants train from the broadcast, their uploads
/// are folded with weight 1, and the server applies. Returns the server state after every round and
/// the final client states.
struct Run {
    states: Vec<ServerState>,
    clients: Vec<ClientState>,
}

fn participants(round: usize, per_round: usize) -> Vec<usize> {
    // A deterministic rotation: different subsets every round, every client seen.
    (0..per_round)
        .map(|j| (round * 3 + j * 5) % N)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn run(
    config: &RuleConfig,
    task: LocalTask,
    rounds: usize,
    per_round: usize,
    oracles: &mut dyn FnMut(usize) -> LeastSquaresOracle,
) -> Run {
    run_weighted(config, task, rounds, per_round, 1.0, oracles)
}

/// As [`run`], folding every upload with `weight`.
fn run_weighted(
    config: &RuleConfig,
    task: LocalTask,
    rounds: usize,
    per_round: usize,
    weight: f64,
    oracles: &mut dyn FnMut(usize) -> LeastSquaresOracle,
) -> Run {
    let Algorithm { server, client } = config.build().expect("test configurations are valid");
    let mut state = server.init_state(vec![0.0; D]);
    let mut clients = vec![ClientState::default(); N];
    let mut oracle_of: Vec<LeastSquaresOracle> = (0..N).map(&mut *oracles).collect();
    let mut states = Vec::new();
    for r in 0..rounds {
        let broadcast = state.broadcast();
        let mut acc = server.accumulator(D);
        for i in participants(r, per_round) {
            let upload = client
                .train(
                    &task,
                    &broadcast,
                    &mut clients[i],
                    &mut oracle_of[i],
                    &mut IdentityCompressor,
                )
                .expect("local training succeeds");
            server
                .fold(&mut acc, &upload.views(), weight)
                .expect("uploads fold");
        }
        server
            .apply(&mut state, &acc, &ApplyContext::fixed_population(N, task))
            .expect("apply succeeds");
        states.push(state.clone());
    }
    Run { states, clients }
}

fn full_batch(p: &LeastSquaresProblem) -> impl FnMut(usize) -> LeastSquaresOracle + '_ {
    |i| p.full_batch_oracle(i)
}

fn minibatch(p: &LeastSquaresProblem) -> impl FnMut(usize) -> LeastSquaresOracle + '_ {
    |i| p.minibatch_oracle(i, 5, 100 + i as u64)
}

fn assert_vec_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * x.abs().max(y.abs()).max(1.0),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

fn assert_same_trajectory(a: &Run, b: &Run, tol: f32) {
    for (r, (sa, sb)) in a.states.iter().zip(&b.states).enumerate() {
        assert_vec_close(&format!("round {r} x"), &sa.x, &sb.x, tol);
        if let (Some(ca), Some(cb)) = (&sa.c, &sb.c) {
            assert_vec_close(&format!("round {r} c"), ca, cb, tol);
        }
    }
}

const TASK: LocalTask = LocalTask {
    local_steps: 5,
    lr: 0.02,
};

fn scaffold(uplink: Uplink) -> RuleConfig {
    RuleConfig::Scaffold {
        global_lr: 1.0,
        uplink,
    }
}

#[test]
fn scaffold_halved_scallion_and_scafcom_follow_one_trajectory() {
    let p = problem();
    let others = [
        scaffold(Uplink::Halved),
        RuleConfig::Scallion {
            global_lr: 1.0,
            alpha: 1.0,
            alpha_placement: AlphaPlacement::ControlVariates,
        },
        RuleConfig::Scallion {
            global_lr: 1.0,
            alpha: 1.0,
            alpha_placement: AlphaPlacement::Payload,
        },
        RuleConfig::Scafcom {
            global_lr: 1.0,
            beta: 1.0,
        },
    ];
    type Oracles<'a> = Box<dyn Fn() -> Box<dyn FnMut(usize) -> LeastSquaresOracle + 'a> + 'a>;
    let kinds: [Oracles<'_>; 2] = [
        Box::new(|| Box::new(full_batch(&p))),
        Box::new(|| Box::new(minibatch(&p))),
    ];
    for oracles in &kinds {
        let reference = run(&scaffold(Uplink::TwoVectors), TASK, 12, 4, &mut oracles());
        for config in &others {
            let other = run(config, TASK, 12, 4, &mut oracles());
            assert_same_trajectory(&reference, &other, 1e-5);
            for (a, b) in reference.clients.iter().zip(&other.clients) {
                let zero = [0.0; D];
                assert_vec_close(
                    "c_i",
                    a.c.as_deref().unwrap_or(&zero),
                    b.c.as_deref().unwrap_or(&zero),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn scafcom_control_variates_track_the_local_momentum() {
    // One round from zero state with the identity compressor: a_i is SCAFFOLD's new c_i, the
    // momentum is v_i = β a_i, and c_i jumps to v_i (the whole difference is sent).
    let p = problem();
    let beta = 0.3;
    let scaffold_run = run(&scaffold(Uplink::Halved), TASK, 1, N, &mut full_batch(&p));
    let scafcom_run = run(
        &RuleConfig::Scafcom { global_lr: 1.0, beta },
        TASK,
        1,
        N,
        &mut full_batch(&p),
    );
    for (s, m) in scaffold_run.clients.iter().zip(&scafcom_run.clients) {
        let expected: Vec<f32> = s.c.as_ref().unwrap().iter().map(|a| beta * a).collect();
        assert_vec_close("v_i", m.v.as_ref().unwrap(), &expected, 1e-5);
        assert_vec_close("c_i", m.c.as_ref().unwrap(), &expected, 1e-5);
    }
}

#[test]
fn fedavg_m_with_beta_one_and_gamma_eta_k_is_fedavg() {
    let p = problem();
    let fedavg = run(
        &RuleConfig::FedAvg { server_lr: 1.0 },
        TASK,
        10,
        4,
        &mut minibatch(&p),
    );
    let gamma = TASK.lr * TASK.local_steps as f32;
    for variance_reduced in [false, true] {
        let m = RuleConfig::FedAvgMomentum {
            beta: 1.0,
            global_step: gamma,
            variance_reduced,
        };
        assert_same_trajectory(&fedavg, &run(&m, TASK, 10, 4, &mut minibatch(&p)), 1e-5);
    }
}

#[test]
fn scaffold_m_with_beta_one_is_scaffold_in_both_uplinks() {
    let p = problem();
    let reference = run(&scaffold(Uplink::TwoVectors), TASK, 10, 4, &mut minibatch(&p));
    let gamma = TASK.lr * TASK.local_steps as f32;
    for (uplink, variance_reduced) in [
        (Uplink::TwoVectors, false),
        (Uplink::Halved, false),
        (Uplink::TwoVectors, true),
    ] {
        let m = RuleConfig::ScaffoldMomentum {
            beta: 1.0,
            global_step: gamma,
            uplink,
            variance_reduced,
        };
        assert_same_trajectory(&reference, &run(&m, TASK, 10, 4, &mut minibatch(&p)), 1e-5);
    }
}

#[test]
fn scaffold_m_halved_uplink_rebuilds_the_two_vector_run() {
    let p = problem();
    let config = |uplink| RuleConfig::ScaffoldMomentum {
        beta: 0.3,
        global_step: 0.05,
        uplink,
        variance_reduced: false,
    };
    let two = run(&config(Uplink::TwoVectors), TASK, 10, 4, &mut minibatch(&p));
    let halved = run(&config(Uplink::Halved), TASK, 10, 4, &mut minibatch(&p));
    assert_same_trajectory(&two, &halved, 1e-5);
    for s in &two.states {
        assert!(s.g.as_ref().unwrap().iter().any(|&g| g != 0.0));
    }
}

#[test]
fn server_control_variate_is_the_mean_of_all_client_control_variates_after_every_round() {
    let p = problem();
    let configs = [
        scaffold(Uplink::TwoVectors),
        scaffold(Uplink::Halved),
        RuleConfig::Scallion {
            global_lr: 1.0,
            alpha: 0.3,
            alpha_placement: AlphaPlacement::ControlVariates,
        },
        RuleConfig::Scallion {
            global_lr: 1.0,
            alpha: 0.3,
            alpha_placement: AlphaPlacement::Payload,
        },
        RuleConfig::Scafcom {
            global_lr: 1.0,
            beta: 0.2,
        },
        RuleConfig::ScaffoldMomentum {
            beta: 0.5,
            global_step: 0.1,
            uplink: Uplink::Halved,
            variance_reduced: false,
        },
        RuleConfig::ScaffoldMomentum {
            beta: 0.5,
            global_step: 0.1,
            uplink: Uplink::TwoVectors,
            variance_reduced: true,
        },
    ];
    for config in &configs {
        for rounds in 1..=6 {
            let r = run(config, TASK, rounds, 3, &mut minibatch(&p));
            let c = r.states.last().unwrap().c.as_ref().unwrap();
            let mut mean = vec![0.0f64; D];
            for ci in r
                .clients
                .iter()
                .map(|s| s.c.clone().unwrap_or_else(|| vec![0.0; D]))
            {
                mean.iter_mut()
                    .zip(&ci)
                    .for_each(|(m, v)| *m += f64::from(*v) / N as f64);
            }
            let mean: Vec<f32> = mean.into_iter().map(|v| v as f32).collect();
            assert_vec_close(
                &format!("{} c after {rounds} rounds", config.name()),
                c,
                &mean,
                1e-5,
            );
        }
    }
}

fn distance_to_optimum(p: &LeastSquaresProblem, x: &[f32]) -> f64 {
    p.optimum()
        .iter()
        .zip(x)
        .map(|(o, x)| (o - f64::from(*x)).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn scaffold_family_reaches_the_optimum_while_fedavg_keeps_a_drift_bias_that_grows_with_k() {
    let p = problem();
    let start = distance_to_optimum(&p, &[0.0; D]);
    let final_distance = |config: &RuleConfig, k: u32| {
        let task = LocalTask {
            local_steps: k,
            lr: 0.02,
        };
        let r = run(config, task, 150, N, &mut full_batch(&p));
        distance_to_optimum(&p, &r.states.last().unwrap().x)
    };
    let fedavg = RuleConfig::FedAvg { server_lr: 1.0 };
    let (bias_k2, bias_k20) = (final_distance(&fedavg, 2), final_distance(&fedavg, 20));
    assert!(
        bias_k20 > 1e-2 * start,
        "FedAvg K=20 should stall away from the optimum: {bias_k20}"
    );
    assert!(
        bias_k20 > 2.0 * bias_k2,
        "client drift should grow with K: K=2 {bias_k2}, K=20 {bias_k20}"
    );
    for config in [
        scaffold(Uplink::TwoVectors),
        RuleConfig::Scallion {
            global_lr: 1.0,
            alpha: 0.5,
            alpha_placement: AlphaPlacement::ControlVariates,
        },
        RuleConfig::Scafcom {
            global_lr: 1.0,
            beta: 0.5,
        },
    ] {
        let d = final_distance(&config, 20);
        assert!(
            d < 1e-3 * start,
            "{} should reach the optimum with K = 20: distance {d} (start {start})",
            config.name()
        );
    }
}

#[test]
fn fedavg_invariants() {
    let p = problem();
    // η_g = 0 freezes the model; doubling η_g doubles the first step.
    let frozen = run(
        &RuleConfig::FedAvg { server_lr: 0.0 },
        TASK,
        3,
        4,
        &mut full_batch(&p),
    );
    assert!(frozen.states.iter().all(|s| s.x.iter().all(|&x| x == 0.0)));
    let one = run(
        &RuleConfig::FedAvg { server_lr: 1.0 },
        TASK,
        1,
        4,
        &mut full_batch(&p),
    );
    let two = run(
        &RuleConfig::FedAvg { server_lr: 2.0 },
        TASK,
        1,
        4,
        &mut full_batch(&p),
    );
    let doubled: Vec<f32> = one.states[0].x.iter().map(|x| 2.0 * x).collect();
    assert_vec_close("2·step", &two.states[0].x, &doubled, 1e-6);
    // K = 1, full participation, full-batch gradients: one step of GD on the mean objective.
    let k1 = LocalTask {
        local_steps: 1,
        lr: 0.1,
    };
    let gd = run(
        &RuleConfig::FedAvg { server_lr: 1.0 },
        k1,
        1,
        N,
        &mut full_batch(&p),
    );
    let mut expected = vec![0.0f64; D];
    for i in 0..N {
        let mut g = vec![0.0; D];
        p.full_batch_oracle(i).gradient(&[0.0; D], &mut g).unwrap();
        expected
            .iter_mut()
            .zip(&g)
            .for_each(|(e, g)| *e -= 0.1 * f64::from(*g) / N as f64);
    }
    let expected: Vec<f32> = expected.into_iter().map(|v| v as f32).collect();
    assert_vec_close("GD step", &gd.states[0].x, &expected, 1e-5);
}

#[test]
fn scallion_damped_control_variates_keep_scaffolds_first_step() {
    let p = problem();
    let alpha = 0.25;
    let reference = run(&scaffold(Uplink::Halved), TASK, 1, 4, &mut full_batch(&p));
    let damped = run(
        &RuleConfig::Scallion {
            global_lr: 1.0,
            alpha,
            alpha_placement: AlphaPlacement::ControlVariates,
        },
        TASK,
        1,
        4,
        &mut full_batch(&p),
    );
    assert_vec_close(
        "first model step",
        &reference.states[0].x,
        &damped.states[0].x,
        1e-6,
    );
    for (full, part) in reference.clients.iter().zip(&damped.clients) {
        if let (Some(full), Some(part)) = (&full.c, &part.c) {
            let scaled: Vec<f32> = full.iter().map(|c| alpha * c).collect();
            assert_vec_close("c_i moves α of the way", part, &scaled, 1e-5);
        }
    }
}

#[test]
fn fedavg_m_is_a_round_level_ema_of_gradients() {
    // K = 1, full participation, full-batch gradients: g⁺ = β ∇f(x) + (1 − β) g, x⁺ = x − γ g⁺.
    let p = problem();
    let (beta, gamma) = (0.3f32, 0.05f32);
    let task = LocalTask {
        local_steps: 1,
        lr: 0.1,
    };
    let r = run(
        &RuleConfig::FedAvgMomentum {
            beta,
            global_step: gamma,
            variance_reduced: false,
        },
        task,
        4,
        N,
        &mut full_batch(&p),
    );
    let mut x = [0.0f64; D];
    let mut g = [0.0f64; D];
    for state in &r.states {
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut grad = [0.0f64; D];
        for i in 0..N {
            let mut gi = vec![0.0; D];
            p.full_batch_oracle(i).gradient(&xf, &mut gi).unwrap();
            grad.iter_mut()
                .zip(&gi)
                .for_each(|(a, b)| *a += f64::from(*b) / N as f64);
        }
        for j in 0..D {
            g[j] = f64::from(beta) * grad[j] + f64::from(1.0 - beta) * g[j];
            x[j] -= f64::from(gamma) * g[j];
        }
        let expected: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        assert_vec_close("EMA x", &state.x, &expected, 1e-4);
    }
}

#[test]
fn a_single_scaffold_client_is_local_sgd() {
    // With one client c = c_1 always, so the correction vanishes: SCAFFOLD ≡ FedAvg on that client.
    let p = LeastSquaresProblem::generate(1, D, 30, 1.0, 5);
    let driver = |config: &RuleConfig| {
        let Algorithm { server, client } = config.build().unwrap();
        let mut state = server.init_state(vec![0.0; D]);
        let mut cs = ClientState::default();
        let mut oracle = p.full_batch_oracle(0);
        for _ in 0..5 {
            let b = state.broadcast();
            let mut acc = server.accumulator(D);
            let up = client
                .train(&TASK, &b, &mut cs, &mut oracle, &mut IdentityCompressor)
                .unwrap();
            server.fold(&mut acc, &up.views(), 1.0).unwrap();
            server
                .apply(&mut state, &acc, &ApplyContext::fixed_population(1, TASK))
                .unwrap();
        }
        state.x
    };
    assert_vec_close(
        "one client",
        &driver(&scaffold(Uplink::TwoVectors)),
        &driver(&RuleConfig::FedAvg { server_lr: 1.0 }),
        1e-5,
    );
}

#[test]
fn uniform_rules_refuse_other_weights_and_bad_uploads_never_move_the_model() {
    let p = problem();
    let Algorithm { server, client } = scaffold(Uplink::Halved).build().unwrap();
    let mut state = server.init_state(vec![0.0; D]);
    let mut acc = server.accumulator(D);
    let up = client
        .train(
            &TASK,
            &state.broadcast(),
            &mut ClientState::default(),
            &mut p.full_batch_oracle(0),
            &mut IdentityCompressor,
        )
        .unwrap();
    assert!(server.fold(&mut acc, &up.views(), 0.5).is_err());
    assert!(server.fold(&mut acc, &[&[f32::NAN; D]], 1.0).is_err());
    assert!(server.fold(&mut acc, &[&[1.0; 3]], 1.0).is_err());
    assert_eq!((acc.count(), acc.rejected()), (0, 2));
    let before = state.clone();
    server
        .apply(&mut state, &acc, &ApplyContext::fixed_population(N, TASK))
        .unwrap();
    assert_eq!(state, before, "an empty aggregation leaves the state alone");
}

#[test]
fn fedbuff_with_one_fresh_update_is_fedasync_with_alpha_one() {
    let p = problem();
    for r in 1..4 {
        let buffered = run(
            &RuleConfig::FedBuff { server_lr: 1.0 },
            TASK,
            r,
            1,
            &mut minibatch(&p),
        );
        let mixed = run(&RuleConfig::FedAsync, TASK, r, 1, &mut minibatch(&p));
        assert_same_trajectory(&buffered, &mixed, 1e-5);
    }
}

#[test]
fn fedbuff_over_fresh_updates_is_uniform_fedavg() {
    let p = problem();
    for per_round in [4, N] {
        let fedavg = run(
            &RuleConfig::FedAvg { server_lr: 1.0 },
            TASK,
            6,
            per_round,
            &mut minibatch(&p),
        );
        let fedbuff = run(
            &RuleConfig::FedBuff { server_lr: 1.0 },
            TASK,
            6,
            per_round,
            &mut minibatch(&p),
        );
        assert_same_trajectory(&fedavg, &fedbuff, 1e-6);
    }
}

#[test]
fn fedfix_with_a_window_longer_than_every_job_is_fedavg() {
    use shoal_aggregators::rules::fedfix::fedfix_weight;
    let p = problem();
    // Every job takes at most 7 time units and Δt = 10: each d_i = ⌈τ_i/Δt⌉ p_i = 1/N.
    let weight = fedfix_weight(7, 10, 1.0 / N as f64);
    let fedfix = run_weighted(
        &RuleConfig::FedFix { server_lr: 1.0 },
        TASK,
        6,
        N,
        weight,
        &mut minibatch(&p),
    );
    let fedavg = run(
        &RuleConfig::FedAvg { server_lr: 1.0 },
        TASK,
        6,
        N,
        &mut minibatch(&p),
    );
    assert_same_trajectory(&fedavg, &fedfix, 1e-5);
}

#[test]
fn fedcompass_with_homogeneous_fresh_groups_is_fedavg_with_server_rate_alpha() {
    use shoal_aggregators::staleness::Staleness;
    let p = problem();
    let alpha = 0.9;
    let weight = alpha * Staleness::default().weight(0) / N as f64;
    let compass = run_weighted(&RuleConfig::FedCompass, TASK, 6, N, weight, &mut minibatch(&p));
    let fedavg = run(
        &RuleConfig::FedAvg {
            server_lr: alpha as f32,
        },
        TASK,
        6,
        N,
        &mut minibatch(&p),
    );
    assert_same_trajectory(&fedavg, &compass, 1e-5);
}

#[test]
fn fedasync_mixing_bounds() {
    let p = problem();
    // α_t = 0 leaves the model; mixing weights above 1 are refused.
    let frozen = run_weighted(&RuleConfig::FedAsync, TASK, 3, 1, 0.0, &mut minibatch(&p));
    assert!(frozen.states.iter().all(|s| s.x.iter().all(|&x| x == 0.0)));
    let Algorithm { server, client } = RuleConfig::FedAsync.build().unwrap();
    let mut state = server.init_state(vec![0.0; D]);
    let mut acc = server.accumulator(D);
    for i in 0..2 {
        let up = client
            .train(
                &TASK,
                &state.broadcast(),
                &mut ClientState::default(),
                &mut p.full_batch_oracle(i),
                &mut IdentityCompressor,
            )
            .unwrap();
        server.fold(&mut acc, &up.views(), 0.75).unwrap();
    }
    let before = state.clone();
    assert!(
        server
            .apply(&mut state, &acc, &ApplyContext::fixed_population(N, TASK))
            .is_err()
    );
    assert_eq!(state, before);
}

/// The previous model is kept and broadcast only by the variance-reduced momentum forms: the
/// others would send (and store) a whole extra model for nothing.
#[test]
fn only_variance_reduced_momentum_broadcasts_the_previous_model() {
    let p = problem();
    for (name, variance_reduced) in [
        ("fedavg-m", false),
        ("fedavg-m", true),
        ("scaffold-m", false),
        ("scaffold-m", true),
    ] {
        let rule = if name == "fedavg-m" {
            RuleConfig::FedAvgMomentum {
                beta: 0.5,
                global_step: 0.1,
                variance_reduced,
            }
        } else {
            RuleConfig::ScaffoldMomentum {
                beta: 0.5,
                global_step: 0.1,
                uplink: Uplink::TwoVectors,
                variance_reduced,
            }
        };
        let Algorithm { server, .. } = rule.build().unwrap();
        let mut state = server.init_state(vec![0.0; p.dim()]);
        assert_eq!(
            state.broadcast().x_prev.is_some(),
            variance_reduced,
            "{name} at start"
        );
        let mut acc = server.accumulator(p.dim());
        let ones = vec![1.0f32; p.dim()];
        let upload: Vec<&[f32]> = (0..server.upload_parts()).map(|_| ones.as_slice()).collect();
        server.fold(&mut acc, &upload, 1.0).unwrap();
        let ctx = ApplyContext {
            num_clients: 1,
            previous_num_clients: 1,
            task: LocalTask {
                local_steps: 1,
                lr: 0.1,
            },
        };
        let before = state.x.clone();
        server.apply(&mut state, &acc, &ctx).unwrap();
        assert_eq!(
            state.broadcast().x_prev.is_some(),
            variance_reduced,
            "{name} after a round"
        );
        if variance_reduced {
            assert_eq!(
                state.x_prev.as_deref(),
                Some(before.as_slice()),
                "{name}: x_prev is the last model"
            );
        }
    }
}
