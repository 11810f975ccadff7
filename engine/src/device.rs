//! The device side of a federated task: run the method's client rule from the broadcast on the
//! device's data and encode exactly what it uploads.
//!
//! Two kinds of rule meet here. Most rules (FedAvg and its relatives, SCAFFOLD, the momentum
//! methods) return dense vectors, and the engine encodes each with the codec chain. SCALLION and
//! SCAFCOM compress their own upload, because the client's state must move by exactly what the
//! server will decode: for them the engine hands the rule a compressor that records every payload
//! it produced, and sends those payloads — after checking that what the rule returned is, value
//! for value, what those payloads decode to. A rule that changed its compressed vector after
//! compressing it (and so would make the server fold something the client never sent) is refused
//! with [`DeviceError::UploadNotSent`] rather than silently sent.
//!
//! Error feedback (`feedback = "ef"` or `"ef21"`) wraps the codec of the dense uploads, with one
//! memory per uploaded part kept in the [`DeviceState`] from task to task: under EF the payload
//! encodes `u + e` and `e` keeps what the codec dropped; under EF21 it encodes `u − h` and the
//! server, which keeps the same `h` for this client, folds `h + C(u − h)`.
//!
//! fl-client sends [`DeviceUpdate::payloads`]; fl-sim folds [`DeviceUpdate::decoded`], which is
//! what a server folds from those payloads. Both come from the one [`run_task`].

use serde::{Deserialize, Serialize};
use shoal_aggregators::{Broadcast, ClientRule, ClientState, LocalTask, RuleError};
use shoal_compression::feedback::{Ef21, ErrorFeedback, Feedback};
use shoal_compression::{CodecCompressor, CodecSpec, DecodeLimits};
use shoal_core::{CompressError, Compressor, GradientOracle, Layout};
use std::sync::Arc;
use thiserror::Error;

/// What a device keeps from one task to the next: its rule's state and its error-feedback memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The client rule's state (`c_i`, `v_i`).
    pub rule: ClientState,
    /// One error-feedback memory per uploaded part (EF's `e`, EF21's `h`); empty without feedback.
    pub feedback: Vec<Vec<f32>>,
}

/// What one task needs besides the device's data and its state.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTask<'a> {
    /// The method's client half.
    pub rule: &'a dyn ClientRule,
    /// Local steps and learning rate.
    pub local: LocalTask,
    /// What the server sent with the task.
    pub broadcast: &'a Broadcast,
    /// The upload codec chain.
    pub codec: &'a CodecSpec,
    /// Error feedback around the codec.
    pub feedback: Feedback,
    /// The layout of the vectors uploaded (the model's, or a split head's).
    pub layout: &'a Arc<Layout>,
    /// The task's seed, as the Coordinator gave it ([`shoal_aggregators::task_seed`]): minibatches draw from it through the oracle, random
    /// codec stages here.
    pub seed: u64,
}

/// What a task produced.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpdate {
    /// One encoded payload per uploaded part: the bytes a device sends.
    pub payloads: Vec<Vec<u8>>,
    /// What a server folds for each payload, in the rule's fold order: what it decodes, or under
    /// EF21 its copy of this client's `h` after adding what it decodes.
    pub decoded: Vec<Vec<f32>>,
    /// Mean minibatch loss over the local steps.
    pub mean_loss: f32,
    /// Local steps run.
    pub local_steps: u32,
}

impl DeviceUpdate {
    /// Payload bytes of the upload.
    pub fn bytes(&self) -> u64 {
        self.payloads.iter().map(|p| p.len() as u64).sum()
    }
}

/// Why a task produced no update.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DeviceError {
    /// The client rule failed (local training, its own compression, a malformed broadcast).
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// The codec could not encode the upload.
    #[error("encoding the upload: {0}")]
    Encode(#[from] CompressError),
    /// A payload this device produced did not decode (a codec defect: never sent).
    #[error("the upload's own payload failed to decode: {0}")]
    SelfDecode(String),
    /// A rule that compresses its upload returned something other than what it compressed.
    #[error(
        "the rule compressed {compressed} vector(s) but uploads {parts}, or changed one after compressing it: \
         the server would fold values the device never sent"
    )]
    UploadNotSent {
        /// Payloads the rule produced.
        compressed: usize,
        /// Parts it returned.
        parts: usize,
    },
    /// Error feedback was asked of a rule that compresses its own upload.
    #[error("error feedback `{0}` cannot wrap a rule that compresses its own upload (SCALLION, SCAFCOM)")]
    FeedbackOnSelfCompressed(Feedback),
}

/// The codec chain as the rules see it, keeping every payload it produced.
struct RecordingCompressor {
    inner: CodecCompressor,
    payloads: Vec<Vec<u8>>,
}

impl Compressor for RecordingCompressor {
    fn compress(&mut self, v: &mut [f32]) -> Result<(), CompressError> {
        let payload = self.inner.encode(v)?;
        shoal_compression::decode_into(&payload, self.inner.layout(), &DecodeLimits::for_dim(v.len()), v)
            .map_err(|e| CompressError::Other(format!("own payload failed to decode: {e}")))?;
        self.payloads.push(payload);
        Ok(())
    }

    fn is_unbiased(&self) -> bool {
        self.inner.is_unbiased()
    }
}

/// Encodes one dense part with the codec, through error feedback when `feedback` asks, with the
/// memory `memory` (moved on); returns the payload and what the server folds for it.
fn encode_part(
    compressor: RecordingCompressor,
    feedback: Feedback,
    memory: &mut Vec<f32>,
    part: &[f32],
) -> Result<(RecordingCompressor, Vec<u8>, Vec<f32>), DeviceError> {
    let mut values = part.to_vec();
    let mut compressor = match feedback {
        Feedback::None => {
            let mut compressor = compressor;
            compressor.compress(&mut values)?;
            compressor
        }
        Feedback::Ef => {
            let mut ef = ErrorFeedback::with_memory(compressor, std::mem::take(memory));
            ef.compress(&mut values)?;
            let (compressor, e) = ef.into_parts();
            *memory = e;
            compressor
        }
        Feedback::Ef21 => {
            let mut ef = Ef21::with_state(compressor, std::mem::take(memory));
            ef.compress(&mut values)?;
            let (compressor, h) = ef.into_parts();
            *memory = h;
            compressor
        }
    };
    let payload = compressor
        .payloads
        .pop()
        .ok_or_else(|| DeviceError::SelfDecode("the codec produced no payload".into()))?;
    Ok((compressor, payload, values))
}

/// Runs `task` on the device's data (through `oracle`) from its persistent `state`, which moves
/// as the rule and the error feedback say; returns the encoded upload. On an error `state` may
/// have moved: a driver keeps the state it had before the task (see fl-client and fl-sim).
pub fn run_task(
    task: &DeviceTask<'_>,
    state: &mut DeviceState,
    oracle: &mut dyn GradientOracle,
) -> Result<DeviceUpdate, DeviceError> {
    let mut compressor = RecordingCompressor {
        inner: CodecCompressor::new(task.codec.clone(), task.layout.clone(), task.seed),
        payloads: Vec::new(),
    };
    let upload = task.rule.train(
        &task.local,
        task.broadcast,
        &mut state.rule,
        oracle,
        &mut compressor,
    )?;
    let limits = DecodeLimits::for_dim(task.layout.len());
    let decode = |payload: &[u8]| {
        shoal_compression::decode(payload, task.layout, &limits)
            .map(|(values, _)| values)
            .map_err(|e| DeviceError::SelfDecode(e.to_string()))
    };
    let (payloads, decoded) = if compressor.payloads.is_empty() {
        if task.feedback != Feedback::None {
            state.feedback.resize_with(upload.parts.len(), Vec::new);
        }
        let mut payloads = Vec::with_capacity(upload.parts.len());
        let mut decoded = Vec::with_capacity(upload.parts.len());
        for (i, part) in upload.parts.iter().enumerate() {
            let mut none = Vec::new();
            let memory = state.feedback.get_mut(i).unwrap_or(&mut none);
            let (next, payload, folded) = encode_part(compressor, task.feedback, memory, part)?;
            compressor = next;
            decoded.push(folded);
            payloads.push(payload);
        }
        (payloads, decoded)
    } else {
        if task.feedback != Feedback::None {
            return Err(DeviceError::FeedbackOnSelfCompressed(task.feedback));
        }
        let sent_as_compressed = compressor.payloads.len() == upload.parts.len()
            && compressor
                .payloads
                .iter()
                .zip(&upload.parts)
                .all(|(payload, part)| decode(payload).is_ok_and(|values| &values == part));
        if !sent_as_compressed {
            return Err(DeviceError::UploadNotSent {
                compressed: compressor.payloads.len(),
                parts: upload.parts.len(),
            });
        }
        (compressor.payloads, upload.parts)
    };
    Ok(DeviceUpdate {
        payloads,
        decoded,
        mean_loss: upload.mean_loss,
        local_steps: upload.local_steps,
    })
}

/// Bytes `codec` gives a typical dense update of `layout` — a Gaussian vector of standard
/// deviation 0.01, drawn from `seed` — for fl-sim's systems-only runs, which size uploads without
/// training.
pub fn typical_upload_bytes(
    layout: &Arc<Layout>,
    codec: &CodecSpec,
    seed: u64,
) -> Result<u64, CompressError> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.01).expect("a constant, valid standard deviation");
    let update: Vec<f32> = (0..layout.len()).map(|_| normal.sample(&mut rng)).collect();
    let mut codec = CodecCompressor::new(codec.clone(), layout.clone(), seed);
    Ok(codec.encode(&update)?.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rule::rule;
    use shoal_aggregators::problems::LeastSquaresProblem;
    use shoal_core::{LayoutBuilder, SegmentKind};

    const DIM: usize = 40;

    fn layout() -> Arc<Layout> {
        let mut b = LayoutBuilder::new();
        b.push("w", &[4, 10], SegmentKind::Trainable)
            .expect("a valid segment");
        Arc::new(b.build())
    }

    fn broadcast(with_c: bool) -> Broadcast {
        let x: Vec<f32> = (0..DIM).map(|i| (i as f32 * 0.1).sin()).collect();
        let c: Vec<f32> = (0..DIM).map(|i| (i as f32 * 0.3).cos() * 0.01).collect();
        Broadcast {
            x: Arc::from(x),
            c: with_c.then(|| Arc::from(c)),
            g: None,
            x_prev: None,
        }
    }

    fn run(rule_table: &str, codec: &str, state: &mut DeviceState) -> Result<DeviceUpdate, DeviceError> {
        run_with(rule_table, codec, Feedback::None, state, 11)
    }

    fn run_with(
        rule_table: &str,
        codec: &str,
        feedback: Feedback,
        state: &mut DeviceState,
        seed: u64,
    ) -> Result<DeviceUpdate, DeviceError> {
        let problem = LeastSquaresProblem::generate(2, DIM, 30, 0.5, 3);
        let algorithm = rule(rule_table).build().expect("a valid rule");
        let codec: CodecSpec = codec.parse().expect("a valid codec");
        let layout = layout();
        let b = broadcast(true);
        let task = DeviceTask {
            rule: algorithm.client.as_ref(),
            local: LocalTask {
                local_steps: 5,
                lr: 0.05,
            },
            broadcast: &b,
            codec: &codec,
            feedback,
            layout: &layout,
            seed,
        };
        run_task(&task, state, &mut problem.minibatch_oracle(0, 8, seed))
    }

    #[test]
    fn payloads_decode_to_what_is_folded() {
        for (rule_table, codec) in [
            ("rule = \"fedavg\"", "identity"),
            ("rule = \"fedavg\"", "topk(0.2) | kmeans(3) | huffman"),
            ("rule = \"scaffold\"", "identity"),
            ("rule = \"scallion\"\nalpha = 0.5", "randk(0.25)"),
            ("rule = \"scafcom\"", "topk(0.1)"),
        ] {
            let update = run(rule_table, codec, &mut DeviceState::default()).expect("a task");
            assert_eq!(update.payloads.len(), update.decoded.len());
            for (payload, decoded) in update.payloads.iter().zip(&update.decoded) {
                let (values, _) = shoal_compression::decode(payload, &layout(), &DecodeLimits::for_dim(DIM))
                    .expect("decodes");
                assert_eq!(&values, decoded, "{rule_table} with {codec}");
            }
            assert_eq!(update.local_steps, 5);
        }
    }

    /// SCALLION under either α placement: the client's control variate moves by exactly α times
    /// what the server decodes, so the server's `c` stays the mean of the `c_i`.
    #[test]
    fn scallion_sends_what_its_control_variate_moved_by() {
        for placement in ["control_variates", "payload"] {
            let table = format!("rule = \"scallion\"\nalpha = 0.5\nalpha_placement = \"{placement}\"");
            let mut state = DeviceState {
                rule: ClientState {
                    c: Some(vec![0.001; DIM]),
                    v: None,
                },
                feedback: Vec::new(),
            };
            let before = state.rule.c.clone().expect("set above");
            let update = run(&table, "randk(0.25)", &mut state).expect("a task");
            let after = state.rule.c.expect("SCALLION keeps c_i");
            for i in 0..DIM {
                let moved = after[i] - before[i];
                let sent = 0.5 * update.decoded[0][i];
                assert!(
                    (moved - sent).abs() <= 1e-6 * (1.0 + sent.abs()),
                    "{placement} [{i}]: {moved} vs {sent}"
                );
            }
        }
    }

    /// A rule that compresses its upload and then changes it.
    #[derive(Debug)]
    struct ScalesAfterCompressing;

    impl ClientRule for ScalesAfterCompressing {
        fn train(
            &self,
            _: &LocalTask,
            broadcast: &Broadcast,
            _: &mut ClientState,
            _: &mut dyn GradientOracle,
            compressor: &mut dyn Compressor,
        ) -> Result<shoal_aggregators::Upload, RuleError> {
            let mut m = broadcast.x.to_vec();
            compressor.compress(&mut m)?;
            m.iter_mut().for_each(|v| *v *= 0.5);
            Ok(shoal_aggregators::Upload {
                parts: vec![m],
                mean_loss: 0.0,
                local_steps: 1,
            })
        }
    }

    #[test]
    fn an_upload_changed_after_compression_is_refused() {
        let problem = LeastSquaresProblem::generate(1, DIM, 10, 0.0, 1);
        let codec: CodecSpec = "randk(0.5)".parse().expect("a valid codec");
        let layout = layout();
        let b = broadcast(false);
        let task = DeviceTask {
            rule: &ScalesAfterCompressing,
            local: LocalTask {
                local_steps: 1,
                lr: 0.1,
            },
            broadcast: &b,
            codec: &codec,
            feedback: Feedback::None,
            layout: &layout,
            seed: 1,
        };
        let err = run_task(
            &task,
            &mut DeviceState::default(),
            &mut problem.full_batch_oracle(0),
        )
        .expect_err("refused");
        assert!(
            matches!(
                err,
                DeviceError::UploadNotSent {
                    compressed: 1,
                    parts: 1
                }
            ),
            "{err}"
        );
    }

    /// The dense update FedAvg uploads for a task of `seed` (identity codec, no feedback).
    fn dense_update(seed: u64) -> Vec<f32> {
        let update = run_with(
            "rule = \"fedavg\"",
            "identity",
            Feedback::None,
            &mut DeviceState::default(),
            seed,
        )
        .expect("a task");
        update.decoded[0].clone()
    }

    /// EF over several tasks: what the server folds plus the new memory is the update plus the old
    /// memory, value for value, so nothing the codec dropped is lost; the memory persists.
    #[test]
    fn error_feedback_keeps_what_the_codec_dropped_across_tasks() {
        let mut state = DeviceState::default();
        let mut sent = vec![0f64; DIM];
        let mut produced = vec![0f64; DIM];
        for seed in 1..=6 {
            let before = state.feedback.first().cloned().unwrap_or_else(|| vec![0.0; DIM]);
            let update =
                run_with("rule = \"fedavg\"", "topk(0.1)", Feedback::Ef, &mut state, seed).expect("a task");
            let u = dense_update(seed);
            let after = &state.feedback[0];
            for i in 0..DIM {
                let lhs = update.decoded[0][i] + after[i];
                let rhs = u[i] + before[i];
                assert!(
                    (lhs - rhs).abs() <= 1e-6 * (1.0 + rhs.abs()),
                    "task {seed} [{i}]: {lhs} vs {rhs}"
                );
                sent[i] += f64::from(update.decoded[0][i]);
                produced[i] += f64::from(u[i]);
            }
            // Top-10 % sends 4 of 40 values: the rest waits in the memory.
            assert_eq!(update.decoded[0].iter().filter(|v| **v != 0.0).count(), 4);
        }
        // Σ sent + e = Σ u after every task.
        for i in 0..DIM {
            let total = sent[i] + f64::from(state.feedback[0][i]);
            assert!(
                (total - produced[i]).abs() <= 1e-5 * (1.0 + produced[i].abs()),
                "[{i}]"
            );
        }
    }

    /// EF21: the payload decodes to the change of `h`, and the server folds the new `h`.
    #[test]
    fn ef21_sends_the_change_of_h_and_the_server_folds_h() {
        let mut state = DeviceState::default();
        let mut receiver: Vec<f32> = Vec::new();
        for seed in 1..=4 {
            let update =
                run_with("rule = \"fedavg\"", "topk(0.2)", Feedback::Ef21, &mut state, seed).expect("a task");
            let (message, _) =
                shoal_compression::decode(&update.payloads[0], &layout(), &DecodeLimits::for_dim(DIM))
                    .expect("decodes");
            shoal_compression::feedback::ef21_receive(&mut receiver, &message).expect("same length");
            assert_eq!(
                receiver, update.decoded[0],
                "task {seed}: the server's h is the device's"
            );
            assert_eq!(state.feedback[0], update.decoded[0]);
        }
    }

    #[test]
    fn feedback_around_a_self_compressing_rule_is_refused() {
        let err = run_with(
            "rule = \"scafcom\"",
            "topk(0.1)",
            Feedback::Ef,
            &mut DeviceState::default(),
            1,
        )
        .expect_err("refused");
        assert!(
            matches!(err, DeviceError::FeedbackOnSelfCompressed(Feedback::Ef)),
            "{err}"
        );
    }
}
