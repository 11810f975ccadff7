//! No value of a numeric field of server.toml panics fl-server: every integer and float field of
//! the configuration — of the template `fl-server init` writes, and of each rule, scheduler, split
//! and federation table with all their defaults spelled out — is set, one at a time, to the edges
//! of the integer and float ranges, zero, negatives, NaN and infinities, and seeded random
//! magnitudes. Each case goes through what a start does: parse, check, the daemon's durations,
//! opening the run (store, model, held-out set, Coordinator, aggregation runtime), then clients
//! joining, an update offered, a task failed, a client leaving and the Coordinator's timers. A
//! value either fails with an error or runs; a panic is reported with its field and value.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use common::offline::*;
use shoal_aggregators::Event;
use shoal_fuzz::config_values::{Variant, merged, method_tables, try_variants};
use shoal_server::config::{ServerConfig, template};
use shoal_server::run::Run;
use std::net::SocketAddr;

/// Seeded random values per field, beside the edge values.
const RANDOM_PER_FIELD: usize = 4;

/// What a start does with `case`, then a few events: `Ok(true)` when the configuration was
/// accepted and the run went on, an error when it was refused.
fn start_and_drive(case: toml::Value) -> anyhow::Result<bool> {
    let config: ServerConfig = case.try_into()?;
    config.validate()?;
    config.server.durations()?;
    let dir = tempfile::tempdir()?;
    let mut server = Run::open(config, dir.path(), None)?;
    let mut tasks = join(&mut server, 3);
    if let Some(&first) = tasks.first() {
        let _ = offer_update(&mut server, first, 0.01, 0);
    }
    if let Some(&(_, task, _)) = tasks.get(1) {
        server.handle(Event::TaskFailed { task })?;
    }
    if let Some((client, _, _)) = tasks.pop() {
        server.handle(Event::Left { client })?;
    }
    if server.next_wakeup().is_some() {
        server.handle(Event::Timer)?;
    }
    Ok(true)
}

/// The template on synthetic data (no files needed) with `tables` merged over it, written out
/// with every field's default (so each numeric field is in the document), varied under `under`.
fn variant(tables: &str, under: &[&'static str]) -> Variant {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let text = template(any, any)
        .replace("dataset = \"mnist\"", "dataset = \"synthetic\"")
        .replace("# test_samples = 2000", "test_samples = 50");
    let doc = merged(&text, tables).unwrap();
    let config: ServerConfig = doc.try_into().unwrap();
    config.validate().unwrap();
    Variant {
        doc: toml::Value::try_from(&config).unwrap(),
        under: under.to_vec(),
    }
}

#[test]
fn no_value_of_a_numeric_field_panics_a_start() {
    // The template whole, then the tables each variant adds.
    let mut variants = vec![variant("", &[])];
    for tables in method_tables() {
        variants.push(variant(&tables, &["algorithm"]));
    }
    variants.push(variant(
        "[data]\ndataset = \"mnist\"\n[eval]\nenabled = false\n[model]\nname = \"cnn\"\n\
             [split]\ncut = \"pool1\"\nbottleneck = { channels = 4 }",
        &["split", "model"],
    ));
    variants.push(variant(
        "[federation]\nrole = \"top\"\nleaves = [\"leaf-a\"]",
        &["algorithm", "runtime"],
    ));
    let tally = try_variants(&variants, 0, RANDOM_PER_FIELD, start_and_drive);
    eprintln!(
        "{} fields, {} configurations, {} accepted and run",
        tally.fields, tally.cases, tally.accepted
    );
    if let Some(defect) = tally.defect() {
        panic!("{defect}");
    }
}
