//! `fl-server bench`: a real deployment on loopback measured from the server's side — an
//! fl-server process and N fl-client processes (mutual TLS, MNIST partitions, one local step so
//! that rounds are about the server and the network, not client training) — reporting server CPU
//! and coordinator time per round, bytes on the wire per round and peak server memory, each
//! against a baseline: the payload bytes (wire overhead), the dense model (memory in model copies),
//! and a plain in-process decode-and-fold of the same updates (server compute).

use crate::datadir::{self, DataDir};
use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use shoal_aggregators::{AlgorithmConfig, ServerState};
use shoal_compression::{CodecCompressor, CodecSpec};
use shoal_core::TaskId;
use shoal_engine::{Contribution, InPlace, ServerCore};
use shoal_model::data::DatasetName;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Client processes.
    pub clients: usize,
    /// Rounds (versions).
    pub rounds: u64,
    /// Zoo model (`cnn`: 1.66 M parameters on MNIST).
    pub model: String,
    /// Upload codec.
    pub codec: String,
    /// Data root holding mnist/.
    pub data_dir: PathBuf,
    /// Where the run's data directory and logs go.
    pub out: PathBuf,
}

/// The figures `fl-server bench` prints and writes to `bench.json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Clients.
    pub clients: usize,
    /// Rounds.
    pub rounds: u64,
    /// Model parameters.
    pub params: usize,
    /// Codec of the uploads.
    pub codec: String,
    /// Wall time of the run from the server's start to its end, per round (s).
    pub wall_per_round_s: f64,
    /// Server CPU time per round, all threads (s).
    pub server_cpu_per_round_s: f64,
    /// Coordinator-thread time per round (s).
    pub coordinator_per_round_s: f64,
    /// Baseline: one thread decoding and folding one round's updates in this process (s).
    pub baseline_decode_fold_per_round_s: f64,
    /// UDP bytes in and out per round.
    pub wire_bytes_per_round: u64,
    /// Payload bytes (models down, updates up) per round.
    pub payload_bytes_per_round: u64,
    /// Peak resident memory of the server (bytes).
    pub server_peak_memory_bytes: u64,
    /// The dense model's size (bytes).
    pub model_bytes: u64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating fl-server")?;
    let path = me.with_file_name(name);
    ensure!(
        path.exists(),
        "{} is missing: build it with `cargo build --release -p shoal-client`",
        path.display()
    );
    Ok(path)
}

/// Runs the benchmark.
pub fn run(options: &BenchOptions) -> Result<BenchReport> {
    ensure!(
        options.clients >= 1 && options.rounds >= 1,
        "need at least one client and one round"
    );
    ensure!(
        options.data_dir.join("mnist").is_dir(),
        "{} has no mnist/: pass --data-dir pointing at the data root (../shared/data)",
        options.data_dir.display()
    );
    let client_bin = sibling("fl-client")?;
    let server_bin = std::env::current_exe()?;
    let dir = options.out.join("server");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let data = DataDir::new(&dir);
    datadir::init(
        &data,
        "shoal-bench",
        &["localhost".into(), "127.0.0.1".into()],
        "127.0.0.1:0".parse()?,
        "127.0.0.1:0".parse()?,
        None,
    )?;
    for i in 0..options.clients {
        datadir::issue_client(&data, &format!("device-{i}"))?;
    }
    let config = std::fs::read_to_string(data.config())?
        .replace("rounds = 3", &format!("rounds = {}", options.rounds))
        .replace(
            "clients_per_round = 5",
            &format!("clients_per_round = {}", options.clients),
        )
        .replace("local_steps = 50", "local_steps = 1")
        .replace("name = \"mlp\"", &format!("name = \"{}\"", options.model))
        .replace("codec = \"identity\"", &format!("codec = \"{}\"", options.codec))
        .replace("enabled = true", "enabled = false");
    std::fs::write(data.config(), config)?;
    let logs = options.out.join("logs");
    std::fs::create_dir_all(&logs)?;

    let started = Instant::now();
    let mut server = Killed(
        Command::new(&server_bin)
            .arg("run")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join("server.log"))?)
            .spawn()
            .context("starting fl-server")?,
    );
    let address = wait_for_file(&dir.join("listening"), &mut server.0)?;
    let mut clients = Vec::new();
    for i in 0..options.clients {
        clients.push(Killed(
            Command::new(&client_bin)
                .args([
                    "run",
                    "--server",
                    address.trim(),
                    "--server-name",
                    "localhost",
                    "--identity",
                ])
                .arg(data.client_dir(&format!("device-{i}")))
                .arg("--data-dir")
                .arg(&options.data_dir)
                .args(["--partition", "iid", "--num-clients"])
                .arg(options.clients.to_string())
                .args(["--index", &i.to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join(format!("client-{i}.log")))?)
                .spawn()
                .context("starting fl-client")?,
        ));
    }
    let status = server.0.wait()?;
    let wall = started.elapsed();
    ensure!(
        status.success(),
        "fl-server failed; see {}",
        logs.join("server.log").display()
    );
    for mut c in clients {
        let _ = c.0.wait();
    }
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json")).context("reading the server's summary")?,
    )?;
    let get = |k: &str| summary.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let rounds = options.rounds as f64;
    let (params, baseline) = baseline_decode_fold(&options.model, &options.codec, options.clients)?;
    Ok(BenchReport {
        clients: options.clients,
        rounds: options.rounds,
        params,
        codec: options.codec.clone(),
        wall_per_round_s: wall.as_secs_f64() / rounds,
        server_cpu_per_round_s: get("cpu_time_s") / rounds,
        coordinator_per_round_s: get("coordinator_busy_s") / rounds,
        baseline_decode_fold_per_round_s: baseline,
        wire_bytes_per_round: ((get("wire_bytes_in") + get("wire_bytes_out")) / rounds) as u64,
        payload_bytes_per_round: ((get("bytes_up") + get("bytes_down")) / rounds) as u64,
        server_peak_memory_bytes: get("peak_memory_bytes") as u64,
        model_bytes: params as u64 * 4,
    })
}

fn wait_for_file(path: &Path, server: &mut Child) -> Result<String> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return Ok(text);
        }
        if let Some(status) = server.try_wait()? {
            bail!("fl-server exited with {status} before listening");
        }
        ensure!(
            Instant::now() < end,
            "fl-server did not start listening within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One round's server compute without any networking: decode `clients` encoded updates of the
/// model and fold them (FedAvg), on one thread. Returns the parameter count and seconds per round.
#[expect(
    clippy::disallowed_methods,
    reason = "the benchmark's fixture: one encoded update, decoded and folded as a connection would"
)]
fn baseline_decode_fold(model: &str, codec: &str, clients: usize) -> Result<(usize, f64)> {
    let (shape, classes) = DatasetName::Mnist.shape(&Default::default());
    let model = shoal_model::zoo::build(model, &shape, classes)?;
    let layout = model.layout().clone();
    let spec: CodecSpec = codec.parse()?;
    let config: AlgorithmConfig =
        toml::from_str("local_steps = 1\nlocal_lr = 0.1\n[rule]\nrule = \"fedavg\"")?;
    let rule = config.rule.build()?.server;
    let x = model.init_params(1);
    let update: Vec<f32> = x.as_slice().iter().map(|v| v * 0.01).collect();
    let mut encoder = CodecCompressor::new(spec, layout.clone(), 1);
    let payload = encoder.encode(&update)?;
    let part = [payload.len() as u64];
    let repeats = 3;
    // The states are made before the clock starts: only decoding and folding are timed.
    let states: Vec<ServerState> = (0..repeats)
        .map(|_| ServerState::new(x.as_slice().to_vec()))
        .collect();
    let start = Instant::now();
    for state in states {
        let mut core = ServerCore::new(rule.clone(), config.clone(), state, InPlace);
        for i in 0..clients {
            let task = TaskId(i as u64);
            let parts = shoal_engine::decode_upload(&payload, &part, &layout)?;
            core.hold(task, Contribution::Upload(Arc::from(parts)), 0.0);
            core.fold(task, 1.0, clients)?;
        }
        core.merge()?;
    }
    Ok((layout.len(), start.elapsed().as_secs_f64() / f64::from(repeats)))
}
