//! The deployment is the simulation. fl-server's daemon and three fl-client agents run in this
//! test process, over QUIC with mutual TLS on loopback, on synthetic data with a small model; fl-sim
//! runs the same experiment with the same seeds. Under synchronous rounds with full participation
//! every committed version — its model and every global vector the rule keeps (c, g, x_prev, the
//! momentum) — equals fl-sim's to 1e-5 relative, for every rule with a codec that suits it, and
//! both sides count the same upload bytes. Under the asynchronous schedulers (FedBuff, FedAsync,
//! FedCompass, FedFix), where arrival order is the network's, each acknowledged update is folded
//! into exactly one version.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

use shoal_aggregators::ServerState;
use shoal_client::agent::{AgentOptions, AgentReport};
use shoal_client::local_data::DataSource;
use shoal_core::{ClientId, ModelVersion, Timestamp};
use shoal_model::data::DatasetName;
use shoal_model::data::partition::PartitionSpec;
use shoal_net::tls;
use shoal_server::audit::AuditReport;
use shoal_server::config::ServerConfig;
use shoal_server::datadir::{self, DataDir};
use shoal_server::run::RunSummary;
use shoal_server::store::Store;
use shoal_sim::experiment::{ExperimentConfig, training_engine_for};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const CLIENTS: usize = 3;
const VERSIONS: u64 = 3;
const SEED: u64 = 11;

/// What fl-sim and fl-server read alike: seed, codec, feedback, `[model]` and `[algorithm]`.
fn method(rule: &str, scheduler: &str, codec: &str, feedback: &str) -> String {
    format!(
        r#"
seed = {SEED}
codec = "{codec}"
feedback = "{feedback}"

[model]
name = "mlp"
batch_size = 10

[algorithm]
local_steps = 4
local_lr = 0.05

[algorithm.rule]
{rule}

[algorithm.scheduler]
{scheduler}
"#
    )
}

/// Synchronous rounds in which every client trains.
fn full_rounds() -> String {
    format!("scheduler = \"sync\"\nclients_per_round = {CLIENTS}")
}

/// The experiment fl-sim runs: the method on an IID split of the synthetic set.
fn experiment(method: &str) -> ExperimentConfig {
    let text = format!(
        "{method}\n[data]\ndataset = \"synthetic\"\npartition = {{ kind = \"iid\", num_clients = {CLIENTS} }}\n\n[stop]\nrounds = {VERSIONS}\n"
    );
    toml::from_str(&text).unwrap()
}

/// fl-sim's server state after each version, from version 0.
fn simulated(method: &str) -> (Vec<ServerState>, u64) {
    let config = experiment(method);
    let (mut engine, _) = training_engine_for(&config, None).unwrap();
    let mut states = vec![engine.workload().server_state().clone()];
    while let Some(aggregated) = engine.next_aggregation(Timestamp(u64::MAX)).unwrap() {
        states.push(engine.workload().server_state().clone());
        if aggregated.version.0 >= VERSIONS {
            break;
        }
    }
    (states, engine.stats().bytes_up)
}

/// A deployment's outcome: every committed state, the tasks folded into each version, the run's
/// summary and the agents' reports.
struct Deployed {
    states: Vec<ServerState>,
    /// The lines of the server's `metrics.jsonl` and its `summary.json`.
    metrics: Vec<serde_json::Value>,
    summary_json: serde_json::Value,
    tasks: BTreeMap<u64, Vec<u64>>,
    summary: RunSummary,
    reports: Vec<AgentReport>,
    /// With `[storage] keep_updates`: `fl-server audit` of every version after the first.
    audits: Vec<AuditReport>,
}

/// Runs `method` on fl-server's daemon with three fl-client agents in this process.
fn deployed(method: &str) -> Deployed {
    deployed_with(method, Fault::None)
}

/// Waits until `metrics` (the server's `metrics.jsonl`) records `version`.
async fn committed(metrics: &Path, version: u64) {
    let needle = format!("\"version\":{version},");
    loop {
        if std::fs::read_to_string(metrics).is_ok_and(|text| text.contains(&needle)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An agent that is stopped as a killed process would be — its connection and memory gone — once
/// version 1 is committed, and started again with the same identity and state folder.
async fn restarted_agent(options: AgentOptions, metrics: &Path) -> anyhow::Result<AgentReport> {
    let mut first = Box::pin(shoal_client::agent::run(options.clone()));
    tokio::select! {
        report = &mut first => panic!("the run ended before the agent was restarted: {report:?}"),
        () = committed(metrics, 1) => {}
    }
    drop(first);
    shoal_client::agent::run(options).await
}

/// What goes wrong in a deployed run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// This agent is stopped once version 1 is committed and started again from its state folder.
    RestartedClient(usize),
    /// The server's versions folder is gone once it listens, so the commit of version 1 fails:
    /// fl-server stops with the error, and, started again with the folder back, resumes from its
    /// log while the agents reconnect.
    FailedCommit,
}

/// Runs `method` as [`deployed`] does, with `fault`.
fn deployed_with(method: &str, fault: Fault) -> Deployed {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let root = tempfile::tempdir().unwrap();
    let dir = DataDir::new(root.path());
    let loopback = "127.0.0.1:0".parse().unwrap();
    datadir::init(
        &dir,
        "localhost",
        &["localhost".to_string()],
        loopback,
        loopback,
        None,
    )
    .unwrap();
    let text = format!(
        "{method}\n[data]\ndataset = \"synthetic\"\n\n[stop]\nrounds = {VERSIONS}\n\n[eval]\nenabled = false\n\n\
         [server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n"
    );
    std::fs::write(dir.config(), text).unwrap();
    let config = ServerConfig::load(&dir.config()).unwrap();
    // Client ids in the order of the simulated fleet (a deployment numbers clients by first
    // Hello, which is a race here): device-i is client i, which trains partition i in fl-sim.
    {
        let store = Store::open(&dir.root().join("state"), config.fingerprint()).unwrap();
        for i in 0..CLIENTS {
            let name = format!("device-{i}");
            datadir::issue_client(&dir, &name).unwrap();
            assert_eq!(store.client_id(&name).unwrap(), ClientId(i as u64));
        }
    }
    let server = std::thread::spawn({
        let dir = DataDir::new(root.path());
        move || shoal_server::daemon::serve(&dir, None)
    });
    let listening = dir.root().join("listening");
    let deadline = Instant::now() + Duration::from_secs(60);
    let address = loop {
        if let Ok(text) = std::fs::read_to_string(&listening)
            && let Ok(address) = text.trim().parse()
        {
            break address;
        }
        if server.is_finished() {
            match server.join() {
                Ok(result) => panic!("fl-server stopped before it listened: {:?}", result.err()),
                Err(_) => panic!("fl-server panicked before it listened"),
            }
        }
        assert!(Instant::now() < deadline, "fl-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    };
    let server = if fault == Fault::FailedCommit {
        // The restarted server listens where the agents reconnect to.
        let text = std::fs::read_to_string(dir.config()).unwrap();
        let pinned = text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{address}\""), 1);
        assert_ne!(pinned, text);
        std::fs::write(dir.config(), pinned).unwrap();
        let versions = dir.root().join("state").join("versions");
        let away = dir.root().join("state").join("versions.away");
        std::fs::rename(&versions, &away).unwrap();
        let root = dir.root().to_path_buf();
        std::thread::spawn(move || {
            let failed = server.join().unwrap().expect_err("the commit of version 1 fails");
            let message = format!("{failed:#}");
            assert!(message.contains("restart fl-server"), "{message}");
            std::fs::rename(&away, &versions).unwrap();
            shoal_server::daemon::serve(&DataDir::new(&root), None)
        })
    } else {
        server
    };
    let agent = |i: usize| {
        let identity = dir.client_dir(&format!("device-{i}"));
        AgentOptions {
            server: address,
            server_name: "localhost".into(),
            ca_pem: std::fs::read_to_string(identity.join("ca.pem")).unwrap(),
            identity: Some(
                tls::read_pem_pair(&identity.join("client.pem"), &identity.join("client.key")).unwrap(),
            ),
            name: format!("device-{i}"),
            data: DataSource::Partition {
                dataset: DatasetName::Synthetic,
                data_dir: None,
                partition: PartitionSpec::Iid { num_clients: CLIENTS },
                index: i,
                seed: SEED,
            },
            seed: i as u64,
            give_up_after: Duration::from_secs(60),
            pipeline: None,
            state_dir: Some(identity),
        }
    };
    let metrics = dir.root().join("metrics.jsonl");
    let life = |i: usize| {
        let options = agent(i);
        let metrics = metrics.clone();
        async move {
            if fault == Fault::RestartedClient(i) {
                restarted_agent(options, &metrics).await
            } else {
                shoal_client::agent::run(options).await
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a, b, c) = runtime.block_on(async { tokio::join!(life(0), life(1), life(2)) });
    let reports = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    let summary = server.join().unwrap().unwrap();
    let store = Store::open(&dir.root().join("state"), config.fingerprint()).unwrap();
    let mut states = Vec::new();
    let mut tasks: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for record in store.version_records().unwrap() {
        assert_eq!(
            record.version,
            ModelVersion(states.len() as u64),
            "versions in order"
        );
        states.push(store.load_version(record.version).unwrap());
        for task in record.tasks {
            tasks.entry(task.0).or_default().push(record.version.0);
        }
    }
    drop(store);
    let audits = if config.storage.keep_updates {
        (1..states.len() as u64)
            .map(|v| shoal_server::audit::audit(&dir, &[], Some(v), 1e-6).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let metrics = std::fs::read_to_string(dir.root().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let summary_json =
        serde_json::from_str(&std::fs::read_to_string(dir.root().join("summary.json")).unwrap()).unwrap();
    Deployed {
        states,
        metrics,
        summary_json,
        tasks,
        summary,
        reports,
        audits,
    }
}

/// The largest difference between two vectors, relative to the larger of their largest values.
fn relative_gap(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a
        .iter()
        .chain(b)
        .fold(0f64, |m, v| m.max(f64::from(v.abs())))
        .max(1e-12);
    let gap = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
    gap / scale
}

/// A vector of a server state by name, beside the same vector of another state (if it has one).
type Paired<'a> = (&'static str, &'a [f32], Option<&'a [f32]>);

/// Every vector of two server states, side by side, by name.
fn vectors<'a>(a: &'a ServerState, b: &'a ServerState) -> Vec<Paired<'a>> {
    let pairs = [
        ("c", &a.c, &b.c),
        ("g", &a.g, &b.g),
        ("momentum", &a.momentum, &b.momentum),
        ("x_prev", &a.x_prev, &b.x_prev),
    ];
    let mut out = vec![("x", a.x.as_slice(), Some(b.x.as_slice()))];
    for (name, left, right) in pairs {
        if let Some(left) = left {
            out.push((name, left.as_slice(), right.as_deref()));
        }
    }
    out
}

fn assert_deployment_equals_simulation(rule: &str, codec: &str) {
    assert_deployment_equals_simulation_with(rule, codec, "none");
}

fn assert_deployment_equals_simulation_with(rule: &str, codec: &str, feedback: &str) {
    assert_equal_runs(rule, codec, feedback, Fault::None);
}

/// The deployment of `rule`, with `fault`, equals fl-sim's run.
fn assert_equal_runs(rule: &str, codec: &str, feedback: &str, fault: Fault) {
    let method = method(rule, &full_rounds(), codec, feedback);
    let (simulated, sim_bytes_up) = simulated(&method);
    let deployed = deployed_with(&method, fault);
    let label = format!(
        "`{}` with `{codec}`, feedback `{feedback}`",
        rule.replace('\n', ", ")
    );
    assert_eq!(
        deployed.states.len(),
        simulated.len(),
        "{label}: versions committed by fl-server and by fl-sim"
    );
    let mut worst = 0f64;
    for (v, (server, sim)) in deployed.states.iter().zip(&simulated).enumerate() {
        assert_eq!(
            (
                server.c.is_some(),
                server.g.is_some(),
                server.momentum.is_some(),
                server.x_prev.is_some()
            ),
            (
                sim.c.is_some(),
                sim.g.is_some(),
                sim.momentum.is_some(),
                sim.x_prev.is_some()
            ),
            "{label}: version {v} keeps other vectors"
        );
        for (name, left, right) in vectors(server, sim) {
            let gap = relative_gap(left, right.unwrap());
            assert!(
                gap <= 1e-5,
                "{label}: version {v}'s {name} differs by {gap:e} (relative)"
            );
            worst = worst.max(gap);
        }
    }
    // Shown with --nocapture: the measured agreement of each case.
    println!("{label}: largest relative gap over every version and vector {worst:e}");
    // The same payloads crossed the wire (a restarted agent may send one twice: the server
    // counts what it accepted).
    assert_eq!(
        deployed.summary.totals.bytes_up, sim_bytes_up,
        "{label}: upload bytes"
    );
    assert_eq!(
        deployed.summary.totals.updates_folded,
        VERSIONS * CLIENTS as u64,
        "{label}"
    );
    assert!(
        deployed.tasks.values().all(|v| v.len() == 1),
        "{label}: an update folded twice"
    );
    for report in &deployed.reports {
        assert_eq!(
            report.final_version, VERSIONS,
            "{label}: an agent did not see the end"
        );
    }
    // The model moved: equality of two runs that did nothing would prove nothing.
    let moved = relative_gap(&deployed.states[0].x, &deployed.states[VERSIONS as usize].x);
    assert!(moved > 1e-3, "{label}: the model barely moved ({moved:e})");
}

#[test]
fn fedavg_over_quic_equals_fl_sim() {
    assert_deployment_equals_simulation("rule = \"fedavg\"", "identity");
    assert_deployment_equals_simulation("rule = \"fedavg\"", "fedzip");
    // Each client's error-feedback memory carries over from task to task in both drivers.
    assert_deployment_equals_simulation_with("rule = \"fedavg\"", "topk(0.1)", "ef");
    assert_deployment_equals_simulation_with("rule = \"fedavgm\"", "topk(0.1) | fp16", "ef");
    // EF21: fl-server keeps each client's h_i and folds h_i + C(u − h_i), as the device computed.
    assert_deployment_equals_simulation_with("rule = \"fedavg\"", "topk(0.1)", "ef21");
}

#[test]
fn server_momentum_over_quic_equals_fl_sim() {
    assert_deployment_equals_simulation("rule = \"fedavgm\"\nserver_lr = 1.0\nmomentum = 0.9", "identity");
    assert_deployment_equals_simulation("rule = \"fedavg-m\"\nbeta = 0.5\nglobal_step = 1.0", "identity");
    assert_deployment_equals_simulation(
        "rule = \"fedavg-m\"\nbeta = 0.5\nglobal_step = 1.0\nvariance_reduced = true",
        "identity",
    );
}

#[test]
fn control_variates_over_quic_equal_fl_sim() {
    assert_deployment_equals_simulation("rule = \"scaffold\"", "identity");
    assert_deployment_equals_simulation("rule = \"scaffold\"\nuplink = \"halved\"", "zstd(1)");
    assert_deployment_equals_simulation("rule = \"scaffold-m\"\nbeta = 0.5\nglobal_step = 1.0", "identity");
    assert_deployment_equals_simulation(
        "rule = \"scaffold-m\"\nbeta = 0.5\nglobal_step = 1.0\nvariance_reduced = true",
        "identity",
    );
    assert_deployment_equals_simulation("rule = \"scallion\"\nalpha = 0.1", "randk(0.1)");
    assert_deployment_equals_simulation(
        "rule = \"scallion\"\nalpha = 0.1\nalpha_placement = \"payload\"",
        "randk(0.1)",
    );
    assert_deployment_equals_simulation("rule = \"scafcom\"\nbeta = 0.2", "topk(0.1)");
}

/// A device restarted in the middle of a SCAFFOLD run resumes its control variate (and the update
/// it may have sent unacknowledged) from its state folder, so the run still equals fl-sim's: had
/// `c_i` restarted from zero, the next version would differ. After the restart the server may send
/// the next task before it acknowledges the resent update; the task trains from that update's state.
#[test]
fn a_restarted_client_resumes_its_control_variate() {
    assert_equal_runs(
        "rule = \"scaffold\"",
        "identity",
        "none",
        Fault::RestartedClient(1),
    );
    assert_equal_runs("rule = \"fedavg\"", "topk(0.1)", "ef", Fault::RestartedClient(2));
    // The device's h_i survives in its state file, the server's in its EF21 memory.
    assert_equal_runs(
        "rule = \"fedavg\"",
        "topk(0.1)",
        "ef21",
        Fault::RestartedClient(1),
    );
}

/// A commit that fails (its folder is gone, as on a full or failed disk) stops fl-server with the
/// error rather than leaving it serving from a run behind its log; started again, it replays the
/// log — the acknowledged updates of the failed version folded once, their bytes counted — and the
/// run still equals fl-sim's, with the EF21 memories and the control variates it keeps.
#[test]
fn a_failed_commit_stops_the_server_and_its_restart_resumes_the_same_run() {
    assert_equal_runs("rule = \"scaffold\"", "identity", "none", Fault::FailedCommit);
    assert_equal_runs("rule = \"fedavg\"", "topk(0.1)", "ef21", Fault::FailedCommit);
}

/// fl-server's `metrics.jsonl` and `summary.json` have fl-sim's fields with fl-sim's values (the
/// server adds only its runtime and process figures), for the same run.
#[test]
fn metrics_have_one_schema_and_one_meaning() {
    let method = method("rule = \"fedavg\"", &full_rounds(), "topk(0.1)", "ef");
    let simulated =
        shoal_sim::experiment::run(&experiment(&method), None, &mut shoal_sim::experiment::Quiet).unwrap();
    let deployed = deployed(&method);
    let keys = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(
        deployed.metrics.len(),
        simulated.records.len(),
        "one record per version on both sides"
    );
    for (server, sim) in deployed.metrics.iter().zip(&simulated.records) {
        let sim = serde_json::to_value(sim).unwrap();
        let mut expected = keys(&sim);
        expected.insert("runtime".into());
        assert_eq!(keys(server), expected, "metrics.jsonl fields");
        for field in [
            "version",
            "updates",
            "updates_folded",
            "bytes_up",
            "bytes_down",
            "staleness_mean",
            "staleness_max",
        ] {
            assert_eq!(server[field], sim[field], "version {}: {field}", sim["version"]);
        }
        match (server["client_loss"].as_f64(), sim["client_loss"].as_f64()) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "client_loss {a} vs {b}"),
            (a, b) => assert_eq!(a.is_some(), b.is_some(), "client_loss {a:?} vs {b:?}"),
        }
    }
    let sim_summary = serde_json::to_value(&simulated.summary).unwrap();
    // Both summaries have every field of the shared part; those a run determines are equal.
    let shared = keys(&serde_json::to_value(&simulated.summary.totals).unwrap());
    for field in &shared {
        assert!(
            deployed.summary_json.get(field).is_some(),
            "fl-server's summary.json lacks {field}"
        );
        let timing = ["time_s", "wall_time_s"].contains(&field.as_str());
        // Accuracies: fl-server's run here evaluates nothing ([eval] enabled = false).
        if !timing && !field.ends_with("accuracy") {
            assert_eq!(
                deployed.summary_json[field], sim_summary[field],
                "summary.json: {field}"
            );
        }
    }
}

/// Each acknowledged update of an asynchronous run is folded into exactly one version.
fn assert_each_update_folded_once(rule: &str, scheduler: &str, codec: &str, feedback: &str) {
    let kept = "\n[storage]\nkeep_updates = true\nkeep_versions = 100\n";
    let deployed = deployed(&format!("{}{kept}", method(rule, scheduler, codec, feedback)));
    let label = format!("`{rule}` under `{scheduler}` with `{codec}`, feedback `{feedback}`");
    assert_eq!(deployed.states.len(), VERSIONS as usize + 1, "{label}");
    assert!(
        deployed.tasks.values().all(|v| v.len() == 1),
        "{label}: an update folded twice"
    );
    let folded = deployed.tasks.len() as u64;
    assert_eq!(folded, deployed.summary.totals.updates_folded, "{label}");
    let accepted: u64 = deployed.reports.iter().map(|r| r.accepted).sum();
    assert!(
        accepted >= folded,
        "{label}: {folded} folded but {accepted} acknowledged"
    );
    // Every version is the rule applied to the updates the server kept for it, each with the
    // weight the scheduler gave it (fl-server's audit folds them again, flat, in the engine).
    assert_eq!(deployed.audits.len(), VERSIONS as usize, "{label}");
    for audit in &deployed.audits {
        assert!(audit.ok, "{label}: {audit:?}");
        assert!(
            audit.updates > 0,
            "{label}: version {} folded nothing",
            audit.version
        );
    }
}

#[test]
fn asynchronous_schedulers_over_quic_fold_each_update_once() {
    let fedbuff = ("rule = \"fedbuff\"", "scheduler = \"fedbuff\"\nbuffer_size = 2");
    let fedasync = ("rule = \"fedasync\"", "scheduler = \"fedasync\"");
    let fedcompass = ("rule = \"fedcompass\"", "scheduler = \"fedcompass\"");
    // FedFix commits a version per window of real time that folded updates (empty ones skipped).
    let fedfix = ("rule = \"fedfix\"", "scheduler = \"fedfix\"\nperiod_s = 0.2");
    // Each with the identity codec and with a codec that suits it: FedAsync uploads a model, so a
    // quantizer and no sparsifier; the others upload deltas.
    for (rule, scheduler, codec, feedback) in [
        (fedbuff.0, fedbuff.1, "identity", "none"),
        (fedbuff.0, fedbuff.1, "topk(0.1)", "ef"),
        (fedasync.0, fedasync.1, "identity", "none"),
        (fedasync.0, fedasync.1, "int8", "none"),
        (fedcompass.0, fedcompass.1, "identity", "none"),
        (fedcompass.0, fedcompass.1, "fedzip", "none"),
        (fedfix.0, fedfix.1, "identity", "none"),
        (fedfix.0, fedfix.1, "fp16", "none"),
    ] {
        assert_each_update_folded_once(rule, scheduler, codec, feedback);
    }
}
