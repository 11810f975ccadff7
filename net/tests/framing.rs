//! Protocol messages survive framing however the bytes are split, and whatever a peer sends the
//! decoder answers with a message, a wait, or a typed error — never a panic.

use proptest::prelude::*;
use shoal_core::{ClientId, ModelVersion, TaskId, UpdateMeta};
use shoal_net::framing::{FrameDecoder, FrameError, encode};
use shoal_net::protocol::{
    BroadcastVector, Capabilities, ClientMessage, DeclaredProfile, ErrorCode, Limits, PROTOCOL_VERSION,
    RunDescription, ServerMessage, StreamHeader,
};

fn client_messages() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: "device-17".into(),
            capabilities: Capabilities {
                codecs: vec!["fedzip".into(), "topk(0.1) | qsgd(8) | huffman".into()],
                split: true,
            },
            profile: DeclaredProfile {
                num_samples: 600,
                step_time_s: Some(0.05),
                up_mbit_s: None,
                down_mbit_s: Some(20.0),
            },
            holding: Some(TaskId(3)),
        },
        ClientMessage::UpdateReady {
            meta: UpdateMeta {
                client: ClientId(17),
                task: TaskId(4),
                base_version: ModelVersion(3),
                num_samples: 600,
                local_steps: 60,
                loss: 0.25,
                duration_s: 12.5,
            },
            payload_bytes: 1 << 20,
        },
        ClientMessage::TaskFailed {
            task: TaskId(5),
            reason: "battery low".into(),
        },
        ClientMessage::Bye,
    ]
}

fn server_messages() -> Vec<ServerMessage> {
    vec![
        ServerMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            client: ClientId(17),
            limits: Limits::default(),
            run: RunDescription {
                run_id: 0x0123_4567_89ab_cdef,
                model: "mlp".into(),
                dim: 199_210,
                batch_size: 10,
                rule_json: r#"{"rule":"fedavg"}"#.into(),
                split_json: Some(r#"{"cut":"pool1"}"#.into()),
            },
        },
        ServerMessage::Task {
            task: TaskId(4),
            version: ModelVersion(3),
            local_steps: 60,
            lr: 0.05,
            codec: "fedzip".into(),
            feedback: "ef".into(),
            seed: 0x5eed_0000_0000_0042,
            model_bytes: 796_840,
        },
        ServerMessage::Cancel { task: TaskId(4) },
        ServerMessage::UpdateAccepted { task: TaskId(4) },
        ServerMessage::Error {
            code: ErrorCode::VersionMismatch,
            message: "server speaks 1".into(),
        },
        ServerMessage::Finished {
            version: ModelVersion(9),
        },
    ]
}

#[test]
fn every_message_round_trips_byte_by_byte() {
    let mut stream = Vec::new();
    for m in client_messages() {
        stream.extend(encode(&m).unwrap());
    }
    let mut decoder = FrameDecoder::new(Limits::default().max_control_frame);
    let mut got = Vec::new();
    for byte in &stream {
        decoder.push(std::slice::from_ref(byte));
        while let Some(m) = decoder.next_message::<ClientMessage>().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, client_messages());
    assert_eq!(decoder.buffered(), 0);

    let mut decoder = FrameDecoder::new(1 << 16);
    for m in server_messages() {
        decoder.push(&encode(&m).unwrap());
    }
    for m in server_messages() {
        assert_eq!(decoder.next_message::<ServerMessage>().unwrap(), Some(m));
    }
    let headers = [
        StreamHeader::Update {
            task: TaskId(4),
            part_bytes: vec![123, 77],
        },
        StreamHeader::Model {
            task: TaskId(4),
            version: ModelVersion(3),
            vectors: vec![BroadcastVector::Model, BroadcastVector::ControlVariate],
            dim: 10,
        },
        StreamHeader::Split { task: TaskId(9) },
    ];
    for header in headers {
        decoder.push(&encode(&header).unwrap());
        assert_eq!(
            decoder.next_message::<StreamHeader>().unwrap(),
            Some(header.clone())
        );
    }
    assert_eq!(
        StreamHeader::Update {
            task: TaskId(1),
            part_bytes: vec![u64::MAX, 5]
        }
        .body_bytes(),
        u64::MAX,
        "sizes saturate instead of overflowing"
    );
}

#[test]
fn oversized_and_malformed_frames_are_typed_errors() {
    let mut decoder = FrameDecoder::new(100);
    decoder.push(&1000u32.to_le_bytes());
    assert_eq!(
        decoder.next_message::<ClientMessage>(),
        Err(FrameError::TooLarge {
            len: 1000,
            limit: 100
        })
    );
    let mut decoder = FrameDecoder::new(100);
    decoder.push(&3u32.to_le_bytes());
    decoder.push(&[0xff, 0xff, 0xff]);
    assert!(matches!(
        decoder.next_message::<ClientMessage>(),
        Err(FrameError::Malformed(_))
    ));
    // A truncated frame waits for more bytes.
    let frame = encode(&client_messages()[0]).unwrap();
    let mut decoder = FrameDecoder::new(1 << 16);
    decoder.push(&frame[..frame.len() - 1]);
    assert_eq!(decoder.next_message::<ClientMessage>(), Ok(None));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512), limit in 0u32..1024) {
        let mut decoder = FrameDecoder::new(limit);
        decoder.push(&bytes);
        for _ in 0..8 {
            match decoder.next_message::<ClientMessage>() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn mutated_frames_decode_or_fail_cleanly(index in 0usize..6, position in any::<prop::sample::Index>(), value in any::<u8>()) {
        let mut frame = encode(&server_messages()[index]).unwrap();
        let at = position.index(frame.len());
        frame[at] = value;
        let mut decoder = FrameDecoder::new(1 << 16);
        decoder.push(&frame);
        let _ = decoder.next_message::<ServerMessage>();
    }
}
