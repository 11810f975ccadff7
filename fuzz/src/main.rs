//! `shoal-fuzz`: runs Shoal's decoders of peer input against millions of generated and mutated
//! inputs, prints a table of what each accepted, refused and panicked on, writes the inputs that
//! made one panic, and fails if any did.

use anyhow::{Context, Result, bail};
use clap::Parser;
use shoal_fuzz::{Tally, fuzz, targets};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Feed Shoal's decoders of peer input (update payloads, control frames, cut tensors, partial
/// sums) generated and mutated inputs; report any panic.
#[derive(Parser)]
#[command(name = "shoal-fuzz", version)]
struct Cli {
    /// Inputs per decoder.
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Seed of every input (the same seed feeds the same inputs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Decoders to run, comma-separated: payload, frame, cut, partial.
    #[arg(long, value_delimiter = ',', default_value = "payload,frame,cut,partial")]
    targets: Vec<String>,
    /// Threads (default: this machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where inputs that made a decoder panic are written.
    #[arg(long, default_value = "fuzz-crashes")]
    crashes: PathBuf,
    /// Also write the table as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut chosen = Vec::new();
    for name in &cli.targets {
        match targets::target(name) {
            Some(t) => chosen.push(t),
            None => bail!(
                "unknown decoder `{name}`; choose from {}",
                targets::NAMES.join(", ")
            ),
        }
    }
    // A decoder's panic is counted, and its input kept: its message would only flood the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>7} {:>12}",
        "decoder", "inputs", "accepted", "refused", "panics", "inputs/s"
    );
    let mut tallies: Vec<(Tally, f64)> = Vec::new();
    for target in &chosen {
        let bar = indicatif::ProgressBar::new(cli.inputs).with_style(
            indicatif::ProgressStyle::with_template("{prefix:<8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(target.name);
        let done = AtomicU64::new(0);
        let (tally, elapsed) = std::thread::scope(|scope| {
            let work = scope.spawn(|| {
                let started = Instant::now();
                let tally = fuzz(target, cli.inputs, cli.seed, threads, &done);
                (tally, started.elapsed())
            });
            while !work.is_finished() {
                bar.set_position(done.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(50));
            }
            work.join()
        })
        .map_err(|_| anyhow::anyhow!("the fuzzing threads of {} failed", target.name))?;
        bar.finish_and_clear();
        let per_s = tally.inputs as f64 / elapsed.as_secs_f64().max(1e-9);
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>7} {:>12.0}",
            tally.target, tally.inputs, tally.accepted, tally.refused, tally.panics, per_s
        );
        if !tally.panicked_on.is_empty() {
            std::fs::create_dir_all(&cli.crashes)
                .with_context(|| format!("creating {}", cli.crashes.display()))?;
            for (i, input) in tally.panicked_on.iter().enumerate() {
                let path = cli.crashes.join(format!("{}-{i}.bin", tally.target));
                std::fs::write(&path, input).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        tallies.push((tally, per_s));
    }
    if let Some(path) = &cli.json {
        let rows: Vec<serde_json::Value> = tallies
            .iter()
            .map(|(t, per_s)| {
                let mut row = serde_json::to_value(t).unwrap_or_default();
                row["inputs_per_s"] = serde_json::json!(per_s);
                row["seed"] = serde_json::json!(cli.seed);
                row
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let panicked: Vec<&str> = tallies
        .iter()
        .filter(|(t, _)| t.panics > 0)
        .map(|(t, _)| t.target.as_str())
        .collect();
    if !panicked.is_empty() {
        bail!(
            "{} panicked; the inputs are in {}",
            panicked.join(", "),
            cli.crashes.display()
        );
    }
    Ok(())
}
