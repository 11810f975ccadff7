//! fl-server killed with SIGKILL while devices train against it: once in the middle of an
//! aggregation, and at ten seeded random instants of one run (the chaos test) — in handshakes,
//! uploads, folds and commits alike. Each restart resumes the same run, and every update a client
//! was told was accepted, or the server logged as stored before a kill, is folded into exactly one
//! committed version, which equals a flat aggregation of the updates kept for it.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rand::{RngExt, SeedableRng};
use shoal_core::ModelVersion;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Checks that every update the devices' logs call accepted, and every task in `stored`, is folded
/// into exactly one committed version, and that no task is folded twice; the committed versions.
fn assert_each_update_folded_once(dir: &Path, devices: &[Process], stored: &[u64]) -> Vec<ModelVersion> {
    let (versions, folded) = folded_tasks(dir);
    let mut acknowledged = BTreeSet::new();
    for device in devices {
        acknowledged.extend(tasks_in(&device.log, "update accepted"));
    }
    assert!(!acknowledged.is_empty(), "the devices logged no accepted update");
    for task in acknowledged.iter().chain(stored) {
        let in_versions = folded.get(task).cloned().unwrap_or_default();
        assert_eq!(
            in_versions.len(),
            1,
            "task-{task} was aggregated into versions {in_versions:?}"
        );
    }
    assert!(
        folded.values().all(|v| v.len() == 1),
        "no update is aggregated twice"
    );
    let numbers: Vec<u64> = versions.iter().map(|v| v.0).collect();
    assert_eq!(
        numbers,
        (0..numbers.len() as u64).collect::<Vec<_>>(),
        "the committed versions follow one another from 0"
    );
    versions
}

#[test]
fn a_server_killed_mid_aggregation_resumes_and_aggregates_each_acknowledged_update_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let clients = 5;
    let rounds = 4;
    init_run(dir, clients, |text| {
        // A snapshot after every version: the restart restores one and replays the log after it.
        text.replace("rounds = 3", &format!("rounds = {rounds}"))
            .replace("reconnect_grace_s = 30", "reconnect_grace_s = 20")
            .replace("every = 1", "every = 4")
            .replace("snapshot_every = 50", "snapshot_every = 1")
    });
    let (mut server, address) = start_server(dir, 1);
    // The restarted server must listen where the clients reconnect to.
    pin_listen_address(dir, &address);
    let mut devices: Vec<Process> = (0..clients)
        .map(|i| start_client(dir, &address, i, clients))
        .collect();
    // Version 1 committed, then the first update of round 2 made durable: kill -9 right there,
    // while that round's aggregation is in progress.
    wait_for_line(&server.log, "committed", 1, Duration::from_secs(120));
    wait_for_line(&server.log, "update stored", clients, Duration::from_secs(120));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let stored_before = tasks_in(&server.log, "update stored");
    assert!(
        stored_before.len() > clients,
        "the kill came after an update of round 2 was stored"
    );

    let (mut server, _) = start_server(dir, 2);
    let status = server.wait_for_exit(Duration::from_secs(240));
    assert!(
        status.success(),
        "the restarted server failed:\n{}",
        tail(&server.log)
    );
    for device in &mut devices {
        assert!(
            device.wait_for_exit(Duration::from_secs(60)).success(),
            "{}",
            tail(&device.log)
        );
    }

    let versions = assert_each_update_folded_once(dir, &devices, &stored_before);
    assert_eq!(versions.last(), Some(&ModelVersion(rounds)));
    let restored = std::fs::read_to_string(&server.log).unwrap();
    assert!(restored.contains("restored the run from its log"), "{restored}");
    assert!(
        dir.join("state").join("snapshot.bin").exists(),
        "the run was snapshotted"
    );
    assert!(
        restored.contains("snapshot_through=") && !restored.contains("snapshot_through=0 "),
        "the restart began at a snapshot: {restored}"
    );
}

/// `fl-server audit DIR --version V`: whether version V equals a flat aggregation of the updates
/// kept for it.
fn audit(dir: &Path, version: u64) -> serde_json::Value {
    let out = run(Command::new(bin_dir().join("fl-server"))
        .arg("audit")
        .arg(dir)
        .args(["--version", &version.to_string(), "--json"]));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_run_killed_at_ten_seeded_random_instants_folds_every_acknowledged_update_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let clients = 4;
    let rounds = 80;
    init_run(dir, clients, |text| {
        text.replace("rounds = 3", &format!("rounds = {rounds}"))
            .replace("clients_per_round = 5", &format!("clients_per_round = {clients}"))
            .replace("local_steps = 50", "local_steps = 20")
            .replace("reconnect_grace_s = 30", "reconnect_grace_s = 20")
            .replace("every = 1", "every = 20")
            .replace("# test_samples = 2000", "test_samples = 500")
            .replace("keep_versions = 20", "keep_versions = 0")
            .replace("keep_updates = false", "keep_updates = true")
            .replace("snapshot_every = 50", "snapshot_every = 3")
    });
    let (mut server, address) = start_server(dir, 0);
    pin_listen_address(dir, &address);
    let mut devices: Vec<Process> = (0..clients)
        .map(|i| start_client(dir, &address, i, clients))
        .collect();
    // Each instant is drawn after the server listens again: some land in handshakes, some in
    // replays, uploads, folds or commits.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut stored: Vec<u64> = Vec::new();
    let mut logs: Vec<PathBuf> = Vec::new();
    for kill in 1..=10 {
        let after = Duration::from_secs_f64(rng.random_range(0.05..2.0));
        std::thread::sleep(after);
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the run ended before kill {kill}:\n{}",
            tail(&server.log)
        );
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        let committed = tasks_in(&server.log, "update stored");
        eprintln!(
            "kill {kill}: {:.2} s after listening, {} updates stored by that process",
            after.as_secs_f64(),
            committed.len()
        );
        stored.extend(committed);
        logs.push(server.log.clone());
        (server, _) = start_server(dir, kill);
    }
    let status = server.wait_for_exit(Duration::from_secs(300));
    assert!(status.success(), "the last start failed:\n{}", tail(&server.log));
    for device in &mut devices {
        assert!(
            device.wait_for_exit(Duration::from_secs(60)).success(),
            "{}",
            tail(&device.log)
        );
    }
    assert!(!stored.is_empty(), "the killed processes stored updates");
    let versions = assert_each_update_folded_once(dir, &devices, &stored);
    assert_eq!(versions.last(), Some(&ModelVersion(rounds)));
    let resumed = logs
        .iter()
        .skip(1)
        .chain([&server.log])
        .filter(|log| {
            std::fs::read_to_string(log)
                .unwrap()
                .contains("restored the run from its log")
        })
        .count();
    assert!(
        resumed >= 5,
        "{resumed} starts after a kill resumed a run in progress"
    );
    for version in 1..=rounds {
        let report = audit(dir, version);
        assert_eq!(report["ok"], true, "version {version}: {report}");
        assert!(
            report["updates"].as_u64().unwrap() >= 1,
            "version {version}: {report}"
        );
    }
}
