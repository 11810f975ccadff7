//! fl-server and fl-client as real processes on loopback, with mutual TLS and MNIST partitions:
//! the local-federation example end to end, the admin API, clients that are refused (no valid
//! certificate), disconnected (truncated, oversized, corrupted uploads) or have their task failed
//! (an upload for a task never assigned) while the rounds complete with the others; split
//! learning: three split clients with and without pipelining, and bad split streams reset or
//! disconnected; and hierarchical aggregation: a top and two leaf fl-servers whose versions equal
//! the flat aggregation of every client's update. Servers killed with SIGKILL are in `kill.rs`.

// Helpers outside #[test] functions unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use shoal_core::{ClientId, ModelVersion, TaskId, UpdateMeta};
use shoal_net::endpoint::{Timeouts, client_endpoint};
use shoal_net::protocol::{
    Capabilities, ClientMessage, DeclaredProfile, ErrorCode, PROTOCOL_VERSION, ServerMessage, StreamHeader,
};
use shoal_net::stream::{MessageReader, send_stream, write_message};
use shoal_net::tls::{self, PemPair};
use shoal_server::admin::proto::{ExportModelRequest, PauseRequest, StatusRequest};
use shoal_server::config::ServerConfig;
use shoal_server::datadir::DataDir;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// Runs examples/local-federation.sh with `args` into a fresh folder; its summary.json.
fn local_federation(args: &[&str]) -> (serde_json::Value, tempfile::TempDir) {
    run_example("local-federation.sh", args, "logs/server.log")
}

/// Runs `examples/SCRIPT` with `args` into a fresh folder; its summary.json (on failure, the tail
/// of `log` under the folder is shown).
fn run_example(script: &str, args: &[&str], log: &str) -> (serde_json::Value, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(repo_root().join("examples").join(script))
        .args(args)
        .arg("--out")
        .arg(out.path())
        .arg("--data-dir")
        .arg(data_root())
        .arg("--bin-dir")
        .arg(bin_dir())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "the example failed:\n{}\n{}",
        String::from_utf8_lossy(&status.stderr),
        tail(&out.path().join(log))
    );
    let summary =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap()).unwrap();
    (summary, out)
}

/// The fields every deployment example's summary.json has.
fn assert_deployment_summary(summary: &serde_json::Value) {
    for key in [
        "rounds",
        "initial_accuracy",
        "final_accuracy",
        "bytes_up",
        "bytes_down",
        "wall_time_s",
        "deployment_wall_s",
        "clients",
        "runtime",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}: {summary}");
    }
}

#[test]
fn the_local_federation_example_trains_mnist_over_mutual_tls() {
    let (summary, out) = local_federation(&["--clients", "5", "--rounds", "3", "--timeout", "300"]);
    assert_deployment_summary(&summary);
    assert_eq!(summary["rounds"], 3);
    // The runtime folded the 15 updates in three aggregations and reused warm instances.
    let runtime = &summary["runtime"];
    assert_eq!(
        (runtime["folds"].as_u64(), runtime["aggregations"].as_u64()),
        (Some(15), Some(3))
    );
    assert!(runtime["warm_reuses"].as_u64().unwrap() > 0, "{runtime}");
    let initial = summary["initial_accuracy"].as_f64().unwrap();
    let last = summary["final_accuracy"].as_f64().unwrap();
    assert!(last > initial + 0.5 && last > 0.85, "accuracy {initial} → {last}");
    assert!(summary["bytes_up"].as_u64().unwrap() > 0 && summary["bytes_down"].as_u64().unwrap() > 0);

    // The state directory holds every version, and each folded the 5 clients' updates.
    let server = out.path().join("server");
    for v in 0..=3 {
        assert!(
            server.join(format!("state/versions/v{v:08}.bin")).is_file(),
            "version {v} is not stored"
        );
    }
    let (versions, tasks) = folded_tasks(&server);
    assert_eq!(versions, (0..=3).map(ModelVersion).collect::<Vec<_>>());
    assert_eq!(tasks.len(), 15);
    assert!(tasks.values().all(|v| v.len() == 1));
    // Every client exited cleanly when the run finished.
    for i in 0..5 {
        let log = std::fs::read_to_string(out.path().join(format!("logs/client-{i}.log"))).unwrap();
        assert!(log.contains("the run is finished"), "client {i}:\n{log}");
    }
}

/// `local-federation.sh --config FILE` deploys an fl-sim experiment: the server takes its method
/// (here FedAvg with top-k and error feedback), each client its share of the partition, and with
/// every client in every round the processes compute what fl-sim computes.
#[test]
fn the_local_federation_example_deploys_an_experiment_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fedavg-topk-ef.toml");
    std::fs::write(
        &file,
        r#"seed = 5
codec = "topk(0.1)"
feedback = "ef"

[data]
dataset = "synthetic"
partition = { kind = "iid", num_clients = 3 }

[model]
name = "mlp"
batch_size = 10

[algorithm]
local_steps = 5
local_lr = 0.05

[algorithm.rule]
rule = "fedavg"

[algorithm.scheduler]
scheduler = "sync"
clients_per_round = 3

[stop]
rounds = 2
"#,
    )
    .unwrap();
    let (summary, _out) = local_federation(&[
        "--config",
        file.to_str().unwrap(),
        "--rounds",
        "2",
        "--timeout",
        "120",
    ]);
    assert_deployment_summary(&summary);
    assert_eq!(summary["clients"], 3, "the clients a round of the file needs");
    assert_eq!(
        (summary["codec"].as_str(), summary["feedback"].as_str()),
        (Some("topk(0.1)"), Some("ef"))
    );
    let experiment = shoal_sim::experiment::ExperimentConfig::load(&file).unwrap();
    let simulated = shoal_sim::experiment::run(&experiment, None, &mut shoal_sim::experiment::Quiet).unwrap();
    let sim = &simulated.summary.totals;
    assert_eq!(summary["rounds"].as_u64(), Some(sim.rounds));
    assert_eq!(summary["updates_folded"].as_u64(), Some(sim.updates_folded));
    assert_eq!(
        summary["bytes_up"].as_u64(),
        Some(sim.bytes_up),
        "the same payloads"
    );
    let (deployed, simulated) = (
        summary["final_accuracy"].as_f64().unwrap(),
        sim.final_accuracy.unwrap(),
    );
    assert!(
        (deployed - simulated).abs() < 1e-9,
        "final accuracy {deployed} vs fl-sim's {simulated}"
    );
}

#[test]
fn hierarchical_aggregation_across_three_processes_equals_flat_aggregation() {
    // A random tree: a top and two leaf fl-servers with 1–3 clients each.
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let shares: Vec<usize> = (0..2).map(|_| rng.random_range(1..=3)).collect();
    let clients: usize = shares.iter().sum();
    let arg = format!("{},{}", shares[0], shares[1]);
    let (summary, out) = run_example(
        "hierarchical-federation.sh",
        &["--leaf-clients", &arg, "--rounds", "2", "--timeout", "300"],
        "logs/top.log",
    );
    // The same summary as a flat deployment's, and the tree's shape.
    assert_deployment_summary(&summary);
    assert_eq!(summary["rounds"], 2);
    assert_eq!(summary["clients"], clients as u64);
    assert_eq!(summary["leaves"], 2);
    let initial = summary["initial_accuracy"].as_f64().unwrap();
    let last = summary["final_accuracy"].as_f64().unwrap();
    assert!(last > initial + 0.4, "accuracy {initial} → {last}");
    // Each version: every client's update folded flat equals what the top committed, and the f64
    // sums the top merged from the two partials equal the flat sums.
    for v in 1..=2 {
        let audit: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join(format!("logs/audit-{v}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(audit["ok"], true, "{audit}");
        assert_eq!(audit["updates"], clients as u64, "{audit}");
        assert!(audit["max_abs_diff"].as_f64().unwrap() <= 1e-6, "{audit}");
        assert!(audit["sums_max_rel_diff"].as_f64().unwrap() <= 1e-9, "{audit}");
    }
    assert!(summary["flat_max_abs_diff"].as_f64().unwrap() <= 1e-6);
    // The top merged two partials per round on its runtime and folded no client update itself.
    assert_eq!(summary["runtime"]["merges"], 4, "{summary}");
    assert_eq!(summary["runtime"]["folds"], 0, "{summary}");
    // Each leaf folded its own clients' updates, and every client exited when the run finished.
    for (l, share) in shares.iter().enumerate() {
        let kept = out.path().join(format!("leaf-{l}/state/folded/1/index.json"));
        let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kept).unwrap()).unwrap();
        assert_eq!(index.as_array().unwrap().len(), *share);
    }
    for i in 0..clients {
        let log = std::fs::read_to_string(out.path().join(format!("logs/client-{i}.log"))).unwrap();
        assert!(log.contains("the run is finished"), "client {i}:\n{log}");
    }
}

#[test]
fn split_clients_train_the_head_while_the_server_trains_the_tail_over_quic() {
    for pipeline in [1, 4] {
        let pipeline_arg = pipeline.to_string();
        let (summary, out) = local_federation(&[
            "--split",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--timeout",
            "400",
            "--pipeline",
            &pipeline_arg,
        ]);
        assert_eq!(summary["rounds"], 2, "{summary}");
        assert_eq!(summary["pipeline"], pipeline);
        let initial = summary["initial_accuracy"].as_f64().unwrap();
        let last = summary["final_accuracy"].as_f64().unwrap();
        assert!(
            last > initial + 0.3,
            "pipeline {pipeline}: accuracy {initial} → {last}"
        );
        // 3 clients × 2 rounds × 40 minibatches of 32 went through the server's tails.
        let split = &summary["split"];
        assert_eq!(split["steps"], 240, "{summary}");
        assert_eq!(split["samples"], 240 * 32);
        // 14 × 14 × 4 bottleneck levels per sample, zstd'd, under the raw image's 784 bytes.
        let up = split["bytes_up_per_sample"].as_f64().unwrap();
        assert!((100.0..784.0).contains(&up), "{up} B/sample up");
        assert!(
            summary["split_samples_per_s"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
        // The devices upload only their heads: a few kB per round, not the model.
        assert!(summary["bytes_up"].as_u64().unwrap() < 6 * 16_000, "{summary}");
        for i in 0..3 {
            let log = std::fs::read_to_string(out.path().join(format!("logs/client-{i}.log"))).unwrap();
            assert!(
                log.contains("split steps done") && log.contains("the run is finished"),
                "client {i}:\n{log}"
            );
        }
    }
}

/// Connects as `identity` and says Hello (able to run split heads); the endpoint, the
/// connection, and the control stream's two halves.
async fn connect_by_hand(
    address: SocketAddr,
    ca: &str,
    identity: &PemPair,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    MessageReader,
) {
    let endpoint = client_endpoint(ca, Some(identity), Timeouts::default(), address).unwrap();
    let conn = endpoint.connect(address, "localhost").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write_message(
        &mut send,
        &ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: "ignored".into(),
            capabilities: Capabilities {
                codecs: vec!["any".into()],
                split: true,
            },
            profile: DeclaredProfile {
                num_samples: 100,
                step_time_s: None,
                up_mbit_s: None,
                down_mbit_s: None,
            },
            holding: None,
        },
    )
    .await
    .unwrap();
    (endpoint, conn, send, MessageReader::new(recv, 1 << 20))
}

/// The code the server closed `conn` with. Under load the close frame may lose the race with the
/// server forgetting the connection; the end is then a stateless reset, or — when the client's
/// keep-alives are too small to draw a reset — its idle timeout (`None` for both).
async fn close_code(conn: &quinn::Connection) -> Option<u64> {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        quinn::ConnectionError::Reset | quinn::ConnectionError::TimedOut => None,
        other => panic!("expected the server to close the connection, got {other}"),
    }
}

/// The client id the server welcomed this connection with, and the first task it sent.
async fn first_task(reader: &mut MessageReader) -> (ClientId, TaskId, ModelVersion) {
    let mut client = None;
    loop {
        match reader.next_message::<ServerMessage>().await.unwrap().unwrap() {
            ServerMessage::Welcome { client: c, .. } => client = Some(c),
            ServerMessage::Task { task, version, .. } => return (client.unwrap(), task, version),
            _ => {}
        }
    }
}

/// What a hand-made upload for `task` says about itself.
fn update_meta(client: ClientId, task: TaskId, base_version: ModelVersion) -> UpdateMeta {
    UpdateMeta {
        client,
        task,
        base_version,
        num_samples: 100,
        local_steps: 1,
        loss: 0.0,
        duration_s: 0.1,
    }
}

enum Misbehaviour {
    Corrupted,
    Truncated,
    Oversized,
}

/// Connects as `identity`, waits for a task, sends a bad upload for it, and returns the error code
/// the server sent and the code it closed the connection with (`None`: ended by a reset).
async fn bad_upload(
    address: SocketAddr,
    ca: &str,
    identity: &PemPair,
    how: Misbehaviour,
) -> (ErrorCode, Option<u64>) {
    let (endpoint, conn, mut send, mut reader) = connect_by_hand(address, ca, identity).await;
    let (client, task, version) = first_task(&mut reader).await;
    let meta = |task: TaskId| update_meta(client, task, version);
    let (announced, sent): (u64, Vec<u8>) = match how {
        Misbehaviour::Corrupted => (4000, vec![0xAB; 4000]),
        Misbehaviour::Truncated => (4000, vec![0; 1000]),
        Misbehaviour::Oversized => (3 << 30, Vec::new()),
    };
    write_message(
        &mut send,
        &ClientMessage::UpdateReady {
            meta: meta(task),
            payload_bytes: announced,
        },
    )
    .await
    .unwrap();
    let header = StreamHeader::Update {
        task,
        part_bytes: vec![announced],
    };
    let _ = send_stream(&conn, &header, &[&sent]).await;
    let code = loop {
        match reader.next_message::<ServerMessage>().await {
            Ok(Some(ServerMessage::Error { code, .. })) => break code,
            Ok(Some(_)) => continue,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    let closed = close_code(&conn).await;
    endpoint.close(0u32.into(), b"");
    (code, closed)
}

/// Connects as `identity`, waits for a task, and uploads a well-formed update for a task id the
/// server never assigned. Returns the error code of the refusal, whether the server cancelled
/// the real task, and whether the connection stayed open.
async fn forged_upload(
    address: SocketAddr,
    ca: &str,
    identity: &PemPair,
    layout: &shoal_core::Layout,
) -> (ErrorCode, bool) {
    let (endpoint, conn, mut send, mut reader) = connect_by_hand(address, ca, identity).await;
    let (client, task, version) = first_task(&mut reader).await;
    let forged = TaskId(task.0 + 1_000_000);
    let payload = shoal_compression::encode(
        &shoal_compression::CodecSpec::identity(),
        layout,
        &vec![0.0; layout.len()],
        0,
    )
    .unwrap();
    let meta = update_meta(client, forged, version);
    write_message(
        &mut send,
        &ClientMessage::UpdateReady {
            meta,
            payload_bytes: payload.len() as u64,
        },
    )
    .await
    .unwrap();
    let header = StreamHeader::Update {
        task: forged,
        part_bytes: vec![payload.len() as u64],
    };
    send_stream(&conn, &header, &[&payload]).await.unwrap();
    let (mut code, mut cancelled) = (None, false);
    let answers = async {
        while code.is_none() || !cancelled {
            match reader.next_message::<ServerMessage>().await {
                Ok(Some(ServerMessage::Error { code: c, .. })) => code = Some(c),
                Ok(Some(ServerMessage::Cancel { task: t })) => cancelled |= t == task,
                Ok(Some(_)) => continue,
                other => panic!("expected a refusal and a cancellation, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), answers)
        .await
        .expect("the server refuses the forged upload and cancels the real task");
    let open = conn.close_reason().is_none();
    endpoint.close(0u32.into(), b"");
    (code.unwrap(), open)
}

/// Whether a connection with these credentials is refused.
async fn refused(address: SocketAddr, ca: &str, identity: Option<&PemPair>) -> bool {
    let endpoint = client_endpoint(ca, identity, Timeouts::default(), address).unwrap();
    let refused = match endpoint.connect(address, "localhost").unwrap().await {
        Err(_) => true,
        Ok(conn) => match conn.open_bi().await {
            Err(_) => true,
            Ok((mut send, recv)) => {
                let _ = write_message(&mut send, &ClientMessage::Bye).await;
                let mut reader = MessageReader::new(recv, 1 << 20);
                reader.next_message::<ServerMessage>().await.is_err()
            }
        },
    };
    endpoint.close(0u32.into(), b"");
    refused
}

#[test]
fn bad_clients_are_refused_or_disconnected_and_the_rounds_complete_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // The template's 30 s grace: on a loaded machine the rogue's next connection may take seconds,
    // and it must still find its client registered (and a task waiting) when it comes back.
    // Four rounds: the rogue takes a task in each and misbehaves four ways. It is not evicted
    // before the last, so it stays registered (and the rounds wait for its task) throughout.
    init_run(dir, 3, |text| {
        text.replace("clients_per_round = 5", "clients_per_round = 3")
            .replace("every = 1", "every = 4")
            .replace("rounds = 3 ", "rounds = 4 ")
            .replace("evict_after_failures = 3 ", "evict_after_failures = 5 ")
    });
    let (mut server, address) = start_server(dir, 1);
    let address: SocketAddr = address.trim().parse().unwrap();
    let ca = std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap();
    let rogue_dir = dir.join("clients/device-2");
    let rogue = tls::read_pem_pair(&rogue_dir.join("client.pem"), &rogue_dir.join("client.key")).unwrap();
    let stranger = tls::issue(
        &tls::generate_ca("another CA").unwrap(),
        tls::Leaf::Client { name: "device-2" },
    )
    .unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // The admin API answers on its own (loopback) address, to calls with the data
        // directory's token only.
        let admin_address = std::fs::read_to_string(dir.join("admin-listening")).unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", admin_address.trim()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut anonymous = shoal_server::admin::proto::admin_client::AdminClient::new(channel.clone());
        let without_token = anonymous.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(
            without_token.code(),
            tonic::Code::Unauthenticated,
            "{without_token}"
        );
        let mut forged = shoal_server::admin::proto::admin_client::AdminClient::with_interceptor(
            channel,
            shoal_server::admin::BearerToken::new("0123456789abcdef").unwrap(),
        );
        let wrong_token = forged.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(wrong_token.code(), tonic::Code::Unauthenticated, "{wrong_token}");
        let mut admin = shoal_server::admin::connect(&DataDir::new(dir)).await.unwrap();
        let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(
            (status.version, status.connected_clients, status.paused),
            (0, 0, false)
        );
        assert_eq!(status.target_rounds, Some(4));
        // The runtime's figures: nothing aggregated yet, no instance started.
        let runtime = status.runtime.unwrap();
        assert_eq!(
            (runtime.aggregations, runtime.instances, runtime.queue_depth),
            (0, 0, 0)
        );
        assert!(admin.pause(PauseRequest {}).await.unwrap().into_inner().paused);
        assert!(!admin.resume(PauseRequest {}).await.unwrap().into_inner().paused);
        let mut chunks = admin
            .export_model(ExportModelRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut values = 0;
        while let Some(chunk) = chunks.message().await.unwrap() {
            assert_eq!(chunk.offset, values);
            values += chunk.values.len() as u64 / 4;
            assert_eq!(chunk.dim, 199_210, "the 2NN on MNIST");
        }
        assert_eq!(values, 199_210);
        assert!(
            refused(address, &ca, None).await,
            "a client without a certificate is refused"
        );
        assert!(
            refused(address, &ca, Some(&stranger)).await,
            "a certificate of another CA is refused"
        );
    });
    let mut honest: Vec<Process> = (0..2)
        .map(|i| start_client(dir, &address.to_string(), i, 2))
        .collect();
    let config = ServerConfig::load(&dir.join("server.toml")).unwrap();
    let (shape, classes) = config.data.dataset.shape(&config.data.synthetic);
    let model = config.model.build(&shape, classes).unwrap();
    runtime.block_on(async {
        // A well-formed upload naming a task never assigned is refused, and the forger's real task
        // fails at once (it cannot hold its round with forgeries); the connection lives on.
        let (code, open) = forged_upload(address, &ca, &rogue, model.layout()).await;
        assert_eq!(code, ErrorCode::UnknownTask);
        assert!(open, "a refused upload does not close the connection");
        for (how, expected) in [
            (Misbehaviour::Corrupted, ErrorCode::Malformed),
            (Misbehaviour::Truncated, ErrorCode::Malformed),
            (Misbehaviour::Oversized, ErrorCode::TooLarge),
        ] {
            let (code, closed) = bad_upload(address, &ca, &rogue, how).await;
            assert_eq!(code, expected);
            if let Some(closed) = closed {
                assert_eq!(closed, u64::from(expected.close_code()));
            }
        }
    });
    let status = server.wait_for_exit(Duration::from_secs(180));
    assert!(status.success(), "{}", tail(&server.log));
    for device in &mut honest {
        assert!(
            device.wait_for_exit(Duration::from_secs(60)).success(),
            "{}",
            tail(&device.log)
        );
    }
    let (versions, folded) = folded_tasks(dir);
    assert_eq!(versions.last(), Some(&ModelVersion(4)));
    assert_eq!(
        folded.len(),
        8,
        "each round folded the two honest updates: {folded:?}"
    );
}

/// Connects to a split server as `identity` and waits for its task; then, on split streams: one
/// for a task it does not hold (reset, the connection lives on), one for its own task whose first
/// frame is not a cut message. Returns whether the first stream was reset and the code the
/// connection was closed with (`None`: ended by a stateless reset).
async fn bad_split_streams(address: SocketAddr, ca: &str, identity: &PemPair) -> (bool, Option<u64>) {
    let (endpoint, conn, _send, mut reader) = connect_by_hand(address, ca, identity).await;
    let task = loop {
        match reader.next_message::<ServerMessage>().await.unwrap().unwrap() {
            ServerMessage::Welcome { run, .. } => assert!(run.split_json.is_some(), "a split run"),
            ServerMessage::Task { task, .. } => break task,
            _ => {}
        }
    };
    // A task it does not hold: that stream is reset.
    let (mut other_send, other_recv) = conn.open_bi().await.unwrap();
    write_message(
        &mut other_send,
        &StreamHeader::Split {
            task: TaskId(task.0 + 1000),
        },
    )
    .await
    .unwrap();
    let mut other = MessageReader::new(other_recv, 1 << 20);
    let reset = matches!(
        other.next_message::<Vec<u8>>().await,
        Err(shoal_net::stream::StreamError::Read(quinn::ReadError::Reset(_)))
    );
    // Its own task, with a frame that is no cut message: the connection is closed.
    let (mut split_send, _split_recv) = conn.open_bi().await.unwrap();
    write_message(&mut split_send, &StreamHeader::Split { task })
        .await
        .unwrap();
    write_message(&mut split_send, &vec![0xABu8; 3000]).await.unwrap();
    let closed = close_code(&conn).await;
    endpoint.close(0u32.into(), b"");
    (reset, closed)
}

#[test]
fn bad_split_streams_are_reset_or_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    init_run(dir, 1, |text| {
        let split = text.find("# [split]").unwrap();
        let (head, tail) = text.split_at(split);
        let tail: String = tail
            .lines()
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        format!("{head}{tail}")
            .replace("name = \"mlp\"", "name = \"cnn\"")
            .replace("clients_per_round = 5", "clients_per_round = 1")
            .replace("enabled = true", "enabled = false")
    });
    let (mut server, address) = start_server(dir, 1);
    let address: SocketAddr = address.trim().parse().unwrap();
    let ca = std::fs::read_to_string(dir.join("tls/ca.pem")).unwrap();
    let rogue_dir = dir.join("clients/device-0");
    let rogue = tls::read_pem_pair(&rogue_dir.join("client.pem"), &rogue_dir.join("client.key")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (reset, closed) = runtime.block_on(bad_split_streams(address, &ca, &rogue));
    assert!(
        reset,
        "a split stream for a task the client does not hold is reset"
    );
    if let Some(code) = closed {
        assert_eq!(code, u64::from(ErrorCode::Malformed.close_code()));
    }
    let log = tail(&server.log);
    assert!(log.contains("split stream refused"), "{log}");
    assert!(log.contains("closing a connection for its split stream"), "{log}");
    let _ = server.child.kill();
}
