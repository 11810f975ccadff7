//! The sans-IO heart of Shoal: the algorithms of ALGORITHMS.md as plain deterministic code.
//!
//! - [`accumulator`]: the aggregation monoid — f64 weighted sums with `fold` and `merge`, so
//!   aggregation can run eagerly, on many workers, and in trees, whatever the method.
//! - [`rule`]: the two halves of a method ([`ServerRule`], [`ClientRule`]) and what passes between
//!   them; [`rules`] holds one file per method (FedAvg, FedAvgM, FedAvg-M, SCAFFOLD, SCAFFOLD-M,
//!   SCALLION, SCAFCOM, FedAsync, FedBuff, FedFix, FedCompass).
//! - [`staleness`]: the staleness discounts of the asynchronous methods.
//! - [`schedulers`]: when to aggregate, who trains for how many steps, with what weights —
//!   synchronous rounds, FedBuff, FedAsync, FedFix, FedCompass.
//! - [`coordinator`]: the sans-IO state machine both drivers run: events in, commands out; it owns
//!   the version counter and the client records, and runs the configured scheduler.
//! - [`hierarchy`]: planning leaf → middle → top aggregation trees (LIFL), their cost model, and
//!   a virtual timeline of the server's aggregation work for the simulator.
//! - [`config`]: the `[algorithm]` table (rule, scheduler, local work), shared by fl-sim and
//!   fl-server.
//! - [`problems`]: the federated least-squares problem of ALGORITHMS.md §10.2, a gradient oracle
//!   with a known optimum for tests and examples.
//!
//! No tokio, no clock reads, no files: time and data come in as values.

pub mod accumulator;
pub mod config;
pub mod coordinator;
pub mod hierarchy;
pub mod problems;
pub mod rule;
pub mod rules;
pub mod schedulers;
pub mod seed;
pub mod snapshot;
pub mod staleness;

pub use accumulator::{Accumulator, FoldError};
pub use config::{Algorithm, AlgorithmConfig, ConfigError, RuleConfig};
pub use coordinator::{
    ClientRecord, Command, Coordinator, CoordinatorError, CoordinatorStats, DiscardReason, Event, TaskRecord,
};
pub use rule::{
    Aggregation, ApplyContext, Broadcast, ClientRule, ClientState, LocalTask, RuleError, ServerRule,
    ServerState, Upload,
};
pub use schedulers::{SchedulerConfig, Weighting};
pub use seed::task_seed;
