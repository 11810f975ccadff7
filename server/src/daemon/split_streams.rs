//! Split learning's streams on a device's connection: each names its task, and each frame of
//! encoded activations and labels is answered, in order, by the gradient at the cut.

use super::*;

/// Aborts a spawned task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts the split streams a client opens and serves each on its own task.
pub(super) async fn accept_split_streams(
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
