//! The sans-IO heart of Shoal: the algorithms of ALGORITHMS.md as plain deterministic code.
//!
//! - [`accumulator`]: the aggregation monoid — f64 weighted sums with `fold` and `merge`, so
//!   aggregation can run eagerly, on many workers, and in trees, whatever the method.
//! - [`rule`]: the two halves of a method ([`ServerRule`], [`ClientRule`]) and what passes between
//!   them; [`rules`] holds one file per method (FedAvg, FedAvgM, FedAvg-M, SCAFFOLD, SCAFFOLD-M,
//!   SCALLION, SCAFCOM, FedAsync, FedBuff, FedFix, FedCompass).
//! - [`staleness`]: the staleness discounts of the asynchronous methods.
//! - [`config`]: the `[algorithm.rule]` table that selects a method, shared by fl-sim and fl-server.
//! - [`problems`]: the federated least-squares problem of ALGORITHMS.md §10.2, a gradient oracle
//!   with a known optimum for tests and examples.
//!
//! No tokio, no clock reads, no files: time and data come in as values.

pub mod accumulator;
pub mod config;
pub mod problems;
pub mod rule;
pub mod rules;
pub mod staleness;

pub use accumulator::{Accumulator, FoldError};
pub use config::{Algorithm, ConfigError, RuleConfig};
pub use rule::{
    ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule, ServerState, Upload,
};
