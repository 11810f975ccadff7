//! `fl-server audit`: checks a committed version against a flat aggregation of the same updates.
//!
//! With `[storage] keep_updates = true`, every fl-server keeps the updates it folded into each
//! version (and their weights). The audit reads those of one version — from the server itself, or
//! from the leaves of a federation — folds them all, in order, into one f64 accumulator, applies the
//! rule to the version before, and compares the result with the version the server committed. For
//! a federation this is the statement that leaf → top aggregation equals flat aggregation; the
//! f64 sums the top merged from its leaves' partials are compared with the flat sums as well.

use crate::config::ServerConfig;
use crate::datadir::DataDir;
use crate::store::{KeptUpdate, Store};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_core::ModelVersion as Version;
use shoal_engine::{InPlace, Population, ServerCore, decode_contribution};

/// What an audit found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// The version checked.
    pub version: u64,
    /// Servers whose kept updates were folded.
    pub servers: usize,
    /// Client updates folded (partials count the updates they hold).
    pub updates: u64,
    /// Largest difference between the flat result and the committed model.
    pub max_abs_diff: f64,
    /// `max_abs_diff` over the largest magnitude in the committed model.
    pub max_rel_diff: f64,
    /// The tolerance on `max_abs_diff`.
    pub tolerance: f64,
    /// A federation's top: the largest difference between the f64 sums the top merged from its
    /// leaves' partials and the flat sums of the clients' updates, relative to the largest sum
    /// (the monoid's promise: at most 1e-9).
    pub sums_max_rel_diff: Option<f64>,
    /// Whether it holds.
    pub ok: bool,
}

/// Audits `version` (default: the last committed) of the server in `top`, folding the kept updates
/// of `sources` (default: `top` itself).
pub fn audit(
    top: &DataDir,
    sources: &[DataDir],
    version: Option<u64>,
    tolerance: f64,
) -> Result<AuditReport> {
    let config = ServerConfig::load(&top.config())?;
    let (shape, classes) = config.data.dataset.shape(&config.data.synthetic);
    let model = config.model.build(&shape, classes).context("[model]")?;
    let layout = model.layout().clone();
    let (algorithm, _) = config.algorithm.build(config.seed).context("[algorithm]")?;
    let store = Store::open(&top.root().join("state"), config.fingerprint()).with_context(|| {
        format!(
            "opening {} (is its fl-server still running?)",
            top.root().display()
        )
    })?;
    let version = match version {
        Some(v) => Version(v),
        None => store.committed_version()?.context("no committed version")?,
    };
    if version.0 == 0 {
        bail!("version 0 is the initial model: nothing was aggregated into it");
    }
    let before = store.load_version(Version(version.0 - 1)).with_context(|| {
        format!(
            "loading {} (raise [storage] keep_versions to audit older versions)",
            version.0 - 1
        )
    })?;
    let committed = store.load_version(version)?;
    let own = [top.clone()];
    let sources = if sources.is_empty() { &own[..] } else { sources };
    let parts = algorithm.server.upload_parts();
    // The engine's server core, folding in place: what fl-server's runtime computes on its workers.
    let core = |state| ServerCore::new(algorithm.server.clone(), config.algorithm.clone(), state, InPlace);
    let fold_kept = |core: &mut ServerCore<InPlace>, kept: Vec<(KeptUpdate, Vec<u8>)>| -> Result<()> {
        for (update, bytes) in kept {
            let partial = shoal_compression::partial::is_partial(&bytes);
            let contribution = decode_contribution(&bytes, &update.part_bytes, &layout, parts, partial)
                .with_context(|| update.file.clone())?;
            let task = update.meta.task;
            core.hold(task, contribution, update.meta.loss);
            core.fold(task, update.weight, 0)?;
        }
        Ok(())
    };
    let mut flat = core(before);
    for dir in sources {
        let source_config = ServerConfig::load(&dir.config())?;
        let source = if dir.root() == top.root() {
            None
        } else {
            Some(
                Store::open(&dir.root().join("state"), source_config.fingerprint())
                    .with_context(|| format!("opening {}", dir.root().display()))?,
            )
        };
        let kept = source
            .as_ref()
            .unwrap_or(&store)
            .kept_updates(version)
            .with_context(|| {
                format!(
                    "reading the updates {} kept for {version} (it needs [storage] keep_updates = true)",
                    dir.root().display()
                )
            })?;
        fold_kept(&mut flat, kept)?;
    }
    let acc = flat.merge()?;
    // The top's own sums: the partials it merged, when it kept them.
    let sums_max_rel_diff = match (sources[0].root() == top.root(), store.kept_updates(version)) {
        (false, Ok(kept)) => {
            let mut top_core = core(committed.clone());
            fold_kept(&mut top_core, kept)?;
            let merged = top_core.merge()?;
            let mut worst =
                ((merged.total_weight() - acc.total_weight()) / acc.total_weight().max(1e-300)).abs();
            for part in 0..parts {
                let scale = acc
                    .sum(part)
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs()))
                    .max(f64::MIN_POSITIVE);
                for (a, b) in merged.sum(part).iter().zip(acc.sum(part)) {
                    worst = worst.max((a - b).abs() / scale);
                }
            }
            Some(worst)
        }
        _ => None,
    };
    // The model does not depend on the population `N` (only the control variates do), and the
    // model is what the audit compares.
    flat.apply(
        &acc,
        Population {
            num_clients: 1,
            previous_num_clients: 1,
        },
    )?;
    let state = flat.state();
    let scale = committed.x.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    let max_abs_diff = state
        .x
        .iter()
        .zip(&committed.x)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    let max_rel_diff = max_abs_diff / scale.max(f64::MIN_POSITIVE);
    Ok(AuditReport {
        version: version.0,
        servers: sources.len(),
        updates: acc.count(),
        max_abs_diff,
        max_rel_diff,
        tolerance,
        sums_max_rel_diff,
        ok: max_abs_diff <= tolerance && sums_max_rel_diff.is_none_or(|d| d <= 1e-9),
    })
}
