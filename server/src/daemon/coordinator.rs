//! The coordinator thread: the only owner of the [`Run`]. It serves the connections' and the admin
//! API's requests in order, fires the Coordinator's timers and the end of each disconnected
//! client's grace, and sends what the run decides (tasks, cancellations, evictions, the end of the
//! run) to each connection's outbox.

use super::*;
use absences::Absences;

/// A connected client as the coordinator thread knows it.
struct Connected {
    connection: u64,
    outbox: mpsc::UnboundedSender<ToClient>,
}

/// The coordinator thread: owns the run, serves requests, fires timers.
pub(super) fn coordinate(
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
    let mut away = Absences::new(grace);
    // Clients the Coordinator still knows from the log: they have one grace period to come back.
    let started = Instant::now();
    for (client, record) in run.coordinator().clients() {
        away.left(client, record.task, started);
    }
    loop {
        let now = Instant::now();
        let timer = run.next_wakeup().map(|at| {
            let wait = at.as_micros().saturating_sub(run.now().as_micros());
            now + Duration::from_micros(wait)
        });
        let deadline = away.next_deadline().into_iter().chain(timer).min();
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
                handle_request(&mut run, request, &mut connected, &mut away, &mut outgoing)?;
            }
            None => {}
        }
        // Timers and grace periods that are due.
        let now = Instant::now();
        for client in away.gone(now) {
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
    connected: &mut HashMap<ClientId, Connected>,
    away: &mut Absences,
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
            away.back(client);
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
                let why = format!("the update names {}, not this client", update.meta.client);
                fail_forger(run, client, &why, outgoing)?;
                UpdateVerdict::Refused(why)
            } else {
                match run.offer_update(update, &incoming) {
                    Ok(Offer::Accepted(out)) => {
                        outgoing.extend(out);
                        UpdateVerdict::Accepted
                    }
                    Ok(Offer::Duplicate) => UpdateVerdict::Accepted,
                    Ok(Offer::Refused(e)) => {
                        if run.coordinator().is_forged(&e) {
                            fail_forger(run, client, &e.to_string(), outgoing)?;
                        }
                        UpdateVerdict::Refused(e.to_string())
                    }
                    Err(OfferError::NotStored(e)) => {
                        tracing::error!(error = %format!("{e:#}"), %task, "could not store an update");
                        UpdateVerdict::Internal(format!("{e:#}"))
                    }
                    Err(OfferError::RunFailed(e)) => {
                        // The update is in the log: the next start replays it. Serving on from a
                        // run that is behind its log would answer clients from a state no log
                        // holds, so fl-server stops.
                        let _ = reply.send(UpdateVerdict::Internal("the server failed; it restarts".into()));
                        return Err(e.context(format!(
                            "carrying out the acceptance of {task}; restart fl-server to resume from its log"
                        )));
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
                    let task = run.running_task_of(client).map(|r| r.task);
                    away.left(client, task, Instant::now());
                }
            }
        }
        // Answered by the coordinator loop itself.
        Request::Admin(_) | Request::TopTask { .. } | Request::TopFinished(_) | Request::Stop => {}
    }
    Ok(())
}

/// Fails (and cancels) the running task of `client`, which sent an upload no honest client sends
/// (a task never assigned, another's task, a version it was never given): a client cannot hold
/// its task by answering with forgeries, and each counts toward `evict_after_failures`.
fn fail_forger(run: &mut Run, client: ClientId, why: &str, outgoing: &mut Vec<Outgoing>) -> Result<()> {
    if let Some(task) = run.running_task_of(client).map(|r| r.task) {
        tracing::warn!(%client, %task, why, "a forged upload fails the client's running task");
        outgoing.push(Outgoing::Cancel { client, task });
        outgoing.extend(run.handle(Event::TaskFailed { task })?);
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
