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

use crate::admin::{AdminQuery, AdminService, proto};
use crate::config::ServerConfig;
use crate::datadir::DataDir;
use crate::files;
use crate::run::{Offer, Outgoing, ProcessFigures, ReceivedUpdate, Run, RunSummary, SharedBroadcast};
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
    let timeouts = Timeouts {
        idle: Duration::from_secs_f64(config.server.idle_timeout_s),
        keep_alive: Duration::from_secs_f64((config.server.idle_timeout_s / 4.0).max(0.5)),
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
        transfer_timeout: Duration::from_secs_f64(config.server.transfer_timeout_s),
        uploads: AtomicU64::new(0),
        finished: finished_rx,
        wire_in: AtomicU64::new(0),
        wire_out: AtomicU64::new(0),
    });
    let grace = Duration::from_secs_f64(config.server.reconnect_grace_s);
    let (metrics_tx, _) = tokio::sync::broadcast::channel(64);
    let admin_listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.server.admin))
        .with_context(|| format!("admin API on {}", config.server.admin))?;
    let admin_address = admin_listener.local_addr()?;
    let _ = std::fs::write(dir.root().join("admin-listening"), admin_address.to_string());
    tracing::info!(address = %admin_address, "admin API listening");
    let admin = runtime.spawn({
        let service = AdminService::new(requests.clone(), metrics_tx.clone());
        async move {
            let incoming =
                tonic::transport::server::TcpIncoming::from(admin_listener).with_nodelay(Some(true));
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(proto::admin_server::AdminServer::new(service))
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
                while let Some(incoming) = endpoint.accept().await {
                    tokio::spawn(serve_connection(incoming, shared.clone()));
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

/// A connected client as the coordinator thread knows it.
struct Connected {
    connection: u64,
    outbox: mpsc::UnboundedSender<ToClient>,
}

/// The coordinator thread: owns the run, serves requests, fires timers.
fn coordinate(
    mut run: Run,
    inbox: std_mpsc::Receiver<Request>,
    grace: Duration,
    finished: tokio::sync::watch::Sender<Option<ModelVersion>>,
    metrics: tokio::sync::broadcast::Sender<crate::run::VersionMetrics>,
    to_top: mpsc::UnboundedSender<crate::run::LeafUpload>,
) -> Result<(RunSummary, Duration, PathBuf, bool)> {
    let mut busy = Duration::ZERO;
    let mut pause = Pause::default();
    let mut connected: HashMap<ClientId, Connected> = HashMap::new();
    // Registered clients without a connection, and when they count as gone.
    let mut away: HashMap<ClientId, Instant> = HashMap::new();
    // Clients the Coordinator still knows from the log: they have one grace period to come back.
    let started = Instant::now();
    for (client, _) in run.coordinator().clients() {
        away.insert(client, started + grace);
    }
    loop {
        let now = Instant::now();
        let timer = run.next_wakeup().map(|at| {
            let wait = at.as_micros().saturating_sub(run.now().as_micros());
            now + Duration::from_micros(wait)
        });
        let deadline = away.values().copied().chain(timer).min();
        let request = match deadline {
            Some(d) => match inbox.recv_timeout(d.saturating_duration_since(now)) {
                Ok(r) => Some(r),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match inbox.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            },
        };
        let handling = Instant::now();
        let mut outgoing = Vec::new();
        match request {
            Some(Request::Stop) => break,
            Some(Request::Admin(query)) => answer(&mut run, query, &connected, &mut pause, &mut outgoing),
            Some(Request::TopTask { task, version, x }) => run.top_task(task, version, x)?,
            Some(Request::TopFinished(version)) => run.top_finished(version)?,
            Some(request) => {
                handle_request(&mut run, request, grace, &mut connected, &mut away, &mut outgoing)?;
            }
            None => {}
        }
        // Timers and grace periods that are due.
        let now = Instant::now();
        let gone: Vec<ClientId> = away.iter().filter(|(_, d)| **d <= now).map(|(c, _)| *c).collect();
        for client in gone {
            away.remove(&client);
            if run.is_registered(client) {
                tracing::info!(%client, "did not come back; its task is lost");
                outgoing.extend(run.handle(Event::Left { client })?);
            }
        }
        if run.next_wakeup().is_some_and(|at| at <= run.now()) {
            outgoing.extend(run.handle(Event::Timer)?);
        }
        outgoing.extend(pause.release(&run));
        pause.dispatch(&mut run, outgoing, &mut connected);
        for upload in run.take_leaf_uploads() {
            let _ = to_top.send(upload);
        }
        for m in run.take_committed() {
            let _ = metrics.send(m);
        }
        busy += handling.elapsed();
        if run.is_finished() {
            let version = run.version();
            for c in connected.values() {
                let _ = c.outbox.send(ToClient::Finished(version));
            }
            let _ = finished.send(Some(version));
            break;
        }
    }
    run.flush()?;
    Ok((
        run.summary(),
        busy,
        run.summary_path().to_path_buf(),
        run.is_finished(),
    ))
}

fn handle_request(
    run: &mut Run,
    request: Request,
    grace: Duration,
    connected: &mut HashMap<ClientId, Connected>,
    away: &mut HashMap<ClientId, Instant>,
    outgoing: &mut Vec<Outgoing>,
) -> Result<()> {
    match request {
        Request::Hello {
            name,
            num_samples,
            holding,
            connection,
            outbox,
            reply,
        } => {
            let client = match run.client_id(&name) {
                Ok(c) => c,
                Err(e) => {
                    let _ = reply.send(Err(format!("{e:#}")));
                    return Ok(());
                }
            };
            if let Some(previous) = connected.insert(client, Connected { connection, outbox }) {
                let _ = previous.outbox.send(ToClient::Close(
                    ErrorCode::Unexpected,
                    "replaced by a newer connection".into(),
                ));
            }
            away.remove(&client);
            let _ = reply.send(Ok((client, run.description())));
            if run.is_finished() {
                return Ok(());
            }
            if !run.is_registered(client) {
                tracing::info!(%client, name, num_samples, "joined");
                outgoing.extend(run.handle(Event::Joined { client, num_samples })?);
            } else if let Some(record) = run.running_task_of(client) {
                tracing::info!(%client, name, task = %record.task, "reconnected");
                if holding != Some(record.task) {
                    if record.version == run.version() {
                        outgoing.push(Outgoing::Task {
                            client,
                            task: record.task,
                            version: record.version,
                            local_steps: record.local_steps,
                            seed: record.seed,
                        });
                    } else {
                        // Its broadcast is gone: the task is lost and the scheduler moves on.
                        outgoing.extend(run.handle(Event::TaskFailed { task: record.task })?);
                    }
                }
            }
        }
        Request::Update {
            client,
            update,
            incoming,
            reply,
        } => {
            let task = update.meta.task;
            let verdict = if update.meta.client != client {
                let _ = std::fs::remove_file(&incoming);
                UpdateVerdict::Refused(format!("{task} is not this client's"))
            } else {
                match run.offer_update(update, &incoming) {
                    Ok(Offer::Accepted(out)) => {
                        outgoing.extend(out);
                        UpdateVerdict::Accepted
                    }
                    Ok(Offer::Duplicate) => UpdateVerdict::Accepted,
                    Ok(Offer::Refused(e)) => UpdateVerdict::Refused(e.to_string()),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), %task, "could not store an update");
                        UpdateVerdict::Internal(format!("{e:#}"))
                    }
                }
            };
            let _ = reply.send(verdict);
        }
        Request::Failed { client, task, reason } => {
            if run
                .coordinator()
                .running_task(task)
                .is_some_and(|r| r.client == client)
            {
                tracing::info!(%client, %task, reason, "task failed");
                outgoing.extend(run.handle(Event::TaskFailed { task })?);
            }
        }
        Request::Gone { client, connection } => {
            if connected.get(&client).is_some_and(|c| c.connection == connection) {
                connected.remove(&client);
                if run.is_registered(client) {
                    away.insert(client, Instant::now() + grace);
                }
            }
        }
        // Answered by the coordinator loop itself.
        Request::Admin(_) | Request::TopTask { .. } | Request::TopFinished(_) | Request::Stop => {}
    }
    Ok(())
}

/// Whether tasks are being held back (the admin API's pause, or a leaf waiting for its top), and
/// the held ones.
#[derive(Default)]
struct Pause {
    paused: bool,
    held: Vec<Outgoing>,
}

impl Pause {
    /// The held tasks that may go now (none while paused or while the run holds tasks), without
    /// those the Coordinator no longer runs.
    fn release(&mut self, run: &Run) -> Vec<Outgoing> {
        if self.paused || run.holds_tasks() {
            return Vec::new();
        }
        std::mem::take(&mut self.held)
            .into_iter()
            .filter(|o| match o {
                Outgoing::Task { task, .. } => run.coordinator().running_task(*task).is_some(),
                _ => true,
            })
            .collect()
    }

    /// Dispatches `outgoing`, holding tasks back while paused or while the run holds them.
    fn dispatch(
        &mut self,
        run: &mut Run,
        outgoing: Vec<Outgoing>,
        connected: &mut HashMap<ClientId, Connected>,
    ) {
        let (tasks, others): (Vec<Outgoing>, Vec<Outgoing>) = outgoing
            .into_iter()
            .partition(|o| matches!(o, Outgoing::Task { .. }));
        if self.paused || run.holds_tasks() {
            self.held.extend(tasks);
            dispatch(run, others, connected);
        } else {
            dispatch(run, tasks.into_iter().chain(others).collect(), connected);
        }
    }
}

/// Answers an admin query.
fn answer(
    run: &mut Run,
    query: AdminQuery,
    connected: &HashMap<ClientId, Connected>,
    pause: &mut Pause,
    outgoing: &mut Vec<Outgoing>,
) {
    match query {
        AdminQuery::Status(reply) => {
            let summary = run.summary();
            let coordinator = run.coordinator();
            let _ = reply.send(proto::StatusReply {
                version: run.version().0,
                algorithm: format!("{} / {}", summary.totals.rule, summary.totals.scheduler),
                connected_clients: connected.len() as u32,
                registered_clients: coordinator.clients().count() as u32,
                running_tasks: coordinator.running_tasks().count() as u32,
                folded_updates: coordinator.pending_folds() as u32,
                waiting_updates: coordinator.held_updates() as u32,
                paused: pause.paused,
                finished: run.is_finished(),
                time_s: summary.totals.time_s,
                bytes_up: summary.totals.bytes_up,
                bytes_down: summary.totals.bytes_down,
                last_accuracy: run.last_accuracy(),
                runtime: Some(crate::admin::runtime_status(&run.runtime_stats())),
                target_rounds: run.config().stop.rounds,
            });
        }
        AdminQuery::Clients(reply) => {
            let names = run.client_names().unwrap_or_default();
            let clients = names
                .into_iter()
                .map(|(id, name)| {
                    let record = run.coordinator().client(id).cloned();
                    proto::ClientInfo {
                        id: id.0,
                        name,
                        connected: connected.contains_key(&id),
                        registered: record.is_some(),
                        num_samples: record.as_ref().map_or(0, |r| r.num_samples),
                        task: record.as_ref().and_then(|r| r.task).map(|t| t.0),
                        delivered: record.as_ref().map_or(0, |r| r.delivered),
                        failures_in_a_row: record.as_ref().map_or(0, |r| r.failures_in_a_row),
                    }
                })
                .collect();
            let _ = reply.send(clients);
        }
        AdminQuery::Pause(paused, reply) => {
            if pause.paused != paused {
                tracing::info!(paused, "admin: {}", if paused { "paused" } else { "resumed" });
            }
            // Resuming dispatches through the caller's outgoing list, so held tasks go out in order.
            pause.paused = paused;
            outgoing.extend(pause.release(run));
            let _ = reply.send(pause.paused);
        }
        AdminQuery::Model(reply) => {
            let _ = reply.send((run.broadcast().version.0, run.global_model()));
        }
    }
}

/// Hands what the run decided to the connections it concerns.
fn dispatch(run: &mut Run, outgoing: Vec<Outgoing>, connected: &mut HashMap<ClientId, Connected>) {
    for out in outgoing {
        match out {
            Outgoing::Task {
                client,
                task,
                version,
                local_steps,
                seed,
            } => {
                let broadcast = run.broadcast().clone();
                debug_assert_eq!(broadcast.version, version);
                match connected.get(&client) {
                    Some(c) => {
                        if let Some(split) = run.split() {
                            split.open(task, client, local_steps);
                        }
                        run.count_download(broadcast.bytes());
                        let _ = c.outbox.send(ToClient::Task {
                            task,
                            local_steps,
                            seed,
                            broadcast,
                        });
                    }
                    // Away: it gets the task when it reconnects within its grace period.
                    None => tracing::debug!(%client, %task, "task for a client that is away"),
                }
            }
            Outgoing::Cancel { client, task } => {
                if let Some(c) = connected.get(&client) {
                    let _ = c.outbox.send(ToClient::Cancel(task));
                }
            }
            Outgoing::Evict { client, reason } => {
                if let Some(c) = connected.remove(&client) {
                    let _ = c.outbox.send(ToClient::Close(ErrorCode::Unexpected, reason));
                }
            }
            Outgoing::Finished => {}
        }
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

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts the split streams a client opens and serves each on its own task.
async fn accept_split_streams(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    split: Arc<SplitRun>,
    client: ClientId,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (conn, shared, split) = (conn.clone(), shared.clone(), split.clone());
        tokio::spawn(async move {
            let mut task = None;
            if let Err(Fatal(code, message)) =
                serve_split(send, recv, &shared, &split, client, &mut task).await
            {
                tracing::warn!(%client, ?code, message, "closing a connection for its split stream");
                if let Some(task) = task {
                    let _ = shared.requests.send(Request::Failed {
                        client,
                        task,
                        reason: format!("split stream: {message}"),
                    });
                }
                conn.close(code.close_code().into(), message.as_bytes());
            }
        });
    }
}

/// Serves one split stream: its header names the task; each frame of encoded activations and
/// labels is answered, in order, by a frame with the gradient at the cut. A stream that asks for
/// a task this client does not hold is reset; bad frames close the connection, as bad uploads do.
async fn serve_split(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    shared: &Shared,
    split: &SplitRun,
    client: ClientId,
    task_of_stream: &mut Option<TaskId>,
) -> Result<(), Fatal> {
    let mut reader = MessageReader::new(recv, shared.limits.max_split_frame);
    let header = tokio::time::timeout(shared.transfer_timeout, reader.next_message::<StreamHeader>())
        .await
        .map_err(|_| Fatal(ErrorCode::Unexpected, "no split stream header in time".into()))??;
    let Some(StreamHeader::Split { task }) = header else {
        return Err(Fatal(
            ErrorCode::Unexpected,
            "expected a split stream header".into(),
        ));
    };
    let Taken { serving, local_steps } = match split.take(task, client) {
        Ok(taken) => taken,
        Err(message) => {
            tracing::info!(%client, %task, message, "split stream refused");
            let _ = send.reset(ErrorCode::UnknownTask.close_code().into());
            return Ok(());
        }
    };
    *task_of_stream = Some(task);
    let serve = |session: &mut TailSession, frame: &[u8]| {
        tokio::task::block_in_place(|| session.serve(frame)).map_err(|e| match e {
            SplitError::Diverged(_) => Fatal(ErrorCode::Internal, e.to_string()),
            other => Fatal(ErrorCode::Malformed, format!("split step of {task}: {other}")),
        })
    };
    let mut steps = 0u32;
    let mut exchange = async |session: &mut TailSession| -> Result<(), Fatal> {
        loop {
            let frame = tokio::time::timeout(shared.transfer_timeout, reader.next_message::<Vec<u8>>())
                .await
                .map_err(|_| Fatal(ErrorCode::Unexpected, "a split step timed out".into()))??;
            let Some(frame) = frame else {
                return Ok(());
            };
            if steps >= local_steps {
                return Err(Fatal(
                    ErrorCode::Unexpected,
                    format!("{task} trains {local_steps} minibatches; a split stream sent more"),
                ));
            }
            let served = serve(session, &frame)?;
            write_message(&mut send, &served.gradient).await?;
            split.count(served.batch, frame.len(), served.gradient.len());
            steps += 1;
        }
    };
    match serving {
        Serving::Own(mut session) => {
            let result = exchange(&mut session).await;
            let complete = result.is_ok() && steps == local_steps;
            split.release(task, Some(*session), None, complete);
            result?;
        }
        Serving::Shared(shared_tail) => {
            // SplitFed V2: clients are served in turn — the stream holds the one tail throughout.
            let mut session = shared_tail.lock().await;
            let result = exchange(&mut session).await;
            let complete = result.is_ok() && steps == local_steps;
            split.release(task, None, Some(session.params()), complete);
            result?;
        }
    }
    let _ = send.finish();
    Ok(())
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, error = %e, "handshake refused");
            return;
        }
    };
    let connection = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let mut session = Session {
        conn: conn.clone(),
        shared: shared.clone(),
        client: None,
        leaf: false,
        task_of_upload: None,
    };
    let result = session.run(connection).await;
    let stats = conn.stats();
    shared.wire_in.fetch_add(stats.udp_rx.bytes, Ordering::Relaxed);
    shared.wire_out.fetch_add(stats.udp_tx.bytes, Ordering::Relaxed);
    if let Some(client) = session.client {
        // A client cut off for a bad upload (malformed, oversized, truncated) loses the task it was
        // uploading at once, so a round does not wait out its grace period for it. A connection
        // that was lost mid-upload (`Internal`: the transport failed) keeps its task for the grace
        // period: the client holds the update and sends it again when it reconnects.
        if let (Err(Fatal(code, _)), Some(task)) = (&result, session.task_of_upload)
            && *code != ErrorCode::Internal
        {
            let _ = shared.requests.send(Request::Failed {
                client,
                task,
                reason: "disconnected for a bad upload".into(),
            });
        }
        let _ = shared.requests.send(Request::Gone { client, connection });
    }
    match result {
        Ok(()) => conn.close(0u32.into(), b"bye"),
        Err(Fatal(code, message)) => {
            tracing::warn!(%remote, ?code, message, "closing a connection");
            conn.close(code.close_code().into(), message.as_bytes());
        }
    }
}

struct Session {
    conn: quinn::Connection,
    shared: Arc<Shared>,
    client: Option<ClientId>,
    /// Whether the peer is one of this top's leaves (its uploads are partial aggregates).
    leaf: bool,
    /// The task of the upload being received, if any.
    task_of_upload: Option<TaskId>,
}

impl Session {
    async fn run(&mut self, connection: u64) -> Result<(), Fatal> {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), self.conn.accept_bi())
            .await
            .map_err(|_| Fatal(ErrorCode::Unexpected, "no control stream within 10 s".into()))?
            .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))?;
        let mut reader = MessageReader::new(recv, self.shared.limits.max_control_frame);
        let result = self.converse(connection, &mut send, &mut reader).await;
        if let Err(Fatal(code, message)) = &result {
            self.tell_error(&mut send, *code, message).await;
        }
        result
    }

    /// The session after the control stream is open: Hello, Welcome, then tasks and updates.
    async fn converse(
        &mut self,
        connection: u64,
        send: &mut quinn::SendStream,
        reader: &mut MessageReader,
    ) -> Result<(), Fatal> {
        let shared = self.shared.clone();
        let hello = tokio::time::timeout(Duration::from_secs(10), reader.next_message::<ClientMessage>())
            .await
            .map_err(|_| Fatal(ErrorCode::Unexpected, "no Hello within 10 s".into()))??;
        let Some(ClientMessage::Hello {
            protocol_version,
            name,
            profile,
            holding,
            ..
        }) = hello
        else {
            return Err(Fatal(
                ErrorCode::Unexpected,
                "the first message must be Hello".into(),
            ));
        };
        if protocol_version != PROTOCOL_VERSION {
            let message =
                format!("this server speaks protocol {PROTOCOL_VERSION}, the client {protocol_version}");
            return Err(Fatal(ErrorCode::VersionMismatch, message.to_string()));
        }
        let name = match tls::peer_name(&self.conn) {
            Some(certified) => certified,
            None if shared.allow_anonymous && tls::is_valid_name(&name) => name,
            None => {
                return Err(Fatal(
                    ErrorCode::Unexpected,
                    "a client certificate is required".into(),
                ));
            }
        };
        let (outbox, mut to_client) = mpsc::unbounded_channel();
        let (reply, welcome) = oneshot::channel();
        let _ = shared.requests.send(Request::Hello {
            name: name.clone(),
            num_samples: profile.num_samples,
            holding,
            connection,
            outbox,
            reply,
        });
        let (client, run) = match welcome.await {
            Ok(Ok(w)) => w,
            Ok(Err(message)) => return Err(Fatal(ErrorCode::Internal, message.to_string())),
            Err(_) => {
                // The coordinator is gone: a finished run says so, and the client exits cleanly.
                let version = *shared.finished.borrow();
                return match version {
                    Some(version) => {
                        write_message(send, &ServerMessage::Finished { version }).await?;
                        let _ = send.finish();
                        // Wait for the client to close (bounded), so the message is delivered.
                        let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.closed()).await;
                        Ok(())
                    }
                    None => Err(Fatal(ErrorCode::Internal, "the server is stopping".into())),
                };
            }
        };
        self.client = Some(client);
        self.leaf = shared.leaves.contains(&name);
        write_message(
            send,
            &ServerMessage::Welcome {
                protocol_version: PROTOCOL_VERSION,
                client,
                limits: shared.limits,
                run,
            },
        )
        .await?;
        let finished = *shared.finished.borrow();
        if let Some(version) = finished {
            write_message(send, &ServerMessage::Finished { version }).await?;
        }
        tracing::debug!(%client, name, "session open");
        // Split streams are served beside the control stream, for as long as the session lasts.
        let split_streams = shared.split.clone().map(|split| {
            let conn = self.conn.clone();
            let shared = shared.clone();
            AbortOnDrop(tokio::spawn(accept_split_streams(conn, shared, split, client)))
        });
        let _split_streams = split_streams;
        loop {
            tokio::select! {
                message = reader.next_message::<ClientMessage>() => {
                    match message? {
                        Some(ClientMessage::UpdateReady { meta, payload_bytes }) => {
                            self.task_of_upload = Some(meta.task);
                            let reply = self.receive_update(client, meta, payload_bytes).await?;
                            self.task_of_upload = None;
                            write_message(send, &reply).await?;
                        }
                        Some(ClientMessage::TaskFailed { task, reason }) => {
                            let _ = shared.requests.send(Request::Failed { client, task, reason });
                        }
                        Some(ClientMessage::Bye) | None => return Ok(()),
                        Some(ClientMessage::Hello { .. }) => {
                            return Err(Fatal(ErrorCode::Unexpected, "a second Hello".into()));
                        }
                    }
                }
                out = to_client.recv() => {
                    match out {
                        Some(ToClient::Task { task, local_steps, seed, broadcast }) => {
                            write_message(send, &ServerMessage::Task {
                                task,
                                version: broadcast.version,
                                local_steps,
                                lr: shared.lr,
                                codec: shared.codec.clone(),
                                feedback: shared.feedback.clone(),
                                seed,
                                model_bytes: broadcast.bytes(),
                            }).await?;
                            // The model goes on its own stream, so control traffic is never behind it.
                            let conn = self.conn.clone();
                            tokio::spawn(async move {
                                let header = StreamHeader::Model {
                                    task,
                                    version: broadcast.version,
                                    vectors: broadcast.vectors.clone(),
                                    dim: broadcast.data.first().map_or(0, |v| v.len() as u64),
                                };
                                let body: Vec<&[u8]> =
                                    broadcast.data.iter().map(|v| bytemuck::cast_slice::<f32, u8>(v)).collect();
                                if let Err(e) = send_stream(&conn, &header, &body).await {
                                    tracing::debug!(%task, error = %e, "model transfer failed");
                                }
                            });
                        }
                        Some(ToClient::Cancel(task)) => {
                            write_message(send, &ServerMessage::Cancel { task }).await?;
                        }
                        Some(ToClient::Close(code, message)) => {
                            return Err(Fatal(code, message.to_string()));
                        }
                        Some(ToClient::Finished(version)) => {
                            write_message(send, &ServerMessage::Finished { version }).await?;
                            let _ = send.finish();
                            // Wait for the client to close (bounded), so the message is delivered.
                            let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.closed()).await;
                            return Ok(());
                        }
                        None => return Ok(()),
                    }
                }
            }
        }
    }

    /// Sends the error that closes the connection, and gives it a moment to arrive before the
    /// close overtakes it.
    async fn tell_error(&self, send: &mut quinn::SendStream, code: ErrorCode, message: &str) {
        let _ = write_message(
            send,
            &ServerMessage::Error {
                code,
                message: message.to_string(),
            },
        )
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }

    /// Receives, decodes, stores and offers one update; the answer for the control stream.
    async fn receive_update(
        &mut self,
        client: ClientId,
        meta: UpdateMeta,
        payload_bytes: u64,
    ) -> Result<ServerMessage, Fatal> {
        let shared = self.shared.clone();
        if payload_bytes > shared.limits.max_payload_bytes {
            return Err(Fatal(
                ErrorCode::TooLarge,
                format!(
                    "an update of {payload_bytes} bytes exceeds the limit of {}",
                    shared.limits.max_payload_bytes
                ),
            ));
        }
        let receive = async {
            let mut stream = self
                .conn
                .accept_uni()
                .await
                .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))?;
            let header = read_header(&mut stream, shared.limits.max_control_frame).await?;
            let StreamHeader::Update { task, part_bytes } = header else {
                return Err(Fatal(ErrorCode::Unexpected, "expected an update stream".into()));
            };
            let total = StreamHeader::Update {
                task,
                part_bytes: part_bytes.clone(),
            }
            .body_bytes();
            if task != meta.task || total != payload_bytes {
                return Err(Fatal(
                    ErrorCode::Malformed,
                    format!(
                        "the update stream ({task}, {total} bytes) does not match UpdateReady ({}, {payload_bytes} bytes)",
                        meta.task
                    ),
                ));
            }
            let body = read_body(&mut stream, total, shared.limits.max_payload_bytes).await?;
            Ok::<_, Fatal>((part_bytes, body))
        };
        let (part_bytes, body) = tokio::time::timeout(shared.transfer_timeout, receive)
            .await
            .map_err(|_| Fatal(ErrorCode::Unexpected, "the update transfer timed out".into()))??;
        let upload = shared.uploads.fetch_add(1, Ordering::Relaxed);
        let incoming = Store::incoming_path(&shared.state_dir, upload);
        let layout = shared.layout.clone();
        let path = incoming.clone();
        let wire_bytes = body.len() as u64;
        let split = shared.split.clone();
        let task = meta.task;
        let (parts, partial) = (shared.upload_parts, self.leaf);
        let prepared = tokio::task::spawn_blocking(move || match split {
            None => {
                let contribution = decode_contribution(&body, &part_bytes, &layout, parts, partial)
                    .map_err(|e| e.to_string())?;
                files::write_atomic(&path, &[&body]).map_err(|e| format!("storing: {e}"))?;
                Ok::<_, String>((part_bytes, files::content_hash(&[&body]), contribution))
            }
            Some(split) => {
                // The device sends its head; the stored update is [Δhead | Δtail], dense.
                let head = shoal_engine::decode_upload(&body, &part_bytes, split.model().head.layout())
                    .map_err(|e| e.to_string())?;
                let [head] = head.as_slice() else {
                    return Err(format!("a split update has one part, this one {}", head.len()));
                };
                let full = split.full_update(task, head).map_err(|e| format!("{e:#}"))?;
                let stored =
                    shoal_compression::encode(&shoal_compression::CodecSpec::identity(), &layout, &full, 0)
                        .map_err(|e| format!("storing: {e}"))?;
                files::write_atomic(&path, &[&stored]).map_err(|e| format!("storing: {e}"))?;
                Ok((
                    vec![stored.len() as u64],
                    files::content_hash(&[&stored]),
                    Contribution::Upload(Arc::from(vec![full])),
                ))
            }
        })
        .await
        .map_err(|e| Fatal(ErrorCode::Internal, e.to_string()))?;
        let (part_bytes, hash, contribution) = prepared.map_err(|e| {
            Fatal(
                ErrorCode::Malformed,
                format!("the update of {} is unusable: {e}", meta.task),
            )
        })?;
        let task = meta.task;
        let (reply, verdict) = oneshot::channel();
        let _ = shared.requests.send(Request::Update {
            client,
            update: ReceivedUpdate {
                meta,
                wire_bytes,
                part_bytes,
                hash,
                contribution,
            },
            incoming,
            reply,
        });
        match verdict.await {
            Ok(UpdateVerdict::Accepted) => Ok(ServerMessage::UpdateAccepted { task }),
            Ok(UpdateVerdict::Refused(message)) => Ok(ServerMessage::Error {
                code: ErrorCode::UnknownTask,
                message,
            }),
            Ok(UpdateVerdict::Internal(message)) => Err(Fatal(ErrorCode::Internal, message)),
            // The coordinator is gone: after the end of the run, an update is no longer wanted.
            Err(_) => match *shared.finished.borrow() {
                Some(version) => Ok(ServerMessage::Finished { version }),
                None => Err(Fatal(ErrorCode::Internal, "the server is stopping".into())),
            },
        }
    }
}
