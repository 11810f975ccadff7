//! The decoders of what a peer sends, each with valid encodings to mutate: update payloads of every
//! codec chain, control-stream frames (client and server messages, stream headers), split
//! learning's cut tensors, and a federation leaf's partial sums.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_compression::cut::{CutCodec, CutLimits, CutPrecision, decode_cut, encode_cut};
use shoal_compression::partial::{decode_partial, encode_partial, partial_bytes_bound};
use shoal_compression::{CodecSpec, DecodeLimits};
use shoal_core::{ClientId, Layout, LayoutBuilder, ModelVersion, SegmentKind, TaskId, UpdateMeta};
use shoal_net::framing::{FrameDecoder, encode};
use shoal_net::protocol::{
    BroadcastVector, Capabilities, ClientMessage, DeclaredProfile, ErrorCode, PROTOCOL_VERSION,
    ServerMessage, StreamHeader,
};

/// A decoder: whether it accepted the input.
pub type Decode = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// A decoder under test: its name, valid encodings to start from, and the decoder itself, which
/// says whether it accepted the input. It must return (accepting or refusing), never panic.
pub struct Target {
    /// Its name on the command line.
    pub name: &'static str,
    /// Valid encodings.
    pub seeds: Vec<Vec<u8>>,
    /// Whether they end in a checksum of the rest (the compression crate's sealed frames).
    pub sealed: bool,
    /// Decodes one input; whether it was accepted.
    pub decode: Decode,
}

/// Every target's name.
pub const NAMES: [&str; 4] = ["payload", "frame", "cut", "partial"];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    match name {
        "payload" => Some(payload()),
        "frame" => Some(frame()),
        "cut" => Some(cut()),
        "partial" => Some(partial()),
        _ => None,
    }
}

/// A small model's layout: a convolution, a dense layer, a bias and a buffer.
fn layout() -> Layout {
    let mut b = LayoutBuilder::new();
    let segments: [(&str, &[usize], SegmentKind); 4] = [
        ("conv.w", &[4, 1, 3, 3], SegmentKind::Trainable),
        ("dense.w", &[20, 50], SegmentKind::Trainable),
        ("dense.b", &[20], SegmentKind::Trainable),
        ("norm.mean", &[20], SegmentKind::Buffer),
    ];
    for (name, shape, kind) in segments {
        // A fixed, valid layout: building it cannot fail.
        let _ = b.push(name, shape, kind);
    }
    b.build()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Every codec chain a run may configure.
const CODECS: [&str; 12] = [
    "",
    "zstd(3)",
    "topk(0.1)",
    "randk(0.05)",
    "qsgd(4)",
    "sign",
    "kmeans(3)",
    "topk(0.2) | kmeans(3) | huffman",
    "randk(0.1) | qsgd(8) | huffman",
    "fedzip",
    "fedzip | zstd(1)",
    "topk(0.01) | zstd(1)",
];

fn payload() -> Target {
    let layout = layout();
    let v = values(layout.len(), 1);
    let seeds = CODECS
        .iter()
        .filter_map(|spec| spec.parse::<CodecSpec>().ok())
        .filter_map(|spec| shoal_compression::encode(&spec, &layout, &v, 7).ok())
        .collect();
    let limits = DecodeLimits::for_dim(layout.len());
    Target {
        name: "payload",
        seeds,
        sealed: true,
        decode: Box::new(move |bytes| shoal_compression::decode(bytes, &layout, &limits).is_ok()),
    }
}

fn frame() -> Target {
    let meta = UpdateMeta {
        client: ClientId(3),
        task: TaskId(41),
        base_version: ModelVersion(9),
        num_samples: 600,
        local_steps: 5,
        loss: 0.25,
        duration_s: 1.5,
    };
    let client = [
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: "device-7".into(),
            capabilities: Capabilities {
                codecs: vec!["fedzip".into(), "topk(0.1) | qsgd(8)".into()],
                split: true,
            },
            profile: DeclaredProfile {
                num_samples: 600,
                step_time_s: Some(0.02),
                up_mbit_s: Some(10.0),
                down_mbit_s: None,
            },
            holding: Some(TaskId(40)),
        },
        ClientMessage::UpdateReady {
            meta,
            payload_bytes: 123_456,
        },
        ClientMessage::TaskFailed {
            task: TaskId(41),
            reason: "out of memory".into(),
        },
        ClientMessage::Bye,
    ];
    let server = [
        ServerMessage::Task {
            task: TaskId(41),
            version: ModelVersion(9),
            local_steps: 5,
            lr: 0.05,
            codec: "fedzip".into(),
            feedback: "ef".into(),
            seed: 99,
            model_bytes: 800_000,
        },
        ServerMessage::Cancel { task: TaskId(41) },
        ServerMessage::Error {
            code: ErrorCode::Malformed,
            message: "a frame did not decode".into(),
        },
        ServerMessage::Finished {
            version: ModelVersion(30),
        },
    ];
    let headers = [
        StreamHeader::Model {
            task: TaskId(41),
            version: ModelVersion(9),
            vectors: vec![BroadcastVector::Model, BroadcastVector::ControlVariate],
            dim: 1000,
        },
        StreamHeader::Update {
            task: TaskId(41),
            part_bytes: vec![4000, 4000],
        },
        StreamHeader::Split { task: TaskId(41) },
    ];
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    seeds.extend(client.iter().filter_map(|m| encode(m).ok()));
    seeds.extend(server.iter().filter_map(|m| encode(m).ok()));
    seeds.extend(headers.iter().filter_map(|m| encode(m).ok()));
    // Two frames back to back, as a stream carries them.
    if let (Some(a), Some(b)) = (seeds.first().cloned(), seeds.get(1).cloned()) {
        seeds.push([a, b].concat());
    }
    Target {
        name: "frame",
        seeds,
        sealed: false,
        decode: Box::new(|bytes| {
            // Each reader of a control stream takes the same bytes.
            let client = drain::<ClientMessage>(bytes);
            let server = drain::<ServerMessage>(bytes);
            let header = drain::<StreamHeader>(bytes);
            client || server || header
        }),
    }
}

/// Reads every whole frame of `bytes` as `M`; whether at least one decoded before any error.
fn drain<M: serde::de::DeserializeOwned>(bytes: &[u8]) -> bool {
    let mut decoder = FrameDecoder::new(64 * 1024);
    decoder.push(bytes);
    let mut any = false;
    while let Ok(Some(_)) = decoder.next_message::<M>() {
        any = true;
    }
    any
}

fn cut() -> Target {
    let (batch, per_sample) = (8usize, 64usize);
    let v = values(batch * per_sample, 2);
    let labels: Vec<u32> = (0..batch as u32).collect();
    let mut seeds = Vec::new();
    for precision in [
        CutPrecision::F32,
        CutPrecision::Int8PerChannel,
        CutPrecision::Int8PerTensor,
    ] {
        for zstd in [None, Some(1)] {
            let codec = CutCodec { precision, zstd };
            for (shape, labels) in [
                (vec![batch, per_sample], labels.as_slice()),
                (vec![batch, 4, 4, 4], &[][..]),
            ] {
                seeds.extend(encode_cut(&codec, &shape, &v, labels).ok());
            }
        }
    }
    let limits = CutLimits::for_batches(32, per_sample);
    Target {
        name: "cut",
        seeds,
        sealed: true,
        decode: Box::new(move |bytes| decode_cut(bytes, &limits).is_ok()),
    }
}

fn partial() -> Target {
    let layout = layout();
    let dim = layout.len();
    let sums: Vec<Vec<f64>> = (0..2)
        .map(|p| values(dim, 3 + p).into_iter().map(f64::from).collect())
        .collect();
    let one = encode_partial(&[&sums[0]], 3.5, 4, &layout).ok();
    let two = encode_partial(&[&sums[0], &sums[1]], 12.0, 5, &layout).ok();
    let seeds = one.into_iter().chain(two).collect();
    Target {
        name: "partial",
        seeds,
        sealed: true,
        decode: Box::new(move |bytes| {
            // A top decodes with its run's parts per upload: one, or two for control variates.
            (1..=2)
                .any(|parts| decode_partial(bytes, &layout, parts, partial_bytes_bound(parts, dim)).is_ok())
        }),
    }
}
