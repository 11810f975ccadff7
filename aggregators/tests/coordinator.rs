//! The Coordinator's guarantees over long random runs — every accepted update aggregated or
//! discarded exactly once, FedCompass' step counts within bounds and no client blocked past its
//! group's latest time — its snapshots (a restored Coordinator decides what the original did),
//! and its refusals: bad events, invalid rule–scheduler pairs, eviction, foreign snapshots.

mod driver;

use driver::Driver;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_aggregators::schedulers::buffered::{FedAsyncConfig, FedBuffConfig};
use shoal_aggregators::schedulers::fedcompass::FedCompassConfig;
use shoal_aggregators::schedulers::fedfix::FedFixConfig;
use shoal_aggregators::schedulers::sync::SyncConfig;
use shoal_aggregators::{
    AlgorithmConfig, Command, CoordinatorError, Event, RuleConfig, SchedulerConfig, Weighting,
};
use shoal_core::{ClientId, ModelVersion, TaskId, Timestamp, UpdateMeta};
use std::collections::BTreeMap;

/// Per-step times: a log-normal base speed per client, ±20 % jitter per job, and one job in ten
/// three times slower.
fn random_speeds(clients: usize, seed: u64) -> (Box<dyn FnMut(usize, u64) -> u64>, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let base: Vec<f64> = (0..clients)
        .map(|_| 1000.0 * (rng.random_range(-1.0..1.0f64)).exp())
        .collect();
    let slowest = base.iter().cloned().fold(0.0, f64::max) * 1.2 * 3.0;
    let step = move |i: usize, _job: u64| {
        let jitter = rng.random_range(0.8..1.2);
        let slow = if rng.random_range(0.0..1.0) < 0.1 {
            3.0
        } else {
            1.0
        };
        (base[i] * jitter * slow).round() as u64
    };
    (Box::new(step), slowest.ceil() as u64)
}

#[test]
fn fedcompass_over_a_long_random_run_keeps_q_in_bounds_loses_nothing_and_blocks_no_one() {
    let clients = 24;
    let compass = FedCompassConfig {
        q_min: 20,
        q_max: 100,
        ..FedCompassConfig::default()
    };
    let (step, slowest_step) = random_speeds(clients, 5);
    let config = AlgorithmConfig::new(
        RuleConfig::FedCompass,
        SchedulerConfig::FedCompass(compass.clone()),
    );
    let mut driver = Driver::new(config, 17, vec![50; clients], step)
        .with_failures(|i, job| (i as u64 * 7 + job) % 53 == 0);
    driver.join_all();
    driver.run(Timestamp::from_secs_f64(60.0), usize::MAX);
    // A client leaves and comes back mid-run.
    driver.leave(3);
    driver.run(Timestamp::from_secs_f64(80.0), usize::MAX);
    driver.join(3);
    driver.run(Timestamp::from_secs_f64(200.0), usize::MAX);

    let log = &driver.log;
    assert!(
        log.aggregations.len() > 500,
        "{} aggregations",
        log.aggregations.len()
    );
    // Every assigned Q within [Q_min, Q_max].
    for &(client, _, q, _) in log.trains.values() {
        assert!(
            (compass.q_min..=compass.q_max).contains(&q),
            "{client} given {q} steps"
        );
    }
    // No update lost or applied twice.
    driver.assert_exactly_once();
    assert!(
        driver.held() <= clients,
        "only the current groups' updates are still held"
    );
    // No client waits after delivering longer than the latest time of any group it could be in:
    // λ · Q_max · (slowest time per step).
    let bound = (compass.latest_time_factor * f64::from(compass.q_max) * slowest_step as f64).ceil() as u64;
    let mut delivered_at: BTreeMap<ClientId, Timestamp> = BTreeMap::new();
    let (mut immediate, mut late, mut waited) = (0, 0, 0);
    for (at, event, commands) in &log.batches {
        for command in commands {
            if let Command::Train { client, .. } = command
                && let Some(since) = delivered_at.remove(client)
            {
                let wait = at.micros_since(since);
                assert!(wait <= bound, "{client} waited {wait} µs > {bound}");
                waited += 1;
            }
        }
        if let Event::UpdateArrived(meta) = event {
            let at_once = commands
                .iter()
                .any(|c| matches!(c, Command::Train { client, .. } if *client == meta.client));
            let aggregated = commands.iter().any(|c| matches!(c, Command::Aggregate { .. }));
            if at_once && !aggregated {
                late += 1; // a late arrival: buffered, and the client goes on at once
            } else if at_once {
                immediate += 1; // a first job, or the last member of a group
            } else {
                delivered_at.insert(meta.client, *at);
            }
        }
    }
    assert!(
        waited > 0 && immediate > 0 && late > 0,
        "every path ran: {waited} waited, {immediate} went on after an aggregation, {late} late"
    );
}

fn scheduler_for(kind: u8, clients: usize) -> (RuleConfig, SchedulerConfig) {
    match kind % 5 {
        0 => (
            RuleConfig::FedAvg { server_lr: 1.0 },
            SchedulerConfig::Sync(SyncConfig {
                clients_per_round: Some(clients.div_ceil(2)),
                deadline_s: Some(0.05),
                over_commit: 0.3,
                min_updates: 1,
                ..SyncConfig::default()
            }),
        ),
        1 => (
            RuleConfig::FedBuff { server_lr: 1.0 },
            SchedulerConfig::FedBuff(FedBuffConfig {
                buffer_size: 3,
                concurrency: Some(clients.div_ceil(2)),
                max_staleness: Some(4),
                ..FedBuffConfig::default()
            }),
        ),
        2 => (
            RuleConfig::FedAsync,
            SchedulerConfig::FedAsync(FedAsyncConfig::default()),
        ),
        3 => (
            RuleConfig::FedFix { server_lr: 1.0 },
            SchedulerConfig::FedFix(FedFixConfig {
                period_s: 0.02,
                weighting: Weighting::Uniform,
                advance_empty_windows: false,
            }),
        ),
        _ => (
            RuleConfig::FedCompass,
            SchedulerConfig::FedCompass(FedCompassConfig {
                q_min: 5,
                q_max: 20,
                ..FedCompassConfig::default()
            }),
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Any scheduler, any fleet, failures and departures: every accepted update is folded or
    /// discarded exactly once, aggregations count exactly their folds, tasks go only to idle
    /// registered clients on the current version (the driver asserts all of it on every command).
    #[test]
    fn every_scheduler_accounts_for_every_update(
        kind in 0u8..5,
        clients in 1usize..12,
        seed in any::<u64>(),
        fail_mod in 3u64..20,
        leaver in 0usize..12,
    ) {
        let (rule, scheduler) = scheduler_for(kind, clients);
        let (step, _) = random_speeds(clients, seed);
        let config = AlgorithmConfig { local_steps: 5, ..AlgorithmConfig::new(rule, scheduler) };
        let mut driver = Driver::new(config, seed, (0..clients as u64).map(|i| 10 + i).collect(), step)
            .with_failures(move |i, job| (i as u64 + job) % fail_mod == 0);
        driver.join_all();
        driver.run(Timestamp::from_secs_f64(1.0), usize::MAX);
        if leaver < clients {
            driver.leave(leaver);
        }
        driver.run(Timestamp::from_secs_f64(2.0), usize::MAX);
        if leaver < clients {
            driver.join(leaver);
        }
        driver.run(Timestamp::from_secs_f64(3.0), usize::MAX);
        driver.assert_exactly_once();
        let versions: Vec<u64> = driver.log.aggregations.iter().map(|a| a.1.0).collect();
        prop_assert!(versions.iter().enumerate().all(|(k, &v)| v == k as u64 + 1));
        prop_assert!(!driver.log.aggregations.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(30))]

    /// Any scheduler, snapshotted after any event of a random run (joins, failures, a departure,
    /// timers) and restored into a Coordinator built from the same configuration: fed the events
    /// after the snapshot, it makes exactly the decisions the original made.
    #[test]
    fn a_coordinator_restored_from_a_snapshot_decides_what_the_original_decided(
        kind in 0u8..5,
        clients in 1usize..10,
        seed in any::<u64>(),
        cut in 0.0f64..1.0,
    ) {
        let (rule, scheduler) = scheduler_for(kind, clients);
        let (step, _) = random_speeds(clients, seed);
        let config = AlgorithmConfig { local_steps: 5, ..AlgorithmConfig::new(rule, scheduler) };
        let mut driver = Driver::new(config.clone(), seed, (0..clients as u64).map(|i| 10 + i).collect(), step)
            .with_failures(move |i, job| (i as u64 + job) % 7 == 0);
        driver.join_all();
        driver.run(Timestamp::from_secs_f64(0.5), usize::MAX);
        driver.leave(0);
        driver.run(Timestamp::from_secs_f64(1.0), usize::MAX);
        let events = driver.log.batches.clone();
        let k = ((cut * events.len() as f64) as usize).min(events.len());
        let (_, mut original) = config.build(seed).expect("valid");
        for (at, event, commands) in &events[..k] {
            prop_assert_eq!(&original.handle(*at, event.clone()).expect("accepted"), commands);
        }
        let snapshot = original.snapshot();
        let (_, mut restored) = config.build(seed).expect("valid");
        restored.restore(&snapshot).expect("restores");
        prop_assert_eq!(restored.snapshot(), snapshot, "the same state, byte for byte");
        for (at, event, commands) in &events[k..] {
            prop_assert_eq!(&restored.handle(*at, event.clone()).expect("accepted"), commands);
        }
    }
}

#[test]
fn a_snapshot_of_another_scheduler_or_damaged_is_refused_and_changes_nothing() {
    let (_, mut fedbuff_run) = fedbuff().build(1).expect("valid");
    fedbuff_run
        .handle(
            Timestamp::from_secs_f64(1.0),
            Event::Joined {
                client: ClientId(1),
                num_samples: 10,
            },
        )
        .expect("joins");
    let snapshot = fedbuff_run.snapshot();
    let (rule, scheduler) = scheduler_for(0, 4);
    let (_, mut sync_run) = AlgorithmConfig::new(rule, scheduler).build(1).expect("valid");
    let before = sync_run.snapshot();
    let other = sync_run.restore(&snapshot).expect_err("another scheduler");
    assert!(other.to_string().contains("fedbuff"), "{other}");
    assert!(sync_run.restore(&snapshot[..snapshot.len() / 2]).is_err());
    assert_eq!(sync_run.snapshot(), before);
}

fn fedbuff() -> AlgorithmConfig {
    AlgorithmConfig::new(
        RuleConfig::FedBuff { server_lr: 1.0 },
        SchedulerConfig::FedBuff(FedBuffConfig::default()),
    )
}

fn train_of(commands: &[Command]) -> (ClientId, TaskId, ModelVersion) {
    commands
        .iter()
        .find_map(|c| match *c {
            Command::Train {
                client,
                task,
                version,
                ..
            } => Some((client, task, version)),
            _ => None,
        })
        .expect("a task was assigned")
}

fn meta(client: ClientId, task: TaskId, base_version: ModelVersion) -> UpdateMeta {
    UpdateMeta {
        client,
        task,
        base_version,
        num_samples: 10,
        local_steps: 10,
        loss: 0.0,
        duration_s: 1.0,
    }
}

#[test]
fn bad_events_are_refused_and_change_nothing() {
    let (_, mut coordinator) = fedbuff().build(1).expect("valid");
    let t = Timestamp::from_secs_f64;
    let joined = coordinator
        .handle(
            t(1.0),
            Event::Joined {
                client: ClientId(1),
                num_samples: 10,
            },
        )
        .expect("joins");
    let (client, task, version) = train_of(&joined);
    let refuse = |coordinator: &mut shoal_aggregators::Coordinator, at: f64, event: Event| {
        let before = coordinator.stats();
        let err = coordinator.handle(t(at), event).expect_err("refused");
        assert_eq!(coordinator.stats(), before);
        err
    };
    assert!(matches!(
        refuse(&mut coordinator, 0.5, Event::Timer),
        CoordinatorError::TimeWentBackwards { .. }
    ));
    // Each of these could only come from a client that forges what it names.
    let made_up = refuse(
        &mut coordinator,
        2.0,
        Event::UpdateArrived(meta(client, TaskId(99), version)),
    );
    assert_eq!(made_up, CoordinatorError::TaskNotRunning(TaskId(99)));
    assert!(coordinator.is_forged(&made_up));
    let wrong_client = refuse(
        &mut coordinator,
        2.0,
        Event::UpdateArrived(meta(ClientId(2), task, version)),
    );
    assert!(matches!(wrong_client, CoordinatorError::WrongClient { .. }));
    assert!(coordinator.is_forged(&wrong_client));
    let wrong_version = refuse(
        &mut coordinator,
        2.0,
        Event::UpdateArrived(meta(client, task, ModelVersion(5))),
    );
    assert!(matches!(wrong_version, CoordinatorError::WrongVersion { .. }));
    assert!(coordinator.is_forged(&wrong_version));
    assert!(matches!(
        refuse(&mut coordinator, 2.0, Event::Left { client: ClientId(7) }),
        CoordinatorError::UnknownClient(ClientId(7))
    ));
    // The genuine update is accepted once; a duplicate (a resend after a reconnection) is refused.
    let accepted = coordinator
        .handle(t(2.0), Event::UpdateArrived(meta(client, task, version)))
        .expect("accepted");
    assert!(
        accepted
            .iter()
            .any(|c| matches!(c, Command::Fold { task: f, .. } if *f == task))
    );
    let err = refuse(
        &mut coordinator,
        2.0,
        Event::UpdateArrived(meta(client, task, version)),
    );
    assert_eq!(err, CoordinatorError::TaskNotRunning(task));
    assert!(err.to_string().contains("not running"));
    // A late resend of a task that ended is what an honest client sends: not forged.
    assert!(!coordinator.is_forged(&err));
}

#[test]
fn a_client_that_keeps_failing_is_evicted_and_may_come_back() {
    let config = AlgorithmConfig {
        evict_after_failures: 3,
        ..fedbuff()
    };
    let (_, mut coordinator) = config.build(1).expect("valid");
    let join = Event::Joined {
        client: ClientId(4),
        num_samples: 10,
    };
    let mut commands = coordinator.handle(Timestamp(0), join.clone()).expect("joins");
    for failure in 1..=3 {
        let (_, task, _) = train_of(&commands);
        commands = coordinator
            .handle(Timestamp(failure), Event::TaskFailed { task })
            .expect("failure recorded");
    }
    assert!(
        commands.iter().any(|c| matches!(
            c,
            Command::Evict {
                client: ClientId(4),
                ..
            }
        )),
        "{commands:?}"
    );
    assert_eq!(coordinator.clients().count(), 0);
    assert_eq!(coordinator.stats().evicted, 1);
    let back = coordinator.handle(Timestamp(10), join).expect("joins again");
    assert_eq!(train_of(&back).0, ClientId(4));
}

#[test]
fn a_departed_clients_task_is_lost_but_its_delivered_update_is_kept() {
    // FedBuff with K = 2: client 1 delivers (held in the buffer), then leaves; its update still
    // reaches the next aggregation.
    let config = AlgorithmConfig::new(
        RuleConfig::FedBuff { server_lr: 1.0 },
        SchedulerConfig::FedBuff(FedBuffConfig {
            buffer_size: 2,
            ..FedBuffConfig::default()
        }),
    );
    let (_, mut coordinator) = config.build(1).expect("valid");
    let mut tasks = BTreeMap::new();
    for c in [1u64, 2] {
        let cmds = coordinator
            .handle(
                Timestamp(0),
                Event::Joined {
                    client: ClientId(c),
                    num_samples: 10,
                },
            )
            .expect("joins");
        let (client, task, version) = train_of(&cmds);
        tasks.insert(client, (task, version));
    }
    let (task1, v1) = tasks[&ClientId(1)];
    let cmds = coordinator
        .handle(Timestamp(5), Event::UpdateArrived(meta(ClientId(1), task1, v1)))
        .expect("accepted");
    let (_, next1, _) = train_of(&cmds);
    coordinator
        .handle(Timestamp(6), Event::Left { client: ClientId(1) })
        .expect("leaves");
    assert!(
        coordinator.running_tasks().all(|t| t.task != next1),
        "its new task is gone"
    );
    let (task2, v2) = tasks[&ClientId(2)];
    let cmds = coordinator
        .handle(Timestamp(7), Event::UpdateArrived(meta(ClientId(2), task2, v2)))
        .expect("accepted");
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::Aggregate { updates: 2, .. })),
        "{cmds:?}"
    );
    assert_eq!(coordinator.stats().folded, 2);
}

#[test]
fn invalid_pairs_of_rule_and_scheduler_are_config_errors_that_say_why() {
    let scaffold = RuleConfig::Scaffold {
        global_lr: 1.0,
        uplink: Default::default(),
    };
    let cases: Vec<(RuleConfig, SchedulerConfig, &str)> = vec![
        (
            scaffold.clone(),
            SchedulerConfig::FedAsync(FedAsyncConfig::default()),
            "control variates",
        ),
        (
            scaffold.clone(),
            SchedulerConfig::Sync(SyncConfig {
                weighting: Some(Weighting::Samples),
                ..SyncConfig::default()
            }),
            "equal weights",
        ),
        (
            RuleConfig::FedAvgMomentum {
                beta: 0.5,
                global_step: 1.0,
                variance_reduced: false,
            },
            SchedulerConfig::FedBuff(FedBuffConfig::default()),
            "global direction",
        ),
        (
            RuleConfig::FedAsync,
            SchedulerConfig::Sync(SyncConfig::default()),
            "step sizes",
        ),
        (
            RuleConfig::FedAsync,
            SchedulerConfig::FedBuff(FedBuffConfig::default()),
            "mixing",
        ),
        (
            RuleConfig::FedBuff { server_lr: 1.0 },
            SchedulerConfig::FedCompass(FedCompassConfig::default()),
            "group size",
        ),
    ];
    for (rule, scheduler, why) in cases {
        let err = AlgorithmConfig::new(rule.clone(), scheduler.clone())
            .build(0)
            .expect_err("invalid pair");
        let text = err.to_string();
        assert!(
            text.contains(why),
            "{} under {}: {text}",
            rule.name(),
            scheduler.name()
        );
        assert!(
            text.contains(rule.name()) && text.contains(scheduler.name()),
            "{text}"
        );
    }
    // Valid pairs build, including SCAFFOLD in synchronous rounds with default weighting.
    for (rule, scheduler) in [
        (scaffold, SchedulerConfig::Sync(SyncConfig::default())),
        (
            RuleConfig::FedAvg { server_lr: 1.0 },
            SchedulerConfig::FedCompass(FedCompassConfig::default()),
        ),
        (
            RuleConfig::FedCompass,
            SchedulerConfig::FedAsync(FedAsyncConfig::default()),
        ),
        (
            RuleConfig::FedAvgM {
                server_lr: 1.0,
                momentum: 0.9,
            },
            SchedulerConfig::FedBuff(FedBuffConfig::default()),
        ),
    ] {
        AlgorithmConfig::new(rule, scheduler)
            .build(0)
            .expect("valid pair");
    }
}

#[test]
fn the_algorithm_table_reads_from_toml_and_bad_parameters_say_which() {
    let text = r#"
        local_steps = 20
        local_lr = 0.05

        [rule]
        rule = "fedavg"

        [scheduler]
        scheduler = "sync"
        clients_per_round = 10
        deadline_s = 120
        over_commit = 0.3
    "#;
    let config: AlgorithmConfig = toml::from_str(text).expect("parses");
    assert_eq!(config.local_steps, 20);
    assert!(matches!(
        config.scheduler,
        SchedulerConfig::Sync(SyncConfig {
            clients_per_round: Some(10),
            ..
        })
    ));
    config.build(0).expect("valid");
    for (scheduler, why) in [
        (
            "scheduler = \"sync\"\nclients_per_round = 4\nfraction = 0.5",
            "not both",
        ),
        ("scheduler = \"fedbuff\"\nbuffer_size = 0", "buffer_size"),
        ("scheduler = \"fedfix\"\nperiod_s = -1.0", "period_s"),
        ("scheduler = \"fedcompass\"\nq_min = 50\nq_max = 10", "q_min"),
        ("scheduler = \"fedasync\"\nalpha = 1.5", "alpha"),
    ] {
        let scheduler: SchedulerConfig = toml::from_str(scheduler).expect("parses");
        let err = AlgorithmConfig::new(RuleConfig::FedAvg { server_lr: 1.0 }, scheduler)
            .build(0)
            .expect_err("invalid");
        assert!(err.to_string().contains(why), "{err}");
    }
    assert!(toml::from_str::<SchedulerConfig>("scheduler = \"fedbuff\"\nbufer_size = 3").is_err());
}

/// A client's sample count is its own claim: a declaration past `max_samples_per_client` counts
/// as the cap, and no declaration overflows the running total.
#[test]
fn a_clients_declared_samples_are_capped_and_the_total_cannot_overflow() {
    let config = AlgorithmConfig {
        max_samples_per_client: 1_000,
        ..fedbuff()
    };
    let (_, mut coordinator) = config.build(1).expect("valid");
    let mut now = Timestamp::ZERO;
    for (client, num_samples) in [(1, 100), (2, 1_000_000_000_000), (3, u64::MAX)] {
        now = now.after_micros(1);
        coordinator
            .handle(
                now,
                Event::Joined {
                    client: ClientId(client),
                    num_samples,
                },
            )
            .expect("a join");
    }
    assert_eq!(coordinator.total_samples(), 100 + 1_000 + 1_000);
    assert_eq!(
        coordinator.client(ClientId(3)).map(|c| c.num_samples),
        Some(1_000)
    );
    // Without a cap the total saturates instead of wrapping.
    let uncapped = AlgorithmConfig {
        max_samples_per_client: u64::MAX,
        ..fedbuff()
    };
    let (_, mut coordinator) = uncapped.build(1).expect("valid");
    for client in [1, 2] {
        coordinator
            .handle(
                Timestamp::ZERO,
                Event::Joined {
                    client: ClientId(client),
                    num_samples: u64::MAX,
                },
            )
            .expect("a join");
    }
    assert_eq!(coordinator.total_samples(), u64::MAX);
}
