//! The device agent: connects to fl-server over QUIC, trains each task it is given, uploads the
//! encoded update on its own stream, and keeps it until the server acknowledges it as durable.
//!
//! A dropped connection is retried with exponential backoff (seeded jitter). Work survives it:
//! training goes on while disconnected, the Hello of the next connection names the task held,
//! and an unacknowledged update is sent again — the server deduplicates by task id. The agent
//! exits cleanly when the server says the run is finished.

use crate::local_data::DataSource;
use crate::saved_state::{SavedDevice, StateFile};
use crate::split_task::{self, SplitFigures};
use crate::trainer::{EncodedUpdate, TaskSpec, Trainer};
use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_aggregators::Broadcast;
use shoal_core::{ClientId, TaskId};
use shoal_engine::DeviceState;
use shoal_net::endpoint::{Timeouts, client_endpoint};
use shoal_net::protocol::{
    BroadcastVector, Capabilities, ClientMessage, DeclaredProfile, ErrorCode, PROTOCOL_VERSION, ServerMessage,
};
use shoal_net::stream::{MessageReader, read_model, send_update, write_message};
use shoal_net::tls::PemPair;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How the agent connects and what it trains on.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The server's QUIC address.
    pub server: SocketAddr,
    /// The name in the server's certificate.
    pub server_name: String,
    /// The run's CA certificate (PEM).
    pub ca_pem: String,
    /// This device's certificate and key; `None` for servers that accept anonymous clients.
    pub identity: Option<PemPair>,
    /// Name announced in the Hello (the certificate's name wins when there is one).
    pub name: String,
    /// Local data.
    pub data: DataSource,
    /// Seed of the reconnection backoff's jitter (a task's own seed comes with the task).
    pub seed: u64,
    /// Give up after this long without reaching the server.
    pub give_up_after: Duration,
    /// Split learning: minibatches in flight (default: the server's `[split] pipeline`).
    pub pipeline: Option<usize>,
    /// Where the device keeps its state between starts, one file per run ([`crate::saved_state`]);
    /// `None` keeps it in memory only (a restart then joins as a device without state).
    pub state_dir: Option<PathBuf>,
}

/// Counters of one agent's life, printed when it exits.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AgentReport {
    /// Tasks trained.
    pub tasks: u64,
    /// Updates the server acknowledged.
    pub accepted: u64,
    /// Update payload bytes sent (resends included).
    pub bytes_up: u64,
    /// Model bytes received.
    pub bytes_down: u64,
    /// Connections made.
    pub connections: u64,
    /// Last version the server announced.
    pub final_version: u64,
    /// Split learning: samples trained through the server's tail.
    pub split_samples: u64,
    /// Split learning: seconds spent in split steps (first forward to last gradient, per task).
    pub split_seconds: f64,
    /// Split learning: training throughput, samples per second of split steps.
    pub split_samples_per_s: Option<f64>,
    /// Split learning: forward-message bytes sent (activations and labels).
    pub split_forward_bytes: u64,
    /// Split learning: gradient bytes received.
    pub split_gradient_bytes: u64,
}

/// What a task's computation returns: the update, and a split task's figures.
type Trained = Result<(EncodedUpdate, Option<SplitFigures>)>;

/// Work in hand across connections.
struct Work {
    trainer: Option<Arc<Trainer>>,
    state: DeviceState,
    /// A task being trained.
    training: Option<(TaskSpec, JoinHandle<Trained>)>,
    /// Whether that task is a split task (it needs its connection: a disconnection ends it).
    training_split: bool,
    /// A trained update not yet acknowledged.
    unacknowledged: Option<EncodedUpdate>,
    /// The file the state is saved in (once the run is known), and this device's id in the run.
    saved: Option<(StateFile, ClientId)>,
    /// Before the first Welcome of a restarted device: the task its newest saved state holds
    /// unacknowledged (see [`StateFile::latest_unacknowledged`]).
    saved_holding: Option<TaskId>,
    report: AgentReport,
}

impl Work {
    /// The device state (rule state, feedback memory) a new task starts from: that of the last
    /// update sent, acknowledged or not (after a reconnection the server may send the next task
    /// before it acknowledges the last one, which it has counted). An update the server refuses or
    /// cancels is dropped, and with it its state: the next task starts from the last acknowledged
    /// one.
    fn state_for_next_task(&self) -> DeviceState {
        self.unacknowledged
            .as_ref()
            .map_or_else(|| self.state.clone(), |u| u.next_state.clone())
    }

    /// Saves the state and the unacknowledged update, atomically, when a state folder is set.
    fn persist(&self) -> Result<()> {
        if let Some((file, client)) = &self.saved {
            file.save(&SavedDevice {
                client: *client,
                state: self.state.clone(),
                unacknowledged: self.unacknowledged.clone(),
            })
            .map_err(|e| FatalError(format!("saving the device state: {e}")))?;
        }
        Ok(())
    }

    /// Takes up the state saved for run `run_id` by an earlier start of this device, if any.
    fn resume(&mut self, dir: &std::path::Path, run_id: u64, client: ClientId) -> Result<()> {
        let file = StateFile::for_run(dir, run_id);
        match file.load().map_err(|e| FatalError(e.to_string()))? {
            Some(saved) if saved.client != client => {
                return Err(FatalError(format!(
                    "{} belongs to {}, but the server knows this device as {client}: give each device its                      own state folder",
                    file.path().display(),
                    saved.client
                ))
                .into());
            }
            Some(saved) => {
                tracing::info!(
                    file = %file.path().display(),
                    unacknowledged = ?saved.unacknowledged.as_ref().map(|u| u.meta.task),
                    "resumed the device state of an earlier start"
                );
                self.state = saved.state;
                self.unacknowledged = saved.unacknowledged;
            }
            None => {}
        }
        self.saved = Some((file, client));
        self.saved_holding = None;
        Ok(())
    }

    fn holding(&self) -> Option<TaskId> {
        self.unacknowledged
            .as_ref()
            .map(|u| u.meta.task)
            .or(self.training.as_ref().map(|(s, _)| s.task))
            .or(self.saved_holding)
    }
}

enum SessionEnd {
    Finished,
    Disconnected(String),
}

/// How long a QUIC handshake may take before the agent tries again. A server restarted in the
/// middle of a handshake never answers it (a connection that was never established gets no
/// stateless reset), and waiting out the idle timeout would hold the device — and its round — for
/// 15 s; on a working path the handshake takes a few round trips.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until the run is finished.
pub async fn run(options: AgentOptions) -> Result<AgentReport> {
    let data = options.data.load()?;
    tracing::info!(samples = data.indices.len(), "local data loaded");
    let mut data = Some(data);
    // Frequent keep-alives: a restarted server answers them with a stateless reset, so a crash
    // is noticed within seconds.
    let timeouts = Timeouts {
        idle: Duration::from_secs(15),
        keep_alive: Duration::from_secs(2),
    };
    let endpoint = client_endpoint(
        &options.ca_pem,
        options.identity.as_ref(),
        timeouts,
        options.server,
    )?;
    let mut work = Work {
        trainer: None,
        state: DeviceState::default(),
        training: None,
        training_split: false,
        unacknowledged: None,
        saved: None,
        saved_holding: options
            .state_dir
            .as_deref()
            .and_then(StateFile::latest_unacknowledged),
        report: AgentReport::default(),
    };
    let mut rng = StdRng::seed_from_u64(options.seed ^ 0x5eed);
    let mut backoff = Duration::from_millis(250);
    let mut last_contact = Instant::now();
    loop {
        let outcome = session(&endpoint, &options, &mut data, &mut work).await;
        if work.training_split && !matches!(outcome, Ok(SessionEnd::Finished)) {
            // A split task lives on its connection: it starts again when the server resends it.
            if let Some((spec, handle)) = work.training.take() {
                tracing::info!(task = %spec.task, "split task interrupted by the disconnection");
                handle.abort();
            }
            work.training_split = false;
        }
        match outcome {
            Ok(SessionEnd::Finished) => {
                // The run is over: nothing to resume.
                if let Some((file, _)) = &work.saved
                    && let Err(e) = file.remove()
                {
                    tracing::warn!(error = %e, "could not remove the saved device state");
                }
                endpoint.close(0u32.into(), b"finished");
                endpoint.wait_idle().await;
                if work.report.split_seconds > 0.0 {
                    work.report.split_samples_per_s =
                        Some(work.report.split_samples as f64 / work.report.split_seconds);
                }
                return Ok(work.report);
            }
            Ok(SessionEnd::Disconnected(reason)) => {
                tracing::warn!(reason, "disconnected");
                last_contact = Instant::now();
                backoff = Duration::from_millis(250);
            }
            Err(e) => {
                if let Some(fatal) = e.downcast_ref::<FatalError>() {
                    bail!("{fatal}");
                }
                tracing::warn!(error = %format!("{e:#}"), "connection failed");
            }
        }
        if last_contact.elapsed() > options.give_up_after {
            bail!(
                "no contact with {} for {:.0} s; giving up",
                options.server,
                options.give_up_after.as_secs_f64()
            );
        }
        let jitter = rng.random_range(0.8..1.2);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// An error retrying cannot fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FatalError(String);

async fn session(
    endpoint: &quinn::Endpoint,
    options: &AgentOptions,
    data: &mut Option<crate::local_data::LocalData>,
    work: &mut Work,
) -> Result<SessionEnd> {
    let connecting = endpoint
        .connect(options.server, &options.server_name)
        .context("connecting")?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()))?
        .context("handshake")?;
    work.report.connections += 1;
    let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
    let num_samples = match (&work.trainer, data.as_ref()) {
        (Some(t), _) => t.num_samples(),
        (None, Some(d)) => d.indices.len() as u64,
        (None, None) => 0,
    };
    write_message(
        &mut send,
        &ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: options.name.clone(),
            capabilities: Capabilities {
                codecs: vec!["any".into()],
                split: true,
            },
            profile: DeclaredProfile {
                num_samples,
                step_time_s: None,
                up_mbit_s: None,
                down_mbit_s: None,
            },
            holding: work.holding(),
        },
    )
    .await?;
    let mut reader = MessageReader::new(recv, 1 << 20);
    let welcome = tokio::time::timeout(Duration::from_secs(15), reader.next_message::<ServerMessage>())
        .await
        .context("no Welcome within 15 s")??;
    let (client, run, limits) = match welcome {
        Some(ServerMessage::Welcome {
            protocol_version,
            client,
            run,
            limits,
        }) if protocol_version == PROTOCOL_VERSION => (client, run, limits),
        // The run ended while this client was away.
        Some(ServerMessage::Finished { version }) => {
            tracing::info!(%version, "the run is finished");
            work.report.final_version = version.0;
            conn.close(0u32.into(), b"finished");
            return Ok(SessionEnd::Finished);
        }
        Some(ServerMessage::Error {
            code: ErrorCode::VersionMismatch,
            message,
        }) => return Err(FatalError(format!("the server refused our protocol: {message}")).into()),
        Some(ServerMessage::Error { code, message }) => {
            return Ok(SessionEnd::Disconnected(format!("refused ({code:?}): {message}")));
        }
        other => {
            return Ok(SessionEnd::Disconnected(format!(
                "expected Welcome, got {other:?}"
            )));
        }
    };
    if work.trainer.is_none() {
        let local = data.take().context("local data already consumed")?;
        let trainer = Trainer::new(client, &run, local).map_err(|e| FatalError(format!("{e:#}")))?;
        tracing::info!(%client, model = run.model, params = trainer.dim(), "joined the run");
        work.trainer = Some(Arc::new(trainer));
        if let Some(dir) = &options.state_dir {
            work.resume(dir, run.run_id, client)?;
        }
    }
    if let Some(update) = work.unacknowledged.clone() {
        upload(&conn, &mut send, &update, work).await?;
    }
    loop {
        let training_done = async {
            match work.training.as_mut() {
                Some((_, handle)) => Some(handle.await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = reader.next_message::<ServerMessage>() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(SessionEnd::Disconnected("the server closed the control stream".into())),
                    Err(e) => return Ok(SessionEnd::Disconnected(e.to_string())),
                };
                match message {
                    ServerMessage::Task { task, version, local_steps, lr, codec, feedback, seed, .. } => {
                        let spec = TaskSpec { task, version, local_steps, lr, codec, feedback, seed };
                        if work.unacknowledged.as_ref().is_some_and(|u| u.meta.task == task) {
                            if let Some(update) = work.unacknowledged.clone() {
                                upload(&conn, &mut send, &update, work).await?;
                            }
                            continue;
                        }
                        let broadcast = receive_model(&conn, &spec, work).await?;
                        if work.training.as_ref().is_some_and(|(s, _)| s.task == task) {
                            continue;
                        }
                        if let Some((old, handle)) = work.training.take() {
                            tracing::info!(task = %old.task, "abandoning a task the server replaced");
                            handle.abort();
                        }
                        let trainer = work.trainer.clone().context("no trainer")?;
                        let state = work.state_for_next_task();
                        let run_spec = spec.clone();
                        tracing::info!(%task, %version, local_steps, "training");
                        let split = trainer.split().map(|role| role.config.pipeline);
                        let handle = match split {
                            Some(pipeline) => {
                                let pipeline = options.pipeline.unwrap_or(pipeline);
                                let conn = conn.clone();
                                tokio::spawn(async move {
                                    let (update, figures) = split_task::train(
                                        conn, trainer, run_spec, broadcast.x, pipeline, limits.max_split_frame,
                                    )
                                    .await?;
                                    Ok((update, Some(figures)))
                                })
                            }
                            None => tokio::task::spawn_blocking(move || {
                                trainer.train(&run_spec, &broadcast, &state).map(|u| (u, None))
                            }),
                        };
                        work.training_split = split.is_some();
                        work.training = Some((spec, handle));
                    }
                    ServerMessage::Cancel { task } => {
                        if work.training.as_ref().is_some_and(|(s, _)| s.task == task) {
                            tracing::info!(%task, "cancelled by the server");
                            if let Some((_, handle)) = work.training.take() {
                                handle.abort();
                            }
                        }
                        if work.unacknowledged.as_ref().is_some_and(|u| u.meta.task == task) {
                            work.unacknowledged = None;
                            work.persist()?;
                        }
                    }
                    ServerMessage::UpdateAccepted { task } => {
                        if let Some(update) = work.unacknowledged.take_if(|u| u.meta.task == task) {
                            work.state = update.next_state;
                            work.report.accepted += 1;
                            work.persist()?;
                            tracing::info!(%task, "update accepted");
                        }
                    }
                    ServerMessage::Error { code: ErrorCode::UnknownTask, message } => {
                        // The server will not take the update we hold (its round closed): drop it,
                        // and with it its state.
                        tracing::info!(message, "update refused");
                        work.unacknowledged = None;
                        work.persist()?;
                    }
                    ServerMessage::Error { code, message } => {
                        return Ok(SessionEnd::Disconnected(format!("server error {code:?}: {message}")));
                    }
                    ServerMessage::Finished { version } => {
                        tracing::info!(%version, "the run is finished");
                        work.report.final_version = version.0;
                        let _ = write_message(&mut send, &ClientMessage::Bye).await;
                        let _ = send.finish();
                        conn.close(0u32.into(), b"finished");
                        return Ok(SessionEnd::Finished);
                    }
                    ServerMessage::Welcome { .. } => {
                        return Ok(SessionEnd::Disconnected("a second Welcome".into()));
                    }
                }
            }
            Some(result) = training_done => {
                let Some((spec, _)) = work.training.take() else { continue };
                work.training_split = false;
                match result {
                    Ok(Ok((update, figures))) => {
                        if let Some(f) = figures {
                            work.report.split_samples += f.samples;
                            work.report.split_seconds += f.seconds;
                            work.report.split_forward_bytes += f.forward_bytes;
                            work.report.split_gradient_bytes += f.gradient_bytes;
                            tracing::info!(
                                task = %spec.task,
                                samples_per_s = format!("{:.0}", f.samples as f64 / f.seconds.max(1e-9)),
                                "split steps done"
                            );
                        }
                        work.report.tasks += 1;
                        work.unacknowledged = Some(update.clone());
                        // Saved before it is sent: the server may count it from the first byte.
                        work.persist()?;
                        upload(&conn, &mut send, &update, work).await?;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(task = %spec.task, error = %format!("{e:#}"), "training failed");
                        write_message(&mut send, &ClientMessage::TaskFailed {
                            task: spec.task,
                            reason: format!("{e:#}"),
                        }).await?;
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => bail!("the training thread failed: {e}"),
                }
            }
        }
    }
}

/// Reads the model stream of `spec` into shared vectors, straight into their memory.
async fn receive_model(conn: &quinn::Connection, spec: &TaskSpec, work: &mut Work) -> Result<Broadcast> {
    let dim = work.trainer.as_ref().map_or(0, |t| t.dim());
    let vectors = read_model(conn, spec.task, dim, Duration::from_secs(60)).await?;
    work.report.bytes_down += (vectors.len() * dim * 4) as u64;
    let mut broadcast = Broadcast {
        x: Arc::from(Vec::new()),
        c: None,
        g: None,
        x_prev: None,
    };
    for (kind, v) in vectors {
        let v: Arc<[f32]> = Arc::from(v);
        match kind {
            BroadcastVector::Model => broadcast.x = v,
            BroadcastVector::ControlVariate => broadcast.c = Some(v),
            BroadcastVector::Direction => broadcast.g = Some(v),
            BroadcastVector::PreviousModel => broadcast.x_prev = Some(v),
        }
    }
    Ok(broadcast)
}

/// Announces an update on the control stream and sends its payloads on their own stream.
async fn upload(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    update: &EncodedUpdate,
    work: &mut Work,
) -> Result<()> {
    let body: Vec<&[u8]> = update.parts.iter().map(Vec::as_slice).collect();
    send_update(conn, send, &update.meta, &body).await?;
    work.report.bytes_up += update.bytes();
    tracing::info!(task = %update.meta.task, bytes = update.bytes(), loss = update.meta.loss, "update sent");
    Ok(())
}
