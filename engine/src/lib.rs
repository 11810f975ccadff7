//! Shoal's engine: the sans-IO steps of a task that every driver runs, so fl-sim, fl-server and
//! fl-client compute the same numbers from the same inputs.
//!
//! **Where the line runs.** Everything that decides a number lives here or in the crates below
//! (`shoal-aggregators` for the rules, schedulers and the Coordinator, which also derives each
//! task's seed and sends it with the task; `shoal-compression` for the codecs): what a device
//! computes and encodes for a task, which codec a rule may take. A driver decides only *when* (a real or a virtual clock), *where*
//! (sockets, files, threads) and *how durably*. A driver that needs one of these steps calls this
//! crate; it does not build its own.
//!
//! - [`device`]: the device side of a federated task — the client rule on local data through a
//!   gradient oracle, the upload encoded with the codec chain through error feedback, the payloads
//!   a server decodes, and the state (rule state, feedback memory) to keep once the server has
//!   the update.
//! - [`upload`]: what an accepted update contributes — a client's payloads decoded and checked
//!   as they arrive, or a leaf server's partial aggregate.
//! - [`server_core`]: the server side of every task once the Coordinator decides: holding each
//!   accepted contribution, folding it (on the driver's executor: in place in fl-sim, fl-server's
//!   serverless workers), merging, applying the rule for the population `N` and the configured
//!   local task, and the state to broadcast and persist.
//! - [`metrics`]: what both drivers write to `metrics.jsonl` and `summary.json`, with one
//!   meaning.
//! - [`pairing`]: which codecs and which error feedback suit which rules, checked when a
//!   configuration is loaded (fl-sim experiments and fl-server's `server.toml` alike).
//!
//! Split learning's device and server steps are in `shoal-split`, at the same level (the head
//! runner trains the head and encodes its update, `HeadRunner::encode_update`).
//!
//! **How the line is kept.** The driver crates (fl-sim, fl-server, fl-client) each carry a
//! `clippy.toml` whose `disallowed-methods` name the steps that are this crate's: a server rule's
//! `fold` and `apply`, a client rule's `train`, the task-seed derivation, building a codec
//! compressor or an error-feedback memory. `.ci/run` runs clippy with `-D warnings`, so a driver
//! that grows its own copy of a step does not land; the two places a driver runs such a step by
//! nature (fl-server's runtime threads running the rule's fold as this crate's
//! [`FoldExecutor`], a benchmark's fixture) say so with `#[expect(..., reason = ...)]`.

pub mod device;
pub mod metrics;
pub mod pairing;
pub mod server_core;
pub mod upload;

pub use device::{DeviceError, DeviceState, DeviceTask, DeviceUpdate, run_task};
pub use pairing::{FeedbackError, MethodError, PairingError, check_codec, check_feedback, check_method};
pub use server_core::{
    CoreError, ExecutorError, FoldExecutor, InPlace, InPlaceFolds, OpenFolds, Population, ServerCore,
};
pub use upload::{Contribution, SharedUpload, UploadError, decode_contribution, decode_upload, ef21_receive};

/// A rule from the text of its `[algorithm.rule]` table, for this crate's tests.
#[cfg(test)]
mod test_rule {
    use shoal_aggregators::RuleConfig;

    pub(crate) fn rule(table: &str) -> RuleConfig {
        #[derive(serde::Deserialize)]
        struct Wrap {
            rule: RuleConfig,
        }
        let wrapped: Wrap = toml::from_str(&format!("[rule]\n{table}")).expect("a valid rule table");
        wrapped.rule
    }
}
