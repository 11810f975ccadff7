//! The fl-server daemon: QUIC connections on a tokio runtime, and one coordinator thread that owns
//! the [`Run`] and is the only place state changes.
//!
//! A connection task speaks the protocol with one device: it checks the Hello, reads update
//! payloads off their streams, decodes and checks them and writes them to a file (all off the
//! coordinator thread, in parallel across clients), then offers the decoded update to the
//! coordinator, which folds it without copying it again and answers once it is durable. The
//! coordinator thread sends tasks, cancellations and the end of the run back through each
//! connection's outbox, and wakes itself for the Coordinator's timers and for the end of a
//! disconnected client's grace period.
//!
//! [`serve`] sets the daemon up (endpoint, admin API, the link of a federation leaf) and waits for
//! the end; `coordinator` is the coordinator thread, `connection` one device's connection, and
//! `split_streams` the split-learning streams on it.

use crate::admin::{AdminQuery, AdminService, BearerToken, RequireToken, proto};
use crate::config::ServerConfig;
use crate::datadir::DataDir;
use crate::files;
use crate::run::{
    Offer, OfferError, Outgoing, ProcessFigures, ReceivedUpdate, Run, RunSummary, SharedBroadcast,
};
use crate::split::{Serving, SplitRun, Taken};
use crate::store::Store;
use anyhow::{Context, Result};
use shoal_aggregators::Event;
use shoal_core::{ClientId, Layout, ModelVersion, TaskId, UpdateMeta};
use shoal_engine::{Contribution, decode_contribution};
use shoal_net::endpoint::{Timeouts, server_endpoint};
use shoal_net::protocol::{
    ClientMessage, ErrorCode, Limits, PROTOCOL_VERSION, RunDescription, ServerMessage, StreamHeader,
};
use shoal_net::stream::{MessageReader, StreamError, read_body, read_header, send_stream, write_message};
use shoal_net::tls::{self, ClientAuth};
use shoal_split::{SplitError, TailSession};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What a connection or the admin API asks of the coordinator thread.
pub(crate) enum Request {
    Hello {
        name: String,
        num_samples: u64,
        holding: Option<TaskId>,
        connection: u64,
        outbox: mpsc::UnboundedSender<ToClient>,
        reply: oneshot::Sender<Result<(ClientId, RunDescription), String>>,
    },
    Update {
        client: ClientId,
        update: ReceivedUpdate,
        incoming: PathBuf,
        reply: oneshot::Sender<UpdateVerdict>,
    },
    Failed {
        client: ClientId,
        task: TaskId,
        reason: String,
    },
    Gone {
        client: ClientId,
        connection: u64,
    },
    Admin(AdminQuery),
    /// A leaf: the top's task and model.
    TopTask {
        task: TaskId,
        version: ModelVersion,
        x: Vec<f32>,
    },
    /// A leaf: the top finished the run at this version.
    TopFinished(ModelVersion),
    Stop,
}

/// The coordinator's answer to an offered update.
pub(crate) enum UpdateVerdict {
    Accepted,
    Refused(String),
    Internal(String),
}

/// What the coordinator thread tells a connection.
pub(crate) enum ToClient {
    Task {
        task: TaskId,
        local_steps: u32,
        seed: u64,
        broadcast: SharedBroadcast,
    },
    Cancel(TaskId),
    Close(ErrorCode, String),
    Finished(ModelVersion),
}

/// What every connection task shares.
/// Handshakes the server carries out at once.
const MAX_HANDSHAKES: usize = 256;

struct Shared {
    requests: std_mpsc::Sender<Request>,
    layout: Arc<Layout>,
    /// Vectors per upload of the rule.
    upload_parts: usize,
    /// A top's leaves: their uploads are partial aggregates.
    leaves: HashSet<String>,
    split: Option<Arc<SplitRun>>,
    state_dir: PathBuf,
    limits: Limits,
    lr: f32,
    codec: String,
    feedback: String,
    allow_anonymous: bool,
    transfer_timeout: Duration,
    /// Memory for payloads being received, across every connection.
    upload_budget: upload_budget::UploadBudget,
    uploads: AtomicU64,
    /// The last version, once the run is finished.
    finished: tokio::sync::watch::Receiver<Option<ModelVersion>>,
    wire_in: AtomicU64,
    wire_out: AtomicU64,
}

/// Runs the server of the data directory until the run finishes (or `stop` resolves); returns the
/// run's summary.
pub fn serve(dir: &DataDir, data_dir: Option<&Path>) -> Result<RunSummary> {
    let config = ServerConfig::load(&dir.config())?;
    let (ca, server_pair) = dir.load_pki()?;
    let run = Run::open(config.clone(), dir.root(), data_dir)?;
    if run.is_finished() {
        tracing::info!("the run in {} is already finished", dir.root().display());
        return Ok(run.summary());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fl-server-io")
        .build()
        .context("starting the async runtime")?;
    let auth = if config.server.allow_anonymous {
        tracing::warn!("allow_anonymous = true: clients without certificates are accepted");
        ClientAuth::Optional
    } else {
        ClientAuth::Required
    };
    let durations = config.server.durations()?;
    let timeouts = Timeouts {
        idle: durations.idle,
        keep_alive: durations.keep_alive,
    };
    let endpoint = runtime.block_on(async {
        server_endpoint(config.server.listen, &ca.cert, &server_pair, auth, timeouts)
            .with_context(|| format!("listening on {}", config.server.listen))
    })?;
    let local = endpoint.local_addr().context("reading the bound address")?;
    tracing::info!(address = %local, version = %run.version(), "fl-server listening");
    // For scripts: the bound address (the configured port may be 0).
    let _ = std::fs::write(dir.root().join("listening"), local.to_string());

    let (requests, inbox) = std_mpsc::channel();
    let (finished_tx, finished_rx) = tokio::sync::watch::channel(None);
    let shared = Arc::new(Shared {
        requests: requests.clone(),
        layout: run.layout(),
        upload_parts: run.upload_parts(),
        leaves: match &config.federation {
            Some(crate::config::FederationConfig::Top { leaves }) => leaves.iter().cloned().collect(),
            _ => HashSet::new(),
        },
        split: run.split().cloned(),
        state_dir: run.state_dir().to_path_buf(),
        limits: Limits {
            max_control_frame: Limits::default().max_control_frame,
            max_payload_bytes: config.server.max_payload_bytes,
            max_split_frame: Limits::default().max_split_frame,
        },
        lr: config.algorithm.local_lr,
        codec: config.codec.to_string(),
        feedback: config.feedback.to_string(),
        allow_anonymous: config.server.allow_anonymous,
        transfer_timeout: durations.transfer,
        upload_budget: upload_budget::UploadBudget::new(config.server.upload_memory_mb),
        uploads: AtomicU64::new(0),
        finished: finished_rx,
        wire_in: AtomicU64::new(0),
        wire_out: AtomicU64::new(0),
    });
    let grace = durations.reconnect_grace;
    let (metrics_tx, _) = tokio::sync::broadcast::channel(64);
    let admin_listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.server.admin))
        .with_context(|| format!("admin API on {}", config.server.admin))?;
    let admin_address = admin_listener.local_addr()?;
    let _ = std::fs::write(dir.root().join("admin-listening"), admin_address.to_string());
    tracing::info!(address = %admin_address, "admin API listening");
    let token = RequireToken(BearerToken::new(&dir.admin_token()?)?);
    let admin = runtime.spawn({
        let service = AdminService::new(requests.clone(), metrics_tx.clone());
        async move {
            let incoming =
                tonic::transport::server::TcpIncoming::from(admin_listener).with_nodelay(Some(true));
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(proto::admin_server::AdminServer::with_interceptor(service, token))
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!(error = %e, "the admin API stopped");
            }
        }
    });
    // A leaf: the link to the top, fed with the partials the coordinator thread owes.
    let (to_top, owed) = mpsc::unbounded_channel();
    let top_link = match &config.federation {
        Some(federation) => crate::federation::TopLink::load(federation, dir.root(), run.description())?,
        None => None,
    };
    let link = top_link.map(|link| {
        tracing::info!(top = %link.top, name = link.name, "leaf of a federation");
        let requests = requests.clone();
        runtime.spawn(async move {
            if let Err(e) = crate::federation::run_link(link, requests.clone(), owed).await {
                tracing::error!(error = %format!("{e:#}"), "the link to the top failed; stopping");
                let _ = requests.send(Request::Stop);
            }
        })
    });
    let coordinator = std::thread::Builder::new()
        .name("fl-server-coordinator".into())
        .spawn(move || coordinate(run, inbox, grace, finished_tx, metrics_tx, to_top))
        .context("starting the coordinator thread")?;

    runtime.block_on(async {
        let accept = {
            let endpoint = endpoint.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                // Handshakes in progress at once: past the cap a new attempt is refused at once, so
                // a burst of handshakes (each costs the server a TLS key exchange) cannot pile up.
                let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
                while let Some(incoming) = endpoint.accept().await {
                    match handshakes.clone().try_acquire_owned() {
                        Ok(handshake) => {
                            tokio::spawn(serve_connection(incoming, handshake, shared.clone()));
                        }
                        Err(_) => {
                            tracing::warn!(remote = %incoming.remote_address(), "too many handshakes at once; refused");
                            incoming.refuse();
                        }
                    }
                }
            })
        };
        let mut finished = shared.finished.clone();
        tokio::select! {
            _ = finished.wait_for(Option::is_some) => {
                // Let connections deliver the end of the run before closing the endpoint.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ = shutdown_signal() => {
                tracing::info!("stopping on a signal; the run resumes at the next start");
                let _ = requests.send(Request::Stop);
            }
        }
        endpoint.close(0u32.into(), b"server stopping");
        accept.abort();
        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
            .await
            .ok();
    });
    admin.abort();
    if let Some(link) = link {
        link.abort();
    }
    drop(requests);
    let (mut summary, busy, summary_path, finished) = coordinator
        .join()
        .map_err(|_| anyhow::anyhow!("the coordinator thread panicked"))??;
    runtime.shutdown_timeout(Duration::from_secs(1));
    summary.process = Some(ProcessFigures {
        wire_bytes_in: shared.wire_in.load(Ordering::Relaxed),
        wire_bytes_out: shared.wire_out.load(Ordering::Relaxed),
        coordinator_busy_s: busy.as_secs_f64(),
        cpu_time_s: shoal_core::usage::cpu_time_s(),
        peak_memory_bytes: shoal_core::usage::peak_memory_bytes(),
    });
    if finished {
        std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", summary_path.display()))?;
    }
    Ok(summary)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Why a connection is closed.
struct Fatal(ErrorCode, String);

impl From<StreamError> for Fatal {
    fn from(e: StreamError) -> Self {
        let code = match &e {
            StreamError::TooLarge { .. }
            | StreamError::Frame(shoal_net::framing::FrameError::TooLarge { .. }) => ErrorCode::TooLarge,
            // A peer that resets its own stream abandons what it was sending: a bad upload.
            StreamError::Frame(_)
            | StreamError::Truncated { .. }
            | StreamError::TrailingBytes { .. }
            | StreamError::Read(quinn::ReadError::Reset(_)) => ErrorCode::Malformed,
            // The transport failed (the connection was lost): nobody's fault.
            _ => ErrorCode::Internal,
        };
        Fatal(code, e.to_string())
    }
}

mod absences;
mod connection;
mod coordinator;
mod split_streams;
mod upload_budget;

use connection::serve_connection;
use coordinator::coordinate;
