//! Shared helpers of the deployment tests: the binaries, the data root, a data directory with
//! clients, and processes that are killed when a test ends.

// Helpers unwrap: a failure here is the test failing.
#![allow(clippy::unwrap_used, dead_code)]

pub mod offline;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder holding fl-server (built by cargo for these tests), fl-client and fl-sim (brought
/// up to date here: cargo builds another package's binary only for that package's own tests).
pub fn bin_dir() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let server = PathBuf::from(env!("CARGO_BIN_EXE_fl-server"));
    let dir = server.parent().unwrap().to_path_buf();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "shoal-client",
                "--bin",
                "fl-client",
                "-p",
                "shoal-sim",
                "--bin",
                "fl-sim",
            ])
            .current_dir(repo_root());
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success(), "building fl-client and fl-sim failed");
    });
    assert!(
        dir.join("fl-client").exists(),
        "fl-client is not in {}",
        dir.display()
    );
    dir
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `../shared/data` beside the repository, or a clear failure.
pub fn data_root() -> PathBuf {
    let root = repo_root().join("../shared/data");
    assert!(
        root.join("mnist").is_dir(),
        "these tests need MNIST at {} (../shared/data relative to the repository root)",
        root.display()
    );
    root.canonicalize().unwrap()
}

/// A child process killed when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Waits for the process to exit within `limit`.
    pub fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "{} did not exit within {limit:?}; log:\n{}",
                self.log.display(),
                tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last lines of a log, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs a command to completion and returns its stdout; panics with its stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Creates a data directory at `dir` listening on a free loopback port, with `clients` issued
/// client certificates, and applies `edit` to its configuration text.
pub fn init_run(dir: &Path, clients: usize, edit: impl Fn(String) -> String) {
    let bin = bin_dir();
    run(Command::new(bin.join("fl-server")).args(["init"]).arg(dir).args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]));
    for i in 0..clients {
        run(Command::new(bin.join("fl-server"))
            .arg("issue-client")
            .arg(dir)
            .arg(format!("device-{i}")));
    }
    let config = dir.join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, edit(text)).unwrap();
}

/// Starts `fl-server run DIR`, logging to DIR/server-N.log, and waits until it listens.
pub fn start_server(dir: &Path, attempt: usize) -> (Process, String) {
    let log = dir.join(format!("server-{attempt}.log"));
    let _ = std::fs::remove_file(dir.join("listening"));
    let child = Command::new(bin_dir().join("fl-server"))
        .arg("run")
        .arg(dir)
        .env("SHOAL_DATA", data_root())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Process { child, log };
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(address) = std::fs::read_to_string(dir.join("listening"))
            && !address.is_empty()
        {
            return (server, address);
        }
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("fl-server exited with {status}:\n{}", tail(&server.log));
        }
        assert!(
            Instant::now() < end,
            "fl-server did not listen:\n{}",
            tail(&server.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts client `index` of `count` (IID MNIST partition) against `address`.
pub fn start_client(dir: &Path, address: &str, index: usize, count: usize) -> Process {
    let log = dir.join(format!("client-{index}.log"));
    let child = Command::new(bin_dir().join("fl-client"))
        .args([
            "run",
            "--server",
            address.trim(),
            "--server-name",
            "localhost",
            "--identity",
        ])
        .arg(dir.join("clients").join(format!("device-{index}")))
        .arg("--data-dir")
        .arg(data_root())
        .args(["--partition", "iid", "--num-clients"])
        .arg(count.to_string())
        .args(["--index", &index.to_string(), "--give-up-after-s", "60"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Process { child, log }
}

/// Waits until a line of `log` contains `needle` (after `skip` earlier matches).
pub fn wait_for_line(log: &Path, needle: &str, skip: usize, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        if let Ok(file) = std::fs::File::open(log) {
            let count = BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.contains(needle))
                .count();
            if count > skip {
                return;
            }
        }
        assert!(
            Instant::now() < end,
            "`{needle}` did not appear in {}:\n{}",
            log.display(),
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Task ids in lines of `log` containing `needle` (logged as `task=task-N`).
pub fn tasks_in(log: &Path, needle: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let at = l.find("task=task-")? + "task=task-".len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Every task folded into a committed version of the run at `dir`, with the versions it appears in.
pub fn folded_tasks(
    dir: &Path,
) -> (
    Vec<shoal_core::ModelVersion>,
    std::collections::BTreeMap<u64, Vec<u64>>,
) {
    let config = shoal_server::config::ServerConfig::load(&dir.join("server.toml")).unwrap();
    let store = shoal_server::store::Store::open(&dir.join("state"), config.fingerprint()).unwrap();
    let mut versions = Vec::new();
    let mut tasks: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for record in store.version_records().unwrap() {
        versions.push(record.version);
        for t in record.tasks {
            tasks.entry(t.0).or_default().push(record.version.0);
        }
    }
    (versions, tasks)
}

/// Rewrites DIR/server.toml to listen at `address` (the one its first start picked), so a
/// restarted server listens where its clients reconnect to.
pub fn pin_listen_address(dir: &Path, address: &str) {
    let config = dir.join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let pinned = text.replace("\"127.0.0.1:0\"", &format!("\"{}\"", address.trim()));
    assert_ne!(pinned, text);
    std::fs::write(&config, pinned).unwrap();
}
