//! The fleet simulator end to end: same seed ⇒ same metrics (whatever the thread count), the files
//! `fl-sim run` writes, systems-only accounting, trace-driven fleets, and every example file valid.

mod common;

use common::without_wall_clock;

use shoal_sim::experiment::{ExperimentConfig, Mode, Quiet, run};
use shoal_sim::report;
use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A small FedCompass run on synthetic data with a heterogeneous, lossy fleet.
fn small(seed: u64) -> ExperimentConfig {
    let text = format!(
        r#"
        name = "small"
        seed = {seed}
        [data]
        dataset = "synthetic"
        [data.synthetic]
        num_clients = 8
        alpha = 0.5
        beta = 0.5
        [model]
        name = "logreg"
        [algorithm]
        local_lr = 0.05
        [algorithm.rule]
        rule = "fedcompass"
        [algorithm.scheduler]
        scheduler = "fedcompass"
        q_min = 5
        q_max = 20
        [fleet]
        base_step_time_s = 0.1
        compute = {{ kind = "lognormal", sigma = 1.0 }}
        jitter = 0.2
        up = {{ kind = "lognormal", median_mbit_s = 1, sigma = 0.5 }}
        dropout = 0.1
        [stop]
        time_s = 120
        [eval]
        every = 3
        "#
    );
    toml::from_str(&text).expect("the test experiment parses")
}

#[test]
fn same_seed_same_metrics_whatever_the_thread_count() {
    let a = run(&small(3), None, &mut Quiet).unwrap();
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let b = single.install(|| run(&small(3), None, &mut Quiet).unwrap());
    assert!(a.records.len() > 5, "{} records", a.records.len());
    assert!(a.summary.engine.tasks_dropped > 0, "the fleet loses tasks");
    assert_eq!(without_wall_clock(&a.records), without_wall_clock(&b.records));
    assert_eq!(a.summary.engine, b.summary.engine);

    // metrics.jsonl is byte-identical once the wall-clock field is blanked.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    report::write_run(da.path(), &a).unwrap();
    report::write_run(db.path(), &b).unwrap();
    let strip = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["wall_s"] = serde_json::Value::Null;
                v
            })
            .collect()
    };
    assert_eq!(strip(da.path()), strip(db.path()));

    let c = run(&small(4), None, &mut Quiet).unwrap();
    assert_ne!(without_wall_clock(&a.records), without_wall_clock(&c.records));
}

#[test]
fn a_run_writes_metrics_summary_and_plots() {
    let mut config = small(1);
    config.stop.target_accuracy = Some(0.3);
    let out = run(&config, None, &mut Quiet).unwrap();
    let dir = tempfile::tempdir().unwrap();
    report::write_run(dir.path(), &out).unwrap();
    for file in [
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "accuracy_vs_time.svg",
        "accuracy_vs_bytes.svg",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
    for key in [
        "name",
        "rounds",
        "final_accuracy",
        "best_accuracy",
        "time_s",
        "wall_time_s",
        "initial_accuracy",
        "updates_folded",
        "feedback",
        "bytes_up",
        "bytes_down",
        "target_accuracy",
        "rounds_to_target",
        "time_to_target_s",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    let s = &out.summary;
    // Reaching the target stops the run at that evaluation.
    assert_eq!(s.rounds_to_target, Some(s.totals.rounds), "{s:?}");
    assert!(s.totals.final_accuracy.unwrap() >= 0.3);
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), out.records.len() + 1);
    // Bytes only grow, time only moves forward.
    assert!(out.records.windows(2).all(|w| w[0].bytes_up <= w[1].bytes_up
        && w[0].bytes_down <= w[1].bytes_down
        && w[0].time_s <= w[1].time_s
        && w[0].version < w[1].version));
    assert!(s.totals.bytes_up > 0 && s.totals.bytes_down > 0);
}

#[test]
fn learning_happens_and_a_compressing_codec_sends_fewer_bytes() {
    let mut dense = small(5);
    dense.algorithm = toml::from_str(
        r#"
        local_steps = 10
        local_lr = 0.05
        [rule]
        rule = "fedavg"
        [scheduler]
        scheduler = "sync"
        clients_per_round = 4
        "#,
    )
    .unwrap();
    dense.fleet.dropout = 0.0;
    dense.stop = toml::from_str("rounds = 20").unwrap();
    let mut sparse = dense.clone();
    sparse.codec = "topk(0.1) | kmeans(3) | smallest".parse().unwrap();
    let a = run(&dense, None, &mut Quiet).unwrap();
    let b = run(&sparse, None, &mut Quiet).unwrap();
    let first = a.records[0].accuracy.unwrap();
    assert!(
        a.summary.totals.final_accuracy.unwrap() > first + 0.2,
        "accuracy {first} → {:?}",
        a.summary.totals.final_accuracy
    );
    assert_eq!(a.summary.totals.rounds, 20);
    assert_eq!(a.summary.engine.folds, 80, "4 updates per synchronous round");
    assert_eq!(
        a.summary.totals.bytes_down, b.summary.totals.bytes_down,
        "downloads are the dense model"
    );
    assert!(
        b.summary.totals.bytes_up * 5 < a.summary.totals.bytes_up,
        "top-10 % + 3-means: {} vs dense {}",
        b.summary.totals.bytes_up,
        a.summary.totals.bytes_up
    );
}

#[test]
fn systems_only_runs_large_fleets_without_data() {
    let mut config = small(2);
    config.mode = Mode::SystemsOnly;
    config.model.name = "cnn".into();
    config.data.dataset = shoal_model::data::DatasetName::Mnist;
    config.fleet.count = Some(3000);
    config.fleet.availability =
        toml::from_str::<toml::Table>("a = { kind = \"diurnal\", period_s = 600, online_fraction = 0.5 }")
            .unwrap()["a"]
            .clone()
            .try_into()
            .unwrap();
    config.algorithm = toml::from_str(
        r#"
        local_steps = 20
        [rule]
        rule = "fedbuff"
        [scheduler]
        scheduler = "fedbuff"
        buffer_size = 50
        concurrency = 300
        "#,
    )
    .unwrap();
    config.stop = toml::from_str("time_s = 1200").unwrap();
    config.eval.every = Some(10);
    let out = run(&config, None, &mut Quiet).unwrap();
    let s = &out.summary;
    assert_eq!(s.clients, 3000);
    assert!(s.totals.final_accuracy.is_none());
    assert!(s.totals.rounds > 10, "{s:?}");
    let e = &s.engine;
    assert!(e.tasks_lost_offline > 0, "diurnal windows end tasks: {e:?}");
    assert!(
        e.folds >= 50 * e.aggregations && e.folds < 50 * (e.aggregations + 1),
        "FedBuff folds K per version (the last buffer may be part full): {e:?}"
    );
    assert!(e.folds + e.discards <= e.tasks_delivered);
    assert!(
        e.tasks_delivered + e.tasks_dropped + e.tasks_lost_offline + e.tasks_cancelled <= e.tasks_started
    );
    // Uploads are the dense model's size under the identity codec.
    let per_upload = e.bytes_up as f64 / e.tasks_delivered as f64;
    assert!(
        (per_upload / (s.num_params as f64 * 4.0) - 1.0).abs() < 0.01,
        "{per_upload}"
    );
}

#[test]
fn charging_aggregation_shows_when_the_server_is_the_bottleneck() {
    let mut config = small(4);
    config.mode = Mode::SystemsOnly;
    config.model.name = "cnn".into();
    config.data.dataset = shoal_model::data::DatasetName::Mnist;
    config.fleet.count = Some(40);
    config.fleet.dropout = 0.0;
    config.algorithm = toml::from_str(
        r#"
        local_steps = 5
        [rule]
        rule = "fedavg"
        [scheduler]
        scheduler = "sync"
        clients_per_round = 20
        "#,
    )
    .unwrap();
    config.stop = toml::from_str("rounds = 4").unwrap();
    let with = |aggregation: &str| {
        let mut c = config.clone();
        c.server = toml::from_str(aggregation).unwrap();
        run(&c, None, &mut Quiet).unwrap().summary
    };
    let free = with("");
    assert!(free.aggregation.is_none(), "aggregation is free unless charged");
    let measured = with("[aggregation]\nmax_leaves = 2");
    let slow = with("[aggregation]\nmax_leaves = 1\ncost = { fold_ns_per_value = 20000.0 }");
    for s in [&measured, &slow] {
        let a = s.aggregation.as_ref().unwrap();
        assert_eq!(a.timeline.folds, s.engine.folds, "every fold is charged");
        assert_eq!(a.timeline.aggregations, s.totals.rounds);
        assert!(s.totals.time_s > free.totals.time_s);
    }
    // 1.66 M parameters at 3 ns per value on two leaves: milliseconds per round, a tiny share.
    let m = measured.aggregation.as_ref().unwrap();
    assert!(m.share_of_time < 0.01 && m.utilisation < 0.01, "{m:?}");
    // 33 s per fold on one leaf, 20 uploads per round: the server is the bottleneck.
    let s = slow.aggregation.as_ref().unwrap();
    assert!(s.share_of_time > 0.5 && s.utilisation > 0.9, "{s:?}");
    assert!(s.timeline.max_queue_depth > 1 && s.timeline.queue_wait_s > 0.0);
    assert_eq!(s.timeline.max_leaves, 1);
}

#[test]
fn trace_driven_fleets_use_the_real_phone_and_network_traces() {
    let data = common::shared_data();
    let mut config = small(6);
    config.fleet = toml::from_str(
        r#"
        compute = { kind = "ai_benchmark" }
        down = { kind = "hsdpa" }
        up = { kind = "hsdpa", scale = 0.5 }
        "#,
    )
    .unwrap();
    config.fleet.count = Some(400);
    let summary = config.fleet_summary(Some(&data)).unwrap();
    // The phones span two orders of magnitude; HSDPA rates lie within the measured 0.15–8 Mbit/s.
    assert!(summary.speed_span > 50.0, "{summary}");
    assert!(
        summary.down_mbit_s.min >= 0.15 && summary.down_mbit_s.max <= 8.1,
        "{summary}"
    );
    assert!(
        (summary.up_mbit_s.p50 / summary.down_mbit_s.p50 - 0.5).abs() < 0.2,
        "{summary}"
    );
    let out = run(&config, Some(&data), &mut Quiet).unwrap();
    assert!(out.summary.totals.rounds > 0);
    config.fleet.up = toml::from_str::<toml::Table>("u = { kind = \"hsdpa\" }").unwrap()["u"]
        .clone()
        .try_into()
        .unwrap();
    let err = run(&config, Some(Path::new("/nonexistent")), &mut Quiet).unwrap_err();
    assert!(format!("{err:#}").contains("pensieve_norway_hsdpa"), "{err:#}");
}

#[test]
fn every_example_is_a_valid_experiment() {
    let mut seen = 0;
    let mut stack = vec![examples()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml")
                && !path
                    .file_stem()
                    .is_some_and(|s| s.to_string_lossy().starts_with('_'))
            {
                ExperimentConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
    }
    assert!(seen >= 1);
}

#[test]
fn bad_experiments_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let base =
        "[data]\ndataset = \"synthetic\"\n[model]\nname = \"logreg\"\n[algorithm.rule]\nrule = \"fedavg\"\n";
    let no_stop = write("a.toml", base);
    let e = format!("{:#}", ExperimentConfig::load(&no_stop).unwrap_err());
    assert!(e.contains("[stop]"), "{e}");
    let typo = write("b.toml", &format!("{base}[stop]\nrounds = 3\nroudns = 4\n"));
    let e = format!("{:#}", ExperimentConfig::load(&typo).unwrap_err());
    assert!(e.contains("roudns"), "{e}");
    let pairing = write(
        "c.toml",
        "[data]\ndataset = \"synthetic\"\n[model]\nname = \"logreg\"\n[algorithm.rule]\nrule = \"scaffold\"\n[algorithm.scheduler]\nscheduler = \"fedbuff\"\n[stop]\nrounds = 3\n",
    );
    let e = format!("{:#}", ExperimentConfig::load(&pairing).unwrap_err());
    assert!(e.contains("scaffold"), "{e}");
    // The engine's codec–rule check, as fl-server makes it: SCAFFOLD with a lossy codec.
    let lossy = write(
        "d.toml",
        &format!(
            "codec = \"topk(0.1)\"\n{}[stop]\nrounds = 3\n",
            base.replace("fedavg", "scaffold")
        ),
    );
    let e = format!("{:#}", ExperimentConfig::load(&lossy).unwrap_err());
    assert!(
        e.contains("scaffold") && e.contains("topk(0.1)") && e.contains("lossless"),
        "{e}"
    );
    // `extends` merges tables and names the file it could not read.
    write("base.toml", &format!("{base}[stop]\nrounds = 3\n"));
    let child = write(
        "child.toml",
        "extends = \"base.toml\"\nname = \"child\"\n[stop]\ntime_s = 10.0\n",
    );
    let c = ExperimentConfig::load(&child).unwrap();
    assert_eq!(
        (c.stop.rounds, c.stop.time_s, c.name.as_deref()),
        (Some(3), Some(10.0), Some("child"))
    );
    let orphan = write("orphan.toml", "extends = \"missing.toml\"\n");
    let e = format!("{:#}", ExperimentConfig::load(&orphan).unwrap_err());
    assert!(e.contains("missing.toml"), "{e}");
}
