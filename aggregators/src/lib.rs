//! The sans-IO heart of Shoal (filled by the algorithms issue).
//!
//! This crate will hold, one file per method, both halves of every algorithm in ALGORITHMS.md — the
//! server rule (an accumulator of f64 weighted sums with `fold`, `merge` and `apply`) and the client
//! rule (local steps against `shoal_core::GradientOracle`) — the schedulers (synchronous rounds,
//! FedBuff, FedAsync, FedFix, FedCompass) and the Coordinator state machine that both `fl-server` and
//! `fl-sim` drive. No tokio, no clock reads, no files.
