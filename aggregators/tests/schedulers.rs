//! The schedulers under the Coordinator, driven on a virtual clock: the scheduler equivalences of
//! ALGORITHMS.md §10.2 (FedFix with a long period ≡ synchronous FedAvg, FedCompass with homogeneous
//! speeds ≡ FedAvg groups, FedBuff K = 1 ≡ FedAsync α = 1), FedFix's window invariants, and the
//! synchronous round's deadline, over-commitment and minimum-updates behaviour.

mod driver;

use driver::Driver;
use shoal_aggregators::problems::LeastSquaresProblem;
use shoal_aggregators::schedulers::buffered::{FedAsyncConfig, FedBuffConfig};
use shoal_aggregators::schedulers::fedcompass::FedCompassConfig;
use shoal_aggregators::schedulers::fedfix::FedFixConfig;
use shoal_aggregators::schedulers::sync::SyncConfig;
use shoal_aggregators::staleness::Staleness;
use shoal_aggregators::{
    AlgorithmConfig, ApplyContext, ClientState, Command, RuleConfig, SchedulerConfig, Weighting,
};
use shoal_core::{ClientId, IdentityCompressor, TaskId, Timestamp};
use std::collections::BTreeSet;

const N: usize = 8;
const D: usize = 20;
const STEPS: u32 = 10;
const LR: f32 = 0.02;

fn problem() -> LeastSquaresProblem {
    LeastSquaresProblem::generate(N, D, 30, 1.0, 42)
}

fn samples() -> Vec<u64> {
    (0..N as u64).map(|i| 20 + 10 * i).collect()
}

fn config(rule: RuleConfig, scheduler: SchedulerConfig) -> AlgorithmConfig {
    AlgorithmConfig {
        local_steps: STEPS,
        local_lr: LR,
        ..AlgorithmConfig::new(rule, scheduler)
    }
}

/// One FedAvg round from `x` with every client, full-batch local SGD, folded with `weights`.
fn fedavg_round(
    problem: &LeastSquaresProblem,
    x: &[f32],
    weights: &[f64],
    server_lr: f32,
    steps: u32,
) -> Vec<f32> {
    let (algorithm, _) = config(RuleConfig::FedAvg { server_lr }, SchedulerConfig::default())
        .build(0)
        .expect("valid");
    let mut state = algorithm.server.init_state(x.to_vec());
    let broadcast = state.broadcast();
    let mut acc = algorithm.server.accumulator(x.len());
    let task = shoal_aggregators::LocalTask {
        local_steps: steps,
        lr: LR,
    };
    for (i, &w) in weights.iter().enumerate() {
        let upload = algorithm
            .client
            .train(
                &task,
                &broadcast,
                &mut ClientState::default(),
                &mut problem.full_batch_oracle(i),
                &mut IdentityCompressor,
            )
            .expect("trains");
        algorithm
            .server
            .fold(&mut acc, &upload.views(), w)
            .expect("folds");
    }
    algorithm
        .server
        .apply(&mut state, &acc, &ApplyContext::fixed_population(N, task))
        .expect("applies");
    state.x
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    let norm = expected
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    let diff = actual
        .iter()
        .zip(expected)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(diff / norm < 1e-5, "{what}: relative difference {}", diff / norm);
}

fn heterogeneous(i: usize, _job: u64) -> u64 {
    1000 + 300 * i as u64
}

#[test]
fn sync_rounds_with_every_client_are_sample_weighted_fedavg() {
    let problem = problem();
    let scheduler = SchedulerConfig::Sync(SyncConfig {
        clients_per_round: Some(N),
        ..SyncConfig::default()
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler),
        7,
        samples(),
        Box::new(heterogeneous),
    )
    .with_training(&problem);
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(100.0), 5);
    let weights: Vec<f64> = samples().iter().map(|&n| n as f64).collect();
    let mut x = vec![0.0f32; D];
    let history = &driver.training.as_ref().expect("training").history;
    assert_eq!(history.len(), 5);
    for (round, (state, updates)) in history.iter().enumerate() {
        assert_eq!(*updates, N);
        x = fedavg_round(&problem, &x, &weights, 1.0, STEPS);
        assert_close(&state.x, &x, &format!("round {round}"));
    }
    driver.assert_exactly_once();
}

#[test]
fn fedfix_with_a_period_past_the_slowest_job_is_synchronous_fedavg() {
    let problem = problem();
    let slowest_job_s = (heterogeneous(N - 1, 0) * u64::from(STEPS)) as f64 * 1e-6;
    let scheduler = SchedulerConfig::FedFix(FedFixConfig {
        period_s: slowest_job_s,
        weighting: Weighting::Samples,
        advance_empty_windows: false,
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedFix { server_lr: 1.0 }, scheduler),
        7,
        samples(),
        Box::new(heterogeneous),
    )
    .with_training(&problem);
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(100.0), 5);
    let total: u64 = samples().iter().sum();
    let weights: Vec<f64> = samples().iter().map(|&n| n as f64 / total as f64).collect();
    let mut x = vec![0.0f32; D];
    for (round, (state, updates)) in driver
        .training
        .as_ref()
        .expect("training")
        .history
        .iter()
        .enumerate()
    {
        assert_eq!(*updates, N, "every client in every window");
        x = fedavg_round(&problem, &x, &weights, 1.0, STEPS);
        assert_close(&state.x, &x, &format!("window {round}"));
    }
    assert!(driver.log.folds.values().all(|&(_, _, s)| s == 0));
    driver.assert_exactly_once();
}

#[test]
fn fedfix_staleness_and_long_run_weights_follow_the_windows_a_job_spans() {
    // Δt = 10 ms; jobs of 10, 15, 25 and 30 ms span 1, 2, 3 and 3 windows (10 and 30 land exactly
    // on an instant, which counts as in time).
    let per_step = [1000u64, 1500, 2500, 3000];
    let windows = [1u64, 2, 3, 3];
    let samples = vec![10u64, 20, 30, 40];
    let scheduler = SchedulerConfig::FedFix(FedFixConfig {
        period_s: 0.010,
        weighting: Weighting::Samples,
        // The reference's versions: one per instant, so staleness counts windows.
        advance_empty_windows: true,
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedFix { server_lr: 1.0 }, scheduler),
        1,
        samples.clone(),
        Box::new(move |i, _| per_step[i]),
    );
    for i in 0..4 {
        driver.join(i);
    }
    let aggregations = 60;
    driver.run(Timestamp::from_secs_f64(10.0), aggregations);
    assert_eq!(driver.log.aggregations.len(), aggregations);
    let mut total_weight = [0.0f64; 4];
    for (task, &(client, weight, staleness)) in &driver.log.folds {
        let i = client.0 as usize;
        let p = samples[i] as f64 / 100.0;
        assert_eq!(staleness, windows[i] - 1, "{task} of {client}");
        assert!((weight - windows[i] as f64 * p).abs() < 1e-12);
        total_weight[i] += weight;
    }
    for i in 0..4 {
        let p = samples[i] as f64 / 100.0;
        // 60 is a multiple of lcm(1, 2, 3): every client's long-run mean weight is exactly p_i.
        assert!(
            (total_weight[i] / aggregations as f64 - p).abs() < 1e-12,
            "client {i}: {} vs {p}",
            total_weight[i] / aggregations as f64
        );
    }
    // Aggregations happen exactly every Δt.
    for (k, &(at, _, _)) in driver.log.aggregations.iter().enumerate() {
        assert_eq!(at, Timestamp::from_micros(10_000 * (k as u64 + 1)));
    }
}

/// Empty windows make no version: a client whose job spans three windows is folded into every
/// version, each version holds an update, and every update is folded with staleness 0 — while the
/// weights (which follow the job's duration) are those of the reference's schedule.
#[test]
fn fedfix_skips_empty_windows() {
    let samples = vec![10u64];
    let scheduler = SchedulerConfig::FedFix(FedFixConfig {
        period_s: 0.010,
        weighting: Weighting::Samples,
        advance_empty_windows: false,
    });
    // A 25 ms job spans three 10 ms windows; two of every three are empty.
    let mut driver = Driver::new(
        config(RuleConfig::FedFix { server_lr: 1.0 }, scheduler),
        1,
        samples,
        Box::new(|_, _| 2500),
    );
    driver.join(0);
    driver.run(Timestamp::from_secs_f64(10.0), 10);
    assert_eq!(driver.log.aggregations.len(), 10);
    for &(at, version, updates) in &driver.log.aggregations {
        assert_eq!(updates, 1, "{version} at {at}");
        // Made at the instant that closes the job's third window: 30, 60, 90 ms, …
        assert_eq!(at.as_micros() % 30_000, 0, "{version} at {at}");
    }
    for (task, &(_, weight, staleness)) in &driver.log.folds {
        assert_eq!(staleness, 0, "{task}");
        assert!((weight - 3.0).abs() < 1e-12, "{task}: weight {weight}");
    }
}

fn compass(q_min: u32, q_max: u32) -> FedCompassConfig {
    FedCompassConfig {
        q_min,
        q_max,
        ..FedCompassConfig::default()
    }
}

#[test]
fn fedcompass_with_homogeneous_speeds_is_fedavg_in_groups() {
    let problem = problem();
    let config = compass(20, 40);
    let alpha = config.alpha as f32;
    let mut driver = Driver::new(
        self::config(RuleConfig::FedCompass, SchedulerConfig::FedCompass(config)),
        3,
        samples(),
        Box::new(|_, _| 1000),
    )
    .with_training(&problem);
    driver.join_all();
    // N single aggregations of the first (asynchronous) pass, one group of N stale updates, then
    // groups of N fresh updates.
    let groups = 4;
    driver.run(Timestamp::from_secs_f64(100.0), N + 1 + groups);
    let history = &driver.training.as_ref().expect("training").history;
    assert!(history[..N].iter().all(|(_, u)| *u == 1));
    let uniform = vec![1.0; N];
    for k in N..N + groups {
        assert_eq!(history[k + 1].1, N, "every client in every group");
        let expected = fedavg_round(&problem, &history[k].0.x, &uniform, alpha, 40);
        assert_close(
            &history[k + 1].0.x,
            &expected,
            &format!("group aggregation {}", k + 1 - N),
        );
    }
    // Every job after the first is Q_max: all clients land on one group.
    assert!(driver.log.trains.values().all(|&(_, _, q, _)| q == 40));
    assert!(
        driver
            .log
            .folds
            .values()
            .skip(2 * N)
            .all(|&(_, _, staleness)| staleness == 0)
    );
    driver.assert_exactly_once();
}

#[test]
fn fedcompass_never_blocks_a_late_client_and_folds_its_update_once() {
    // Clients 0 and 1 take 1 ms per step; client 1's second job takes 3 ms per step and misses
    // its group's latest time (see ALGORITHMS.md §5.5, late path).
    let mut driver = Driver::new(
        config(
            RuleConfig::FedCompass,
            SchedulerConfig::FedCompass(compass(20, 100)),
        ),
        3,
        vec![10, 10],
        Box::new(|i, job| if i == 1 && job == 1 { 3000 } else { 1000 }),
    );
    driver.join(0);
    driver.join(1);
    driver.run(Timestamp::from_secs_f64(0.5), usize::MAX);
    let (late_task, _) = driver
        .log
        .trains
        .iter()
        .filter(|(_, t)| t.0.0 == 1)
        .nth(1)
        .map(|(&task, &t)| (task, t))
        .expect("client 1 had a second job");
    let arrival_batch = driver
        .log
        .batches
        .iter()
        .find(|(_, event, _)| {
            matches!(event, shoal_aggregators::Event::UpdateArrived(meta) if meta.task == late_task)
        })
        .expect("the late update arrived");
    assert_eq!(arrival_batch.0, Timestamp::from_micros(400_000));
    let commands = &arrival_batch.2;
    assert!(
        commands
            .iter()
            .any(|c| matches!(c, Command::Train { client, .. } if client.0 == 1)),
        "the late client gets its next task at once: {commands:?}"
    );
    assert!(
        !commands.iter().any(|c| matches!(c, Command::Aggregate { .. })),
        "a late arrival does not trigger an aggregation"
    );
    // Its update is folded exactly once, into the next group aggregation (client 0's at 450 ms).
    let folds: Vec<_> = driver
        .log
        .batches
        .iter()
        .filter(|(_, _, cmds)| {
            cmds.iter()
                .any(|c| matches!(c, Command::Fold { task, .. } if *task == late_task))
        })
        .collect();
    assert_eq!(folds.len(), 1);
    assert_eq!(folds[0].0, Timestamp::from_micros(450_000));
    assert!(
        folds[0]
            .2
            .iter()
            .any(|c| matches!(c, Command::Aggregate { updates: 2, .. }))
    );
    // Its next job was sized to land after group 2's next cycle: ⌊(500 + 100 − 400) / 2.8⌋ = 71.
    let next = driver
        .log
        .trains
        .values()
        .filter(|t| t.0.0 == 1)
        .nth(2)
        .expect("a third job");
    assert_eq!(next.2, 71);
    driver.assert_exactly_once();
}

#[test]
fn fedbuff_with_one_slot_and_k_1_is_fedasync_with_alpha_1() {
    let problem = problem();
    let run = |rule: RuleConfig, scheduler: SchedulerConfig| {
        let mut driver = Driver::new(config(rule, scheduler), 11, samples(), Box::new(heterogeneous))
            .with_training(&problem);
        driver.join_all();
        driver.run(Timestamp::from_secs_f64(100.0), 12);
        driver.assert_exactly_once();
        driver.training.expect("training").history
    };
    let fedbuff = run(
        RuleConfig::FedBuff { server_lr: 1.0 },
        SchedulerConfig::FedBuff(FedBuffConfig {
            buffer_size: 1,
            concurrency: Some(1),
            staleness: Staleness::Constant,
            ..FedBuffConfig::default()
        }),
    );
    let fedasync = run(
        RuleConfig::FedAsync,
        SchedulerConfig::FedAsync(FedAsyncConfig {
            alpha: 1.0,
            concurrency: Some(1),
            staleness: Staleness::Constant,
            ..FedAsyncConfig::default()
        }),
    );
    assert_eq!(fedbuff.len(), 12);
    for (k, ((a, _), (b, _))) in fedbuff.iter().zip(&fedasync).enumerate() {
        assert_close(&a.x, &b.x, &format!("arrival {k}"));
    }
}

#[test]
fn fedbuff_with_k_n_and_equal_speeds_is_uniform_fedavg() {
    let problem = problem();
    let scheduler = SchedulerConfig::FedBuff(FedBuffConfig {
        buffer_size: N,
        ..FedBuffConfig::default()
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedBuff { server_lr: 1.0 }, scheduler),
        5,
        samples(),
        Box::new(|_, _| 1000),
    )
    .with_training(&problem);
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(100.0), 3);
    let history = &driver.training.as_ref().expect("training").history;
    assert!(history.iter().all(|(_, updates)| *updates == N));
    // The first buffer holds N fresh updates: uniform FedAvg. (Afterwards a client that delivers
    // restarts at once on the version of the moment, so later buffers mix versions, as FedBuff does.)
    let expected = fedavg_round(&problem, &[0.0; D], &[1.0; N], 1.0, STEPS);
    assert_close(&history[0].0.x, &expected, "first buffer");
}

#[test]
fn fedbuff_discounts_stale_updates_and_drops_those_past_the_bound() {
    let scheduler = SchedulerConfig::FedBuff(FedBuffConfig {
        buffer_size: 2,
        max_staleness: Some(3),
        ..FedBuffConfig::default()
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedBuff { server_lr: 1.0 }, scheduler),
        5,
        samples(),
        Box::new(|i, _| if i == 0 { 20_000 } else { 1000 + 100 * i as u64 }),
    );
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(5.0), 200);
    for &(_, weight, staleness) in driver.log.folds.values() {
        assert!(staleness <= 3);
        assert!((weight - (1.0 + staleness as f64).powf(-0.5)).abs() < 1e-12);
    }
    assert!(
        driver.log.folds.values().any(|&(_, _, s)| s > 0),
        "some updates are stale"
    );
    assert!(
        !driver.log.discards.is_empty(),
        "the slow client's updates are too stale"
    );
    driver.assert_exactly_once();
}

#[test]
fn sync_rounds_over_commit_and_drop_the_stragglers() {
    // m = 4, over-commit 50 %: 6 sampled, the first 4 aggregated, 2 cancelled.
    let scheduler = SchedulerConfig::Sync(SyncConfig {
        clients_per_round: Some(4),
        over_commit: 0.5,
        ..SyncConfig::default()
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler),
        9,
        vec![10; 10],
        Box::new(|i, _| 1000 * (1 + i as u64)),
    );
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(100.0), 10);
    // A round opens as soon as m clients are idle, so the first one (opened by the 4th join) holds
    // only 4; every later one samples 6.
    let closing = driver
        .log
        .batches
        .iter()
        .filter(|(_, _, commands)| commands.iter().any(|c| matches!(c, Command::Aggregate { .. })));
    for (_, _, commands) in closing.skip(1) {
        {
            let cancels = commands
                .iter()
                .filter(|c| matches!(c, Command::Cancel { .. }))
                .count();
            assert_eq!(cancels, 2, "{commands:?}");
            assert!(
                commands
                    .iter()
                    .any(|c| matches!(c, Command::Aggregate { updates: 4, .. }))
            );
            let trains = commands
                .iter()
                .filter(|c| matches!(c, Command::Train { .. }))
                .count();
            assert_eq!(trains, 6, "the next round opens at once");
        }
    }
    assert_eq!(driver.coordinator.stats().cancelled, 18);
    driver.assert_exactly_once();
}

#[test]
fn sync_deadline_aggregates_what_arrived_and_waits_for_the_minimum() {
    // 4 clients per round, deadline 25 ms; clients take 10, 20, 30, 40 ms.
    let scheduler = |min_updates| {
        SchedulerConfig::Sync(SyncConfig {
            clients_per_round: Some(4),
            deadline_s: Some(0.025),
            min_updates,
            ..SyncConfig::default()
        })
    };
    let step = |i: usize, _| 1000 * (1 + i as u64);
    let mut driver = Driver::new(
        config(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler(2)),
        9,
        vec![10; 4],
        Box::new(step),
    );
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(1.0), 3);
    for (k, &(at, _, updates)) in driver.log.aggregations.iter().enumerate() {
        assert_eq!(updates, 2, "the two fast clients");
        assert_eq!(
            at,
            Timestamp::from_micros(25_000 * (k as u64 + 1)),
            "at the deadline"
        );
    }
    // With a minimum of 3 the round waits past the deadline for the third client (30 ms).
    let mut driver = Driver::new(
        config(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler(3)),
        9,
        vec![10; 4],
        Box::new(step),
    );
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(1.0), 2);
    assert_eq!(
        driver.log.aggregations[0],
        (Timestamp::from_micros(30_000), shoal_core::ModelVersion(1), 3)
    );
    assert_eq!(driver.log.aggregations[1].0, Timestamp::from_micros(60_000));
    driver.assert_exactly_once();
}

#[test]
fn sync_rounds_sample_a_fraction_and_replace_failed_clients() {
    // C = 0.25 of 8 clients = 2 per round; every client's first job fails, so rounds refill.
    let scheduler = SchedulerConfig::Sync(SyncConfig {
        clients_per_round: None,
        fraction: Some(0.25),
        min_updates: 2,
        ..SyncConfig::default()
    });
    let mut driver = Driver::new(
        config(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler),
        4,
        samples(),
        Box::new(heterogeneous),
    )
    .with_failures(|_, job| job == 0);
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(100.0), 6);
    assert_eq!(driver.log.aggregations.len(), 6);
    // The first round opened at the first join, when C·N = 1; later ones hold C·N = 2.
    assert!(driver.log.aggregations[1..].iter().all(|&(_, _, u)| u == 2));
    assert!(driver.coordinator.stats().failed >= 2);
    driver.assert_exactly_once();
}

/// `c` is the mean of every registered client's `c_i` after every aggregation, whoever joins late
/// or leaves: `N` is the population that ever registered (ALGORITHMS.md §3.1), not the clients
/// connected at that moment, and a client that joins (holding `c_i = 0`) rescales `c`.
#[test]
fn control_variates_average_over_the_population_through_late_joins_and_departures() {
    let problem = problem();
    // Every connected client in every round.
    let scheduler = SchedulerConfig::Sync(SyncConfig {
        clients_per_round: None,
        fraction: Some(1.0),
        ..SyncConfig::default()
    });
    let rules = [
        RuleConfig::Scaffold {
            global_lr: 1.0,
            uplink: shoal_aggregators::rules::scaffold::Uplink::TwoVectors,
        },
        RuleConfig::Scafcom {
            global_lr: 1.0,
            beta: 0.5,
        },
    ];
    for rule in rules {
        let name = rule.name();
        let mut driver = Driver::new(
            config(rule, scheduler.clone()),
            2,
            vec![10; N],
            Box::new(|i, _| 100 + 10 * i as u64),
        )
        .with_training(&problem);
        let mut joined = 0;
        // Three clients, then two more, then one leaves, then the rest join.
        let plan: [(&[usize], &[usize], usize); 3] =
            [(&[0, 1, 2], &[], 2), (&[3, 4], &[], 4), (&[5, 6, 7], &[1], 7)];
        for (join, leave, aggregations) in plan {
            for &i in join {
                driver.join(i);
                joined += 1;
            }
            for &i in leave {
                driver.leave(i);
            }
            driver.run(Timestamp::from_secs_f64(100.0), aggregations);
            assert_eq!(driver.log.aggregations.len(), aggregations, "{name}");
            let training = driver.training.as_ref().expect("training attached");
            let c = training.state.c.as_ref().expect("a control variate");
            for (k, &ck) in c.iter().enumerate() {
                let sum: f64 = training
                    .clients
                    .iter()
                    .take(joined)
                    .map(|s| s.c.as_ref().map_or(0.0, |c| f64::from(c[k])))
                    .sum();
                let mean = sum / joined as f64;
                assert!(
                    (f64::from(ck) - mean).abs() <= 1e-5 * (1.0 + mean.abs()),
                    "{name} after {aggregations} aggregations, [{k}]: c = {ck} but the mean of {joined} c_i is {mean}"
                );
            }
        }
    }
}

/// A client that takes its task and never answers holds a round only until `task_timeout_s`: its
/// task fails and the client is told to drop it, the round closes with the others, and after
/// `evict_after_failures` such tasks in a row the client is evicted. Without the timeout it holds
/// the first round for good.
#[test]
fn a_task_past_its_timeout_fails_so_a_silent_client_cannot_hold_a_round() {
    let scheduler = SchedulerConfig::Sync(SyncConfig {
        clients_per_round: None,
        fraction: Some(1.0),
        ..SyncConfig::default()
    });
    let run = |timeout: Option<f64>| {
        let mut config = config(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler.clone());
        config.task_timeout_s = timeout;
        // Client 0 would take a million seconds a step: it never answers within the run.
        let step = Box::new(|i, _| if i == 0 { 1_000_000_000_000 } else { 1000 });
        let mut driver = Driver::new(config, 3, vec![10; 4], step);
        driver.join_all();
        driver.run(Timestamp::from_secs_f64(60.0), 6);
        driver
    };
    let stalled = run(None);
    assert!(
        stalled.log.aggregations.is_empty(),
        "without a timeout the silent client holds the first round"
    );
    let driver = run(Some(1.0));
    assert_eq!(driver.log.aggregations.len(), 6, "the rounds go on without it");
    let silent = ClientId(0);
    let given: BTreeSet<TaskId> = driver
        .log
        .trains
        .iter()
        .filter(|(_, (client, ..))| *client == silent)
        .map(|(task, _)| *task)
        .collect();
    let commands: Vec<&Command> = driver.log.batches.iter().flat_map(|(_, _, c)| c).collect();
    let cancelled: BTreeSet<TaskId> = commands
        .iter()
        .filter_map(|c| match c {
            Command::Cancel { client, task } if *client == silent => Some(*task),
            _ => None,
        })
        .collect();
    assert_eq!(given.len(), 3, "three tasks, then evicted");
    assert_eq!(cancelled, given, "each of its tasks is cancelled at its timeout");
    assert!(
        commands
            .iter()
            .any(|c| matches!(c, Command::Evict { client, .. } if *client == silent)),
        "evicted after three failed tasks in a row"
    );
    assert_eq!(driver.coordinator.stats().timed_out, 3);
    assert!(driver.log.folds.values().all(|(client, ..)| *client != silent));
    driver.assert_exactly_once();
}
