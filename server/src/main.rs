//! `fl-server`: create a data directory, issue client certificates, run the aggregation daemon,
//! and inspect a run's committed versions.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shoal_server::admin::proto::{
    ExportModelRequest, ListClientsRequest, PauseRequest, StatusRequest, WatchMetricsRequest,
};
use shoal_server::datadir::{self, DataDir};
use shoal_server::store::Store;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Shoal's aggregation daemon.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: a certificate authority, a server certificate and a commented
    /// server.toml.
    Init {
        /// The data directory to create.
        dir: PathBuf,
        /// DNS names and IP addresses clients reach the server at (repeat the flag).
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// The server's name in its certificate.
        #[arg(long, default_value = "shoal-server")]
        name: String,
        /// QUIC address written into server.toml.
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: SocketAddr,
        /// gRPC admin address written into server.toml (keep it on loopback).
        #[arg(long, default_value = "127.0.0.1:4434")]
        admin: SocketAddr,
        /// A TOML file whose seed, codec, feedback, [data], [model], [algorithm] (and [split],
        /// [stop], [eval]) replace the template's, e.g. from `fl-sim deployment EXPERIMENT`.
        #[arg(long)]
        tables: Option<PathBuf>,
    },
    /// Issue a client certificate and key into DIR/clients/NAME/ (with the CA certificate).
    IssueClient {
        /// The data directory.
        dir: PathBuf,
        /// The client's name: its identity on the server.
        name: String,
    },
    /// Run the server of a data directory until its run finishes; after a crash or a stop, the
    /// same command resumes it.
    Run {
        /// The data directory.
        dir: PathBuf,
        /// Data root holding mnist/ for the held-out evaluation (else [data] data_dir or
        /// $SHOAL_DATA).
        #[arg(long, env = "SHOAL_DATA")]
        data_dir: Option<PathBuf>,
    },
    /// Measure a loopback deployment: N fl-client processes, one local step per task, server CPU
    /// and coordinator time per round, bytes on the wire per round, peak server memory — each
    /// against a baseline measured in the same run.
    Bench {
        /// Client processes.
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Rounds.
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// Zoo model (cnn: 1.66 M parameters on MNIST).
        #[arg(long, default_value = "cnn")]
        model: String,
        /// Upload codec chain.
        #[arg(long, default_value = "identity")]
        codec: String,
        /// Data root holding mnist/.
        #[arg(long, env = "SHOAL_DATA")]
        data_dir: PathBuf,
        /// Where the run's directory, logs and bench.json go.
        #[arg(long, default_value = "runs/server-bench")]
        out: PathBuf,
    },
    /// Measure the aggregation runtime: N updates arriving one fold-time apart, eager runtime vs
    /// a single-threaded fold after the last arrival vs a memory copy of the same bytes; the time
    /// from the last arrival to the new model.
    BenchAggregate {
        /// Parameters per update, comma-separated (K and M suffixes).
        #[arg(long, default_value = "1M,10M")]
        sizes: String,
        /// Updates per aggregation.
        #[arg(long, default_value_t = 100)]
        updates: usize,
        /// Distinct update buffers cycled through (memory: distinct × params × 4 bytes).
        #[arg(long, default_value_t = 10)]
        distinct: usize,
        /// Measured repetitions (the best is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Gap between arrivals, in single-thread fold times of one update.
        #[arg(long, default_value_t = 1.0)]
        spacing: f64,
        /// Most leaves (0: this machine's cores).
        #[arg(long, default_value_t = 0)]
        max_leaves: usize,
        /// Where bench-aggregate.json goes.
        #[arg(long, default_value = "runs/aggregate-bench")]
        out: PathBuf,
    },
    /// Check a committed version against a flat aggregation of the updates kept for it
    /// ([storage] keep_updates = true): from the server itself, or from the leaves of a federation.
    /// Run it on stopped servers. Exits with an error when the difference exceeds the tolerance.
    Audit {
        /// The server's data directory (the top of a federation).
        dir: PathBuf,
        /// A leaf's data directory whose kept updates are folded (repeat; default: DIR itself).
        #[arg(long = "leaf")]
        leaves: Vec<PathBuf>,
        /// The version (default: the last committed).
        #[arg(long)]
        version: Option<u64>,
        /// Largest difference accepted.
        #[arg(long, default_value_t = 1e-6)]
        tolerance: f64,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running server (through its admin API) for its status and clients.
    Status {
        /// The data directory.
        dir: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending new tasks (running tasks finish; their updates are accepted).
    Pause {
        /// The data directory.
        dir: PathBuf,
    },
    /// Send tasks again.
    Resume {
        /// The data directory.
        dir: PathBuf,
    },
    /// Print one line per committed version as the run goes.
    Watch {
        /// The data directory.
        dir: PathBuf,
    },
    /// Save the current global model (little-endian f32, the layout's order).
    Export {
        /// The data directory.
        dir: PathBuf,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// List the committed versions of a run and the updates folded into each.
    History {
        /// The data directory.
        dir: PathBuf,
        /// One JSON object per version instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify a stopped server's state: every version and update file against the index's hash,
    /// the commit record against the index, the event log. Prints each finding; exits non-zero
    /// when something is damaged, saying what the next start does about it.
    Check {
        /// The data directory.
        dir: PathBuf,
    },
    /// Drop an acknowledged update whose file is damaged or lost, so the run can start again: the
    /// version it was to be folded into is made without it. Its client was told it was accepted,
    /// so this loses its work — the last resort the start's error points to. Run it on a stopped
    /// server.
    DropUpdate {
        /// The data directory.
        dir: PathBuf,
        /// The task whose update to drop (as the start's error names it).
        #[arg(long)]
        task: u64,
    },
}

/// Runs one admin API call on a small runtime.
fn admin_call(call: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(call)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Init {
            dir,
            names,
            name,
            listen,
            admin,
            tables,
        } => {
            let data = DataDir::new(&dir);
            let tables = match &tables {
                Some(path) => Some(
                    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
                ),
                None => None,
            };
            datadir::init(&data, &name, &names, listen, admin, tables.as_deref())?;
            println!("created {}", dir.display());
            println!("  configuration: {}", data.config().display());
            println!("  CA certificate: {}", data.ca_cert().display());
            println!(
                "next: fl-server issue-client {} NAME, then fl-server run {}",
                dir.display(),
                dir.display()
            );
        }
        Command::IssueClient { dir, name } => {
            let out = datadir::issue_client(&DataDir::new(&dir), &name)?;
            println!("issued `{name}`: {}", out.display());
            println!(
                "  fl-client run --server ADDRESS --identity {} --data-dir DATA --partition iid --num-clients N --index I",
                out.display()
            );
        }
        Command::Run { dir, data_dir } => {
            let summary = shoal_server::daemon::serve(&DataDir::new(&dir), data_dir.as_deref())
                .with_context(|| format!("running {}", dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Command::Bench {
            clients,
            rounds,
            model,
            codec,
            data_dir,
            out,
        } => {
            let options = shoal_server::bench::BenchOptions {
                clients,
                rounds,
                model,
                codec,
                data_dir,
                out: out.clone(),
            };
            eprintln!("running {rounds} rounds with {clients} client processes…");
            let r = shoal_server::bench::run(&options)?;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            println!(
                "fl-server bench: {} clients, {} rounds, {} parameters, codec {}",
                r.clients, r.rounds, r.params, r.codec
            );
            println!("  wall time per round            {:>9.3} s", r.wall_per_round_s);
            println!(
                "  server CPU per round           {:>9.3} s   ({:.1}× a single-thread decode+fold of the round: {:.3} s)",
                r.server_cpu_per_round_s,
                r.server_cpu_per_round_s / r.baseline_decode_fold_per_round_s.max(1e-9),
                r.baseline_decode_fold_per_round_s
            );
            println!(
                "  coordinator thread per round   {:>9.3} s",
                r.coordinator_per_round_s
            );
            println!(
                "  bytes on the wire per round    {:>9.1} MiB ({:.3}× the {:.1} MiB of payloads)",
                mib(r.wire_bytes_per_round),
                r.wire_bytes_per_round as f64 / r.payload_bytes_per_round.max(1) as f64,
                mib(r.payload_bytes_per_round)
            );
            println!(
                "  peak server memory             {:>9.1} MiB ({:.1} model copies of {:.1} MiB)",
                mib(r.server_peak_memory_bytes),
                r.server_peak_memory_bytes as f64 / r.model_bytes.max(1) as f64,
                mib(r.model_bytes)
            );
            std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&r)?)?;
        }
        Command::BenchAggregate {
            sizes,
            updates,
            distinct,
            reps,
            spacing,
            max_leaves,
            out,
        } => {
            let options = shoal_server::aggregate_bench::AggregateBenchOptions {
                sizes: shoal_server::aggregate_bench::parse_sizes(&sizes)?,
                updates,
                distinct,
                reps,
                spacing,
                runtime: shoal_server::runtime::RuntimeConfig {
                    max_leaves,
                    memory_mb: 16 * 1024,
                    ..Default::default()
                },
            };
            let rows = shoal_server::aggregate_bench::run(&options, |m| eprintln!("{m}"))?;
            println!(
                "{:>10} {:>8} {:>10} {:>12} {:>12} {:>12} {:>8} {:>8} {:>8} {:>7}",
                "params",
                "updates",
                "memcpy",
                "1-thread",
                "eager",
                "eager-burst",
                "speedup",
                "1t/copy",
                "eag/copy",
                "leaves"
            );
            let ms = |s: f64| format!("{:.2} ms", s * 1e3);
            for r in &rows {
                println!(
                    "{:>10} {:>8} {:>10} {:>12} {:>12} {:>12} {:>7.1}× {:>7.1}× {:>7.2}× {:>7}",
                    r.params,
                    r.updates,
                    ms(r.memcpy_s),
                    ms(r.single_thread_after_last_s),
                    ms(r.eager_after_last_s),
                    ms(r.eager_burst_after_last_s),
                    r.speedup,
                    r.single_thread_vs_memcpy,
                    r.eager_vs_memcpy,
                    format!("{}/{}", r.eager_leaves.0, r.eager_leaves.1),
                );
            }
            for r in &rows {
                println!(
                    "{:>10} measured cost per value: fold {:.2} ns, merge {:.2} ns, allocation {:.2} ns \
                     (fl-sim's [server.aggregation] takes these)",
                    r.params, r.cost.fold_ns_per_value, r.cost.merge_ns_per_value, r.cost.alloc_ns_per_value
                );
            }
            println!(
                "(time from the last arrival to the new model; memcpy copies the same {} updates once)",
                updates
            );
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join("bench-aggregate.json");
            std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
            eprintln!("wrote {}", path.display());
        }
        Command::Audit {
            dir,
            leaves,
            version,
            tolerance,
            json,
        } => {
            let leaves: Vec<DataDir> = leaves.iter().map(DataDir::new).collect();
            let report = shoal_server::audit::audit(&DataDir::new(&dir), &leaves, version, tolerance)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "version {}: {} updates from {} server(s) folded flat; max |difference| {:.3e} ({:.3e} of the \
                     largest value); tolerance {:.1e}: {}",
                    report.version,
                    report.updates,
                    report.servers,
                    report.max_abs_diff,
                    report.max_rel_diff,
                    report.tolerance,
                    if report.ok { "equal" } else { "DIFFERENT" }
                );
                if let Some(d) = report.sums_max_rel_diff {
                    println!(
                        "  the top's merged f64 sums against the flat sums: {d:.3e} relative (at most 1e-9)"
                    );
                }
            }
            anyhow::ensure!(
                report.ok,
                "the committed version differs from the flat aggregation"
            );
        }
        Command::Status { dir, json } => admin_call(async {
            let mut admin = shoal_server::admin::connect(&DataDir::new(&dir)).await?;
            let status = admin.status(StatusRequest {}).await?.into_inner();
            let clients = admin
                .list_clients(ListClientsRequest {})
                .await?
                .into_inner()
                .clients;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "version": status.version,
                        "algorithm": status.algorithm,
                        "connected_clients": status.connected_clients,
                        "registered_clients": status.registered_clients,
                        "running_tasks": status.running_tasks,
                        "folded_updates": status.folded_updates,
                        "waiting_updates": status.waiting_updates,
                        "paused": status.paused,
                        "finished": status.finished,
                        "time_s": status.time_s,
                        "bytes_up": status.bytes_up,
                        "bytes_down": status.bytes_down,
                        "last_accuracy": status.last_accuracy,
                        "target_rounds": status.target_rounds,
                        "runtime": status.runtime,
                        "clients": clients.iter().map(|c| serde_json::json!({
                            "id": c.id, "name": c.name, "connected": c.connected, "registered": c.registered,
                            "num_samples": c.num_samples, "task": c.task, "delivered": c.delivered,
                            "failures_in_a_row": c.failures_in_a_row,
                        })).collect::<Vec<_>>(),
                    })
                );
            } else {
                let target = status.target_rounds.map_or(String::new(), |r| format!(" of {r}"));
                println!(
                    "version {}{target} · {} · {:.1} s",
                    status.version, status.algorithm, status.time_s
                );
                println!(
                    "clients: {} connected, {} registered, {} running a task",
                    status.connected_clients, status.registered_clients, status.running_tasks
                );
                println!(
                    "aggregation in progress: {} folded, {} waiting{}{}",
                    status.folded_updates,
                    status.waiting_updates,
                    if status.paused { " · PAUSED" } else { "" },
                    if status.finished { " · finished" } else { "" }
                );
                if let Some(a) = status.last_accuracy {
                    println!("held-out accuracy: {a:.4}");
                }
                if let Some(r) = &status.runtime {
                    println!(
                        "aggregation runtime: {} instances ({} leaves, {} middles, {} top, {} warm) · \
                         {} invocations · {} cold starts ({:.3} s), {} warm reuses · queue {} (max {}) · \
                         fold {:.2} ms · last tree {}×{} done {:.1} ms after its last update",
                        r.instances,
                        r.leaves,
                        r.middles,
                        r.tops,
                        r.idle,
                        r.invocations,
                        r.cold_starts,
                        r.cold_start_seconds,
                        r.warm_reuses,
                        r.queue_depth,
                        r.max_queue_depth,
                        r.fold_mean_s * 1e3,
                        r.last_middles,
                        r.last_leaves,
                        r.last_after_arrival_s * 1e3,
                    );
                }
                for c in clients {
                    let task = c.task.map_or("-".to_string(), |t| format!("task-{t}"));
                    println!(
                        "  {:>4} {:<20} {:<12} {:>8} samples  {:>6} delivered  {}",
                        c.id,
                        c.name,
                        if c.connected {
                            "connected"
                        } else if c.registered {
                            "away"
                        } else {
                            "gone"
                        },
                        c.num_samples,
                        c.delivered,
                        task
                    );
                }
            }
            Ok(())
        })?,
        Command::Pause { dir } => admin_call(async {
            let mut admin = shoal_server::admin::connect(&DataDir::new(&dir)).await?;
            let reply = admin.pause(PauseRequest {}).await?.into_inner();
            println!("paused: {}", reply.paused);
            Ok(())
        })?,
        Command::Resume { dir } => admin_call(async {
            let mut admin = shoal_server::admin::connect(&DataDir::new(&dir)).await?;
            let reply = admin.resume(PauseRequest {}).await?.into_inner();
            println!("paused: {}", reply.paused);
            Ok(())
        })?,
        Command::Watch { dir } => admin_call(async {
            let mut admin = shoal_server::admin::connect(&DataDir::new(&dir)).await?;
            let mut stream = admin.watch_metrics(WatchMetricsRequest {}).await?.into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(m) = stream.message().await? {
                let accuracy = m.accuracy.map_or("-".into(), |a| format!("{a:.4}"));
                let line = writeln!(
                    out,
                    "version {:>5}  {:>9.1} s  {:>3} updates  accuracy {accuracy}  up {} B  down {} B",
                    m.version, m.time_s, m.updates, m.bytes_up, m.bytes_down
                );
                // A reader that went away (`| head`) ends the watch.
                if line.and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
            Ok(())
        })?,
        Command::Export { dir, out } => admin_call(async {
            let mut admin = shoal_server::admin::connect(&DataDir::new(&dir)).await?;
            let mut stream = admin.export_model(ExportModelRequest {}).await?.into_inner();
            let mut bytes = Vec::new();
            let mut version = 0;
            while let Some(chunk) = stream.message().await? {
                anyhow::ensure!(
                    chunk.offset * 4 == bytes.len() as u64,
                    "chunks arrived out of order"
                );
                version = chunk.version;
                bytes.extend_from_slice(&chunk.values);
            }
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "version {version}: {} parameters → {}",
                bytes.len() / 4,
                out.display()
            );
            Ok(())
        })?,
        Command::Check { dir } => {
            let config = shoal_server::config::ServerConfig::load(&DataDir::new(&dir).config())?;
            let store = Store::open(&dir.join("state"), config.fingerprint())
                .with_context(|| format!("opening the state of {}", dir.display()))?;
            let report = store.check()?;
            for finding in &report.findings {
                println!(
                    "{}  {}",
                    if finding.ok { "ok     " } else { "DAMAGED" },
                    finding.what
                );
            }
            let problems = report.problems().count();
            if problems > 0 {
                anyhow::bail!("{problems} damaged in {}", dir.display());
            }
            println!("{} intact", dir.display());
        }
        Command::DropUpdate { dir, task } => {
            let config = shoal_server::config::ServerConfig::load(&DataDir::new(&dir).config())?;
            let store = Store::open(&dir.join("state"), config.fingerprint())?;
            let task = shoal_core::TaskId(task);
            if store.pending_update(task)?.is_none() {
                anyhow::bail!(
                    "{task} has no update waiting to be aggregated (a committed version holds it, or it \
                     was never accepted)"
                );
            }
            store.discard_update(task)?;
            store.flush()?;
            tracing::warn!(%task, "dropped its acknowledged update; the next start aggregates without it");
            println!("dropped the update of {task}");
        }
        Command::History { dir, json } => {
            let config = shoal_server::config::ServerConfig::load(&DataDir::new(&dir).config())?;
            let store = Store::open(&dir.join("state"), config.fingerprint())?;
            for record in store.version_records()? {
                if json {
                    println!("{}", serde_json::to_string(&record)?);
                } else {
                    let tasks: Vec<String> = record.tasks.iter().map(|t| t.0.to_string()).collect();
                    println!(
                        "{:>6}  {:>10.3} s  {:>3} updates  [{}]",
                        record.version.0,
                        record.at.as_secs_f64(),
                        record.tasks.len(),
                        tasks.join(", ")
                    );
                }
            }
        }
    }
    Ok(())
}
