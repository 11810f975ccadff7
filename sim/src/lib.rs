//! fl-sim: Shoal's research front end.
//!
//! The fleet simulator: [`fleet`] draws devices from distributions or real [`traces`], [`engine`]
//! drives the sans-IO Coordinator on a virtual clock, [`training`] holds what the devices compute
//! (real training, or sizes only) [`split`] what split-learning devices and the server compute, [`server`] the simulated server's capacity (split tails, aggregation charged on the clock), [`experiment`] reads experiment files and runs them, and
//! [`report`] writes metrics, summaries, plots and comparisons, and [`deployment`] turns an experiment into the files that deploy it on fl-server and fl-client. Beside it: the centralised baseline
//! ([`central`]), BottleFit's two-stage bottleneck recipe for split computing ([`distill`]), and the benchmarks ([`bench`], [`fold_bench`], [`codec_bench`]).

pub mod bench;
pub mod central;
pub mod codec_bench;
pub mod deployment;
pub mod distill;
pub mod engine;
pub mod experiment;
pub mod fleet;
pub mod fold_bench;
pub mod report;
pub mod server;
pub mod split;
pub mod traces;
pub mod training;
