//! fl-server, Shoal's aggregation daemon.
//!
//! - [`config`]: `server.toml` — the same `[model]`, `[algorithm]` and codec tables as fl-sim.
//! - [`datadir`]: the data directory `fl-server init` creates (CA, certificates, configuration).
//! - [`run`]: one run driven with real time — the Coordinator, the server rule, evaluation, and
//!   restart by replaying the event log.
//! - [`runtime`]: the serverless aggregation runtime — elastic pools of warm aggregation
//!   instances folding eagerly in leaf → middle → top trees.
//! - [`ef21_memory`]: EF21's per-client memories `h_i`, durable beside the acknowledged updates.
//! - [`store`] and [`files`]: durable state (sled index and event log, atomic tensor files).
//! - [`daemon`]: QUIC connections and the coordinator thread.
//! - [`federation`]: a leaf fl-server's link to its top (partial aggregates up, the top's tasks
//!   and models down).
//! - [`split`]: split learning — the head and tail as one global vector, and the tails that
//!   answer devices' split streams (SplitFed V1/V2).
//! - [`admin`]: the gRPC admin API (status, clients, metrics stream, pause/resume, export).
//! - [`aggregate_bench`]: the runtime's time from the last arrival to the new model, against a
//!   single-threaded fold after all arrive and a memory copy.
//! - [`audit`]: a committed version against a flat aggregation of the updates kept for it (from
//!   the server itself or the leaves of a federation).
//! - [`bench`]: a loopback deployment measured from the server's side.

pub mod admin;
pub mod aggregate_bench;
pub mod audit;
pub mod bench;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod ef21_memory;
pub mod federation;
pub mod files;
pub mod run;
pub mod runtime;
pub mod split;
pub mod store;
