//! `fl-client`: the device agent.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shoal_client::agent::{self, AgentOptions};
use shoal_client::local_data::{DataSource, parse_partition};
use shoal_model::data::DatasetName;
use shoal_net::tls;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Shoal's device agent.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a run: train each task the server sends on the local data, upload the encoded update,
    /// reconnect on failures, and exit when the server finishes the run.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The server's QUIC address (host:port).
    #[arg(long)]
    server: String,
    /// The name in the server's certificate (default: the host of --server).
    #[arg(long)]
    server_name: Option<String>,
    /// A folder from `fl-server issue-client` holding ca.pem, client.pem and client.key.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    identity: Option<PathBuf>,
    /// The run's CA certificate (with --cert and --key, instead of --identity).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This device's certificate.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// This device's private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Name announced to servers that accept clients without certificates (with a certificate,
    /// its name is used).
    #[arg(long, default_value = "anonymous")]
    name: String,
    /// Dataset to take a partition of.
    #[arg(long, default_value = "mnist")]
    dataset: DatasetName,
    /// Data root holding mnist/.
    #[arg(long, env = "SHOAL_DATA")]
    data_dir: Option<PathBuf>,
    /// How the dataset is split: iid, shards, dirichlet:ALPHA, quantity-skew:ALPHA, or an
    /// experiment's partition table, e.g. '{ kind = "shards", num_clients = 100 }'.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Clients the dataset is split across.
    #[arg(long, default_value_t = 1)]
    num_clients: usize,
    /// This client's share (0-based).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Seed of the split (must be the same on every client).
    #[arg(long, default_value_t = 0)]
    partition_seed: u64,
    /// Train on these MNIST-format images (IDX) instead of a partition (with --idx-labels).
    #[arg(long, requires = "idx_labels")]
    idx_images: Option<PathBuf>,
    /// Labels for --idx-images.
    #[arg(long, requires = "idx_images")]
    idx_labels: Option<PathBuf>,
    /// Seed of the reconnection backoff's jitter (default: the index). A task's minibatches and
    /// random codec stages draw from the seed the server sends with it.
    #[arg(long)]
    seed: Option<u64>,
    /// Give up after this many seconds without reaching the server.
    #[arg(long, default_value_t = 120.0)]
    give_up_after_s: f64,
    /// Where this device keeps its state between starts (control variates, error-feedback memory,
    /// the update not yet acknowledged), one file per run. Default: the --identity folder; with
    /// --ca/--cert, none unless given (a restart then joins without its state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Split learning: minibatches kept in flight (default: the server's `[split] pipeline`).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pipeline: Option<u16>,
}

fn resolve(server: &str) -> Result<(SocketAddr, String)> {
    let addr = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))?;
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    Ok((addr, host.trim_matches(['[', ']']).to_string()))
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
    let Command::Run(args) = Cli::parse().command;
    let (server, host) = resolve(&args.server)?;
    let (ca_path, identity) = match (&args.identity, &args.ca, &args.cert, &args.key) {
        (Some(dir), _, _, _) => (
            dir.join("ca.pem"),
            Some(tls::read_pem_pair(
                &dir.join("client.pem"),
                &dir.join("client.key"),
            )?),
        ),
        (None, Some(ca), Some(cert), Some(key)) => (ca.clone(), Some(tls::read_pem_pair(cert, key)?)),
        (None, Some(ca), None, None) => (ca.clone(), None),
        _ => {
            bail!("give --identity DIR, or --ca with --cert and --key (or --ca alone for anonymous servers)")
        }
    };
    let ca_pem =
        std::fs::read_to_string(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let data = match (args.idx_images, args.idx_labels) {
        (Some(images), Some(labels)) => DataSource::Idx { images, labels },
        _ => DataSource::Partition {
            dataset: args.dataset,
            data_dir: args.data_dir,
            partition: parse_partition(&args.partition, args.num_clients)?,
            index: args.index,
            seed: args.partition_seed,
        },
    };
    let options = AgentOptions {
        server,
        server_name: args.server_name.unwrap_or(host),
        ca_pem,
        identity,
        name: args.name,
        data,
        seed: args.seed.unwrap_or(args.index as u64),
        give_up_after: Duration::try_from_secs_f64(args.give_up_after_s.max(1.0)).map_err(|_| {
            anyhow::anyhow!(
                "--give-up-after-s {} is not a number of seconds a clock can hold",
                args.give_up_after_s
            )
        })?,
        pipeline: args.pipeline.map(usize::from),
        state_dir: args.state_dir.or(args.identity),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(agent::run(options))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
