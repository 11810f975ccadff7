//! The messages fl-client and fl-server exchange, independent of the transport.
//!
//! Each connection carries one bidirectional **control stream** of [`ClientMessage`]s and
//! [`ServerMessage`]s, and one unidirectional stream per large transfer (a model down, an update
//! up), each opened by a [`StreamHeader`] and followed by exactly the bytes it announces — so a big
//! transfer never blocks control traffic. Messages are postcard-encoded inside length-prefixed
//! frames (`framing`). The first client message is a `Hello` carrying [`PROTOCOL_VERSION`]; a server
//! answers a version it does not speak with `Error { code: VersionMismatch }` and closes.
//!
//! In a split-learning run ([`RunDescription::split`]) the model stream carries the head only, and
//! for each task the client opens one bidirectional **split stream**: a [`StreamHeader::Split`]
//! frame, then one frame per minibatch carrying the encoded cut activations and labels
//! (`shoal_compression::cut`); the server answers each, in order, with a frame carrying the
//! gradient at the cut. The client may send several before the first answer (pipelining). When
//! the steps are done it finishes its side, reads the last gradients, and uploads its head update
//! as in the federated mode.

use serde::{Deserialize, Serialize};
use shoal_core::{ClientId, ModelVersion, TaskId, UpdateMeta};

/// The ALPN protocol id both sides must offer (TLS alert 120 otherwise).
pub const ALPN: &[u8] = b"shoal/1";

/// The protocol version a Hello carries.
pub const PROTOCOL_VERSION: u32 = 3;

/// What a device says about itself when it connects (the scheduler's hints; all optional but the
/// sample count).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeclaredProfile {
    /// Training samples on the device.
    pub num_samples: u64,
    /// Seconds per local step it measured, if it has.
    pub step_time_s: Option<f64>,
    /// Uplink it measured, Mbit/s.
    pub up_mbit_s: Option<f64>,
    /// Downlink it measured, Mbit/s.
    pub down_mbit_s: Option<f64>,
}

/// What a client can do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Codec chains it can encode, in the configuration's spelling (`"fedzip"`, `"topk(0.1) | …"`).
    pub codecs: Vec<String>,
    /// Whether it can run the head of a split network.
    pub split: bool,
}

/// Client → server, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// The first message of every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        protocol_version: u32,
        /// The name its certificate was issued to.
        name: String,
        /// What it can do.
        capabilities: Capabilities,
        /// What it says about itself.
        profile: DeclaredProfile,
        /// The task it is still working on or holds an unacknowledged update of, after a
        /// reconnection (the server resends the task otherwise).
        holding: Option<TaskId>,
    },
    /// An update for `meta.task` follows on its own stream, `payload_bytes` long. Resending after
    /// a reconnection is safe: the server deduplicates by task id.
    UpdateReady {
        /// What the Coordinator needs to know.
        meta: UpdateMeta,
        /// Bytes of the encoded payload.
        payload_bytes: u64,
    },
    /// The client could not finish a task.
    TaskFailed {
        /// The task.
        task: TaskId,
        /// Why, for the operator's log.
        reason: String,
    },
    /// The client leaves (it may come back later).
    Bye,
}

/// Server → client, on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The Hello was accepted.
    Welcome {
        /// [`PROTOCOL_VERSION`] of the server.
        protocol_version: u32,
        /// The client's id, stable across its connections.
        client: ClientId,
        /// Limits the server enforces.
        limits: Limits,
        /// What the run trains, so the client builds the same network and client rule.
        run: RunDescription,
    },
    /// Train: the model of `version` follows on its own stream.
    Task {
        /// The task.
        task: TaskId,
        /// The global version to train from.
        version: ModelVersion,
        /// Local steps.
        local_steps: u32,
        /// Local learning rate.
        lr: f32,
        /// The codec chain to encode the update with.
        codec: String,
        /// Error feedback around the codec (`none`, `ef`): the device keeps its memory across tasks.
        feedback: String,
        /// The seed of every random choice the device makes for the task (minibatch order, random
        /// codec stages): the Coordinator's, so a device computes what fl-sim computes for it.
        seed: u64,
        /// Bytes of the model stream that follows.
        model_bytes: u64,
    },
    /// Stop working on a task; its update is no longer wanted.
    Cancel {
        /// The task.
        task: TaskId,
    },
    /// The update of `task` is durable on the server: the client may forget it.
    UpdateAccepted {
        /// The task.
        task: TaskId,
    },
    /// Something was wrong; fatal codes are followed by closing the connection.
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// For humans.
        message: String,
    },
    /// The run is over; the client may exit.
    Finished {
        /// The last global version.
        version: ModelVersion,
    },
}

/// What a client must know to take part in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDescription {
    /// The run's id, the same across the server's restarts (a device keys its saved state by it).
    pub run_id: u64,
    /// Zoo name of the network (`mlp`, `cnn`, …).
    pub model: String,
    /// Parameters of the network (a client whose data gives another count cannot join).
    pub dim: u64,
    /// Local minibatch size.
    pub batch_size: u32,
    /// The method's `[algorithm.rule]` table as JSON (its tagged form does not fit postcard).
    pub rule_json: String,
    /// Split learning: the `[split]` table as JSON (cut, bottleneck, codecs, optimiser, pipeline);
    /// `dim` is then the head's parameter count.
    pub split_json: Option<String>,
}

/// Error codes a server sends before closing (or, for `UnknownTask`, carrying on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The client speaks another protocol version.
    VersionMismatch,
    /// A frame or payload did not decode.
    Malformed,
    /// A frame or payload was larger than the limits.
    TooLarge,
    /// An update for a task this client does not hold (not fatal).
    UnknownTask,
    /// Protocol order violated (e.g. no Hello first).
    Unexpected,
    /// The server failed; the client should reconnect later.
    Internal,
}

impl ErrorCode {
    /// The QUIC application error code a connection is closed with.
    pub fn close_code(self) -> u32 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::UnknownTask => 4,
            ErrorCode::Unexpected => 5,
            ErrorCode::Internal => 6,
        }
    }
}

/// Limits a server enforces, announced in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest control frame, bytes.
    pub max_control_frame: u32,
    /// Largest update payload, bytes.
    pub max_payload_bytes: u64,
    /// Largest frame on a split stream (one minibatch's activations or gradient), bytes.
    pub max_split_frame: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_control_frame: 64 * 1024,
            max_payload_bytes: 1 << 30,
            max_split_frame: 64 << 20,
        }
    }
}

/// The first frame of every unidirectional stream: what its bytes are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamHeader {
    /// Server → client: the broadcast of a version — each of `vectors`, in order, as `dim`
    /// little-endian f32 in the layout's order.
    Model {
        /// The task it is for.
        task: TaskId,
        /// Its version.
        version: ModelVersion,
        /// The vectors that follow.
        vectors: Vec<BroadcastVector>,
        /// Values per vector.
        dim: u64,
    },
    /// Client → server: an update's encoded payloads (compression crate format), one per part the
    /// method uploads, back to back.
    Update {
        /// The task it answers.
        task: TaskId,
        /// Bytes of each part, in order.
        part_bytes: Vec<u64>,
    },
    /// Client → server, first frame of a bidirectional split stream: the minibatch exchanges of
    /// `task` follow, each way as frames of encoded cut tensors.
    Split {
        /// The task being trained.
        task: TaskId,
    },
}

impl StreamHeader {
    /// Bytes that follow the header.
    pub fn body_bytes(&self) -> u64 {
        match self {
            StreamHeader::Model { vectors, dim, .. } => {
                (vectors.len() as u64).saturating_mul(dim.saturating_mul(4))
            }
            StreamHeader::Update { part_bytes, .. } => {
                part_bytes.iter().fold(0u64, |a, &b| a.saturating_add(b))
            }
            StreamHeader::Split { .. } => 0,
        }
    }
}

/// A vector of a method's broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastVector {
    /// The global model `x`.
    Model,
    /// The server control variate `c`.
    ControlVariate,
    /// The global direction `g`.
    Direction,
    /// The previous global model.
    PreviousModel,
}
