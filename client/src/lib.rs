//! fl-client, the device agent (filled by the server/client and split-learning issues).
//!
//! This crate will hold the agent that connects to fl-server, runs the configured client rule on local
//! data (or only the head of a split network), encodes what it uploads, and reconnects with backoff.
