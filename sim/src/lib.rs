//! fl-sim: Shoal's research front end.
//!
//! Today it holds the centralised baseline ([`central`]) that federated runs are compared against,
//! the dataset selection shared by every command ([`datasets`]), and the benchmarks: training
//! throughput ([`bench`]) and aggregation fold throughput ([`fold_bench`]). The discrete-event
//! fleet simulator joins it in a later issue.

pub mod bench;
pub mod central;
pub mod codec_bench;
pub mod datasets;
pub mod engine;
pub mod experiment;
pub mod fleet;
pub mod fold_bench;
pub mod report;
pub mod traces;
pub mod training;
