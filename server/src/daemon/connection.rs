//! One device's QUIC connection: the Hello and the run's description, tasks and their broadcasts
//! sent as the coordinator thread asks, and update payloads read off their streams, decoded,
//! checked and written to a file off the coordinator thread before they are offered to it.

use super::split_streams::{AbortOnDrop, accept_split_streams};
use super::*;

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

pub(super) async fn serve_connection(
    incoming: quinn::Incoming,
    handshake: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, error = %e, "handshake refused");
            return;
        }
    };
    drop(handshake);
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
        // Room for the payload in the server-wide budget, held until the run has decided on it.
        let reservation = tokio::time::timeout(
            shared.transfer_timeout,
            shared.upload_budget.reserve(payload_bytes),
        )
        .await
        .ok()
        .flatten();
        let Some(_reservation) = reservation else {
            return Err(Fatal(
                ErrorCode::Internal,
                format!(
                    "no room for an update of {payload_bytes} bytes: other uploads hold the server's \
                     upload_memory_mb; try again later"
                ),
            ));
        };
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
