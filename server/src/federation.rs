//! A leaf fl-server's link to its top (`[federation] role = "leaf"`): the leaf is a client of the
//! top over QUIC with the certificate the top issued it. Each task the top gives it, with the
//! top's model, goes to the coordinator thread (which runs a round among the leaf's own clients
//! from that model); each partial aggregate the coordinator thread owes goes up as the update of
//! the top's task. The link reconnects with backoff; a partial whose acknowledgement was lost is
//! sent again when the top gives the same task again (the top deduplicates by task id).

use crate::config::FederationConfig;
use crate::daemon::Request;
use crate::run::LeafUpload;
use anyhow::{Context, Result, bail};
use shoal_core::{ClientId, UpdateMeta};
use shoal_net::endpoint::{Timeouts, client_endpoint};
use shoal_net::protocol::{
    BroadcastVector, Capabilities, ClientMessage, DeclaredProfile, ErrorCode, PROTOCOL_VERSION,
    RunDescription, ServerMessage,
};
use shoal_net::stream::{MessageReader, read_model, send_update, write_message};
use shoal_net::tls::{self, PemPair};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How a leaf reaches its top.
#[derive(Debug, Clone)]
pub struct TopLink {
    /// The top's QUIC address.
    pub top: SocketAddr,
    /// The name in the top's certificate.
    pub server_name: String,
    /// The CA that issued the top's certificate (PEM).
    pub ca_pem: String,
    /// This leaf's certificate and key, issued by the top.
    pub identity: PemPair,
    /// This leaf's name at the top (the identity directory's name).
    pub name: String,
    /// What the leaf runs, to check the top runs the same.
    pub run: RunDescription,
}

impl TopLink {
    /// Reads the link of a leaf's `[federation]` table; relative identity paths are under `root`.
    pub fn load(federation: &FederationConfig, root: &Path, run: RunDescription) -> Result<Option<Self>> {
        let FederationConfig::Leaf {
            top,
            server_name,
            identity,
        } = federation
        else {
            return Ok(None);
        };
        let dir = if identity.is_absolute() {
            identity.clone()
        } else {
            root.join(identity)
        };
        let ca_path = dir.join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).with_context(|| {
            format!(
                "[federation] identity: reading {} (issue it with `fl-server issue-client TOP_DIR NAME` and copy \
                 the directory here)",
                ca_path.display()
            )
        })?;
        let identity_pair = tls::read_pem_pair(&dir.join("client.pem"), &dir.join("client.key"))
            .context("[federation] identity")?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("[federation] identity must name a directory")?;
        Ok(Some(Self {
            top: *top,
            server_name: server_name.clone(),
            ca_pem,
            identity: identity_pair,
            name,
            run,
        }))
    }
}

enum LinkEnd {
    Finished,
    Disconnected(String),
}

/// Keeps the link to the top until the top finishes the run (or the leaf stops): tasks and models
/// go to the coordinator thread through `requests`, owed partials come from `uploads`.
pub(crate) async fn run_link(
    link: TopLink,
    requests: std_mpsc::Sender<Request>,
    mut uploads: mpsc::UnboundedReceiver<LeafUpload>,
) -> Result<()> {
    let timeouts = Timeouts {
        idle: Duration::from_secs(15),
        keep_alive: Duration::from_secs(2),
    };
    let endpoint = client_endpoint(&link.ca_pem, Some(&link.identity), timeouts, link.top)
        .context("the endpoint towards the top")?;
    let mut backoff = Duration::from_millis(250);
    let mut last_contact = Instant::now();
    loop {
        match session(&endpoint, &link, &requests, &mut uploads).await {
            Ok(LinkEnd::Finished) => {
                endpoint.close(0u32.into(), b"finished");
                return Ok(());
            }
            Ok(LinkEnd::Disconnected(reason)) => {
                tracing::warn!(top = %link.top, reason, "disconnected from the top");
                last_contact = Instant::now();
                backoff = Duration::from_millis(250);
            }
            Err(e) => {
                tracing::warn!(top = %link.top, error = %format!("{e:#}"), "could not reach the top");
                if last_contact.elapsed() > Duration::from_secs(600) {
                    bail!("no contact with the top {} for 10 minutes", link.top);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn session(
    endpoint: &quinn::Endpoint,
    link: &TopLink,
    requests: &std_mpsc::Sender<Request>,
    uploads: &mut mpsc::UnboundedReceiver<LeafUpload>,
) -> Result<LinkEnd> {
    let conn = endpoint
        .connect(link.top, &link.server_name)
        .context("connecting")?
        .await
        .context("handshake")?;
    let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
    write_message(
        &mut send,
        &ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: link.name.clone(),
            capabilities: Capabilities {
                codecs: vec!["partial".into()],
                split: false,
            },
            profile: DeclaredProfile {
                num_samples: 1,
                step_time_s: None,
                up_mbit_s: None,
                down_mbit_s: None,
            },
            holding: None,
        },
    )
    .await?;
    let mut reader = MessageReader::new(recv, 1 << 20);
    let welcome = tokio::time::timeout(Duration::from_secs(15), reader.next_message::<ServerMessage>())
        .await
        .context("no Welcome from the top within 15 s")??;
    let client: ClientId = match welcome {
        Some(ServerMessage::Welcome {
            protocol_version,
            client,
            run,
            ..
        }) if protocol_version == PROTOCOL_VERSION => {
            if run.model != link.run.model || run.dim != link.run.dim || run.rule_json != link.run.rule_json {
                bail!(
                    "the top runs {} ({} parameters, {}), this leaf {} ({} parameters, {}): their [model] and \
                     [algorithm.rule] must be the same",
                    run.model,
                    run.dim,
                    run.rule_json,
                    link.run.model,
                    link.run.dim,
                    link.run.rule_json
                );
            }
            client
        }
        Some(ServerMessage::Error { code, message }) => {
            return Ok(LinkEnd::Disconnected(format!("refused ({code:?}): {message}")));
        }
        other => return Ok(LinkEnd::Disconnected(format!("expected Welcome, got {other:?}"))),
    };
    tracing::info!(top = %link.top, %client, "connected to the top");
    let dim = link.run.dim as usize;
    loop {
        tokio::select! {
            message = reader.next_message::<ServerMessage>() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(LinkEnd::Disconnected("the top closed the control stream".into())),
                    Err(e) => return Ok(LinkEnd::Disconnected(e.to_string())),
                };
                match message {
                    ServerMessage::Task { task, version, .. } => {
                        let vectors = read_model(&conn, task, dim, Duration::from_secs(60)).await?;
                        let Some((BroadcastVector::Model, x)) = vectors.into_iter().next() else {
                            bail!("the top's model stream has no model");
                        };
                        tracing::info!(%task, %version, "task from the top");
                        if requests.send(Request::TopTask { task, version, x }).is_err() {
                            return Ok(LinkEnd::Finished);
                        }
                    }
                    ServerMessage::UpdateAccepted { task } => {
                        tracing::info!(%task, "the top holds this leaf's partial");
                    }
                    ServerMessage::Error { code: ErrorCode::UnknownTask, message } => {
                        tracing::warn!(message, "the top refused a partial");
                    }
                    ServerMessage::Cancel { task } => {
                        tracing::warn!(%task, "the top closed a round without this leaf");
                    }
                    ServerMessage::Error { code, message } => {
                        return Ok(LinkEnd::Disconnected(format!("top error {code:?}: {message}")));
                    }
                    ServerMessage::Finished { version } => {
                        tracing::info!(%version, "the top finished the run");
                        let _ = requests.send(Request::TopFinished(version));
                        let _ = write_message(&mut send, &ClientMessage::Bye).await;
                        let _ = send.finish();
                        conn.close(0u32.into(), b"finished");
                        return Ok(LinkEnd::Finished);
                    }
                    ServerMessage::Welcome { .. } => {
                        return Ok(LinkEnd::Disconnected("a second Welcome".into()));
                    }
                }
            }
            upload = uploads.recv() => {
                let Some(LeafUpload { task, owed }) = upload else { return Ok(LinkEnd::Finished) };
                let meta = UpdateMeta {
                    client,
                    task,
                    base_version: owed.base,
                    num_samples: owed.num_samples,
                    local_steps: 0,
                    loss: owed.loss,
                    duration_s: 0.0,
                };
                send_update(&conn, &mut send, &meta, &[owed.bytes.as_slice()]).await?;
                tracing::info!(%task, base = %owed.base, bytes = owed.bytes.len(), "partial sent to the top");
            }
        }
    }
}
