//! `fl-server`: create a data directory, issue client certificates, run the aggregation daemon,
//! and inspect a run's committed versions.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shoal_server::datadir::{self, DataDir};
use shoal_server::store::Store;
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
    /// List the committed versions of a run and the updates folded into each.
    History {
        /// The data directory.
        dir: PathBuf,
        /// One JSON object per version instead of a table.
        #[arg(long)]
        json: bool,
    },
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
        } => {
            let data = DataDir::new(&dir);
            datadir::init(&data, &name, &names, listen)?;
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
