//! fl-server's run driven without a network, as the daemon drives it, over a state directory
//! damaged between two starts: a damaged acknowledged update blocks the start until the operator
//! drops it; a damaged latest version is made again, bit for bit, from the version before and
//! its retained updates; with the version before damaged too, the start is refused with what is
//! missing; `fl-server check` reports each case; and a run whose event log is compacted behind
//! Coordinator snapshots restarts into the same state as one that replays its whole log.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use common::offline::*;
use common::*;
use shoal_core::{ClientId, ModelVersion, TaskId};
use shoal_server::config::ServerConfig;
use shoal_server::run::{Offer, Run};
use shoal_server::store::Store;
use std::path::Path;
use std::process::Command;

/// A data directory for rounds of three clients on synthetic data, without evaluation.
fn three_client_run(dir: &Path) -> ServerConfig {
    three_client_run_with(dir, |text| text)
}

fn three_client_run_with(dir: &Path, edit: impl Fn(String) -> String) -> ServerConfig {
    init_run(dir, 0, |text| {
        edit(
            text.replace("clients_per_round = 5", "clients_per_round = 3")
                .replace("enabled = true", "enabled = false")
                .replace("dataset = \"mnist\"", "dataset = \"synthetic\"")
                .replace("rounds = 3 ", "rounds = 100 "),
        )
    });
    ServerConfig::load(&dir.join("server.toml")).unwrap()
}

/// Three clients join; the tasks of the first round.
fn join_three(server: &mut Run) -> Vec<Assignment> {
    let tasks = join(server, 3);
    assert_eq!(tasks.len(), 3, "a round of three");
    tasks
}

/// Offers an update of `value` everywhere for `assignment`; the tasks its acceptance gave out.
fn offer(server: &mut Run, assignment: Assignment, value: f32, upload: u64) -> Vec<Assignment> {
    match offer_update(server, assignment, value, upload) {
        Ok(Offer::Accepted(out)) => assigned_tasks(out),
        other => panic!("{} not accepted: {other:?}", assignment.1),
    }
}

fn damage(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

fn version_file(dir: &Path, v: u64) -> std::path::PathBuf {
    dir.join("state").join("versions").join(format!("v{v:08}.bin"))
}

/// `fl-server check DIR`: whether it passed, and what it printed.
fn check(dir: &Path) -> (bool, String) {
    let out = Command::new(bin_dir().join("fl-server"))
        .arg("check")
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_damaged_latest_version_is_made_again_from_the_one_before_and_its_updates() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = three_client_run(dir);
    let mut server = Run::open(config.clone(), dir, None).unwrap();
    let mut round = join_three(&mut server);
    let mut upload = 0;
    for version in 1..=2u64 {
        let mut next = Vec::new();
        for (i, assignment) in round.into_iter().enumerate() {
            upload += 1;
            next.extend(offer(
                &mut server,
                assignment,
                0.01 * (i as f32 + version as f32),
                upload,
            ));
        }
        assert_eq!(server.version(), ModelVersion(version));
        round = next;
    }
    let model = server.global_model();
    server.flush().unwrap();
    drop(server);
    let (intact, report) = check(dir);
    assert!(intact, "{report}");
    assert!(report.contains("3 retained updates intact"), "{report}");

    // The latest version's file damaged: the start makes it again, equal bit for bit.
    damage(&version_file(dir, 2));
    let (intact, report) = check(dir);
    assert!(!intact, "{report}");
    assert!(
        report.contains("the next start makes it again from v1"),
        "{report}"
    );
    let restarted = Run::open(config.clone(), dir, None).unwrap();
    assert_eq!(restarted.version(), ModelVersion(2));
    assert_eq!(restarted.global_model(), model, "made again bit for bit");
    drop(restarted);
    assert!(version_file(dir, 2).with_extension("bin.damaged").exists());
    let (intact, report) = check(dir);
    assert!(intact, "made again and committed: {report}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        3,
        "one line per version, none twice: {metrics}"
    );

    // Both the latest and the one before damaged: refused with what is missing, nothing changed.
    damage(&version_file(dir, 2));
    damage(&version_file(dir, 1));
    let refused = Run::open(config, dir, None).err().expect("refused");
    let message = format!("{refused:#}");
    assert!(message.contains("cannot be made again"), "{message}");
    assert!(message.contains("v1, is not intact"), "{message}");
    let (intact, report) = check(dir);
    assert!(!intact, "{report}");
    assert!(report.contains("it cannot be made again"), "{report}");
}

#[test]
fn a_damaged_initial_version_is_made_again_from_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = three_client_run(dir);
    let server = Run::open(config.clone(), dir, None).unwrap();
    let model = server.global_model();
    drop(server);
    damage(&version_file(dir, 0));
    let restarted = Run::open(config, dir, None).unwrap();
    assert_eq!(restarted.version(), ModelVersion(0));
    assert_eq!(restarted.global_model(), model);
}

/// One update accepted, the server stopped before the round aggregates. With that update's file
/// damaged, the next start refuses with the command that gets past it; `fl-server drop-update`
/// drops it, and the run starts again, waiting for the round without it.
#[test]
fn a_damaged_acknowledged_update_blocks_the_start_until_the_operator_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = three_client_run(dir);
    let mut server = Run::open(config.clone(), dir, None).unwrap();
    let round = join_three(&mut server);
    let (client, task, _) = round[0];
    offer(&mut server, round[0], 0.01, 0);
    server.flush().unwrap();
    drop(server);

    damage(&Store::update_path(&dir.join("state"), task));
    let (intact, report) = check(dir);
    assert!(!intact, "{report}");
    assert!(
        report.contains(&format!("drop-update DIR --task {}", task.0)),
        "{report}"
    );
    let refused = Run::open(config.clone(), dir, None)
        .err()
        .expect("a damaged update blocks the start");
    let message = format!("{refused:#}");
    assert!(
        message.contains(&format!("drop-update DIR --task {}", task.0)),
        "{message}"
    );

    let dropped = run(Command::new(bin_dir().join("fl-server"))
        .arg("drop-update")
        .arg(dir)
        .args(["--task", &task.0.to_string()]));
    assert!(dropped.contains("dropped"), "{dropped}");
    let restarted = Run::open(config, dir, None).unwrap();
    assert_eq!(
        restarted.version(),
        ModelVersion(0),
        "the round waits for the other two"
    );
    assert!(
        restarted.running_task_of(client).is_none(),
        "its task was answered"
    );
}

/// What two runs must agree on after a restart: the version, the running tasks, the
/// Coordinator's counters and the model's bits.
#[derive(Debug, PartialEq)]
struct Observed {
    version: ModelVersion,
    running: Vec<(TaskId, ClientId, ModelVersion)>,
    stats: String,
    model: Vec<u32>,
}

fn observed(server: &Run) -> Observed {
    let mut running: Vec<_> = server
        .coordinator()
        .running_tasks()
        .map(|r| (r.task, r.client, r.version))
        .collect();
    running.sort();
    Observed {
        version: server.version(),
        running,
        stats: format!("{:?}", server.coordinator().stats()),
        model: server.global_model().iter().map(|v| v.to_bits()).collect(),
    }
}

#[test]
fn a_run_restarted_from_a_snapshot_is_the_run_restarted_from_its_whole_log() {
    let every = 2;
    let (compacted, whole) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let configs = [
        three_client_run_with(compacted.path(), |t| {
            t.replace("snapshot_every = 50", "snapshot_every = 2")
        }),
        three_client_run_with(whole.path(), |t| {
            t.replace("snapshot_every = 50", "snapshot_every = 0")
        }),
    ];
    let dirs = [compacted.path(), whole.path()];
    let mut servers: Vec<Run> = (0..2)
        .map(|i| Run::open(configs[i].clone(), dirs[i], None).unwrap())
        .collect();
    let mut rounds: Vec<Vec<Assignment>> = servers.iter_mut().map(join_three).collect();
    let versions = 9u64;
    let mut upload = 0;
    for version in 1..=versions {
        for (server, round) in servers.iter_mut().zip(rounds.iter_mut()) {
            let mut next = Vec::new();
            for (i, assignment) in round.drain(..).enumerate() {
                upload += 1;
                next.extend(offer(
                    server,
                    assignment,
                    0.01 * (i as f32 + 1.0) / version as f32,
                    upload,
                ));
            }
            assert_eq!(server.version(), ModelVersion(version));
            *round = next;
        }
    }
    // One update of the next round accepted, then both stop.
    for (server, round) in servers.iter_mut().zip(rounds.iter_mut()) {
        upload += 1;
        offer(server, round.remove(0), 0.02, upload);
        server.flush().unwrap();
    }
    let before: Vec<_> = servers.iter().map(observed).collect();
    assert_eq!(before[0], before[1], "the same run");
    drop(servers);

    let logged: Vec<usize> = (0..2)
        .map(|i| {
            let store = Store::open(&dirs[i].join("state"), configs[i].fingerprint()).unwrap();
            store.logged_events()
        })
        .collect();
    let per_version = logged[1] as f64 / versions as f64;
    assert!(
        (logged[0] as f64) <= (2 * every + 1) as f64 * per_version + 3.0,
        "the compacted log keeps the events after the older snapshot: {logged:?}"
    );
    assert!(logged[0] * 2 < logged[1], "{logged:?}");

    let mut servers: Vec<Run> = (0..2)
        .map(|i| Run::open(configs[i].clone(), dirs[i], None).unwrap())
        .collect();
    let after: Vec<_> = servers.iter().map(observed).collect();
    assert_eq!(
        after[0], after[1],
        "restored from a snapshot as from the whole log"
    );
    assert_eq!(after[0], before[0], "and as it was");
    // They go on to decide alike: the round completes in both with the same tasks.
    for (server, round) in servers.iter_mut().zip(rounds.iter_mut()) {
        for assignment in round.drain(..) {
            upload += 1;
            offer(server, assignment, 0.03, upload);
        }
        assert_eq!(server.version(), ModelVersion(versions + 1));
    }
    assert_eq!(observed(&servers[0]), observed(&servers[1]));
    let (intact, report) = {
        drop(servers);
        check(dirs[0])
    };
    assert!(intact, "{report}");
    assert!(report.contains("Coordinator snapshot at"), "{report}");
}
