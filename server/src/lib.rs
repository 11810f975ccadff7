//! fl-server, the aggregation daemon (filled by the server/client issue).
//!
//! This crate will hold the connection handling, the serverless aggregation runtime that folds
//! decoded updates on a pool of workers, durable state (atomic files plus a sled index) and the admin
//! API, all driving the same Coordinator that fl-sim drives.
