//! The gRPC admin API (tonic; `proto/admin.proto`, compiled by protox at build time) on its own
//! address, loopback by default: status, clients, a metrics stream, pause/resume, model export.
//! Every call is a question to the coordinator thread, which owns the run; the service itself holds
//! no state.

use crate::run::VersionMetrics;
use crate::runtime::RuntimeStats;
use std::sync::mpsc as std_mpsc;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The generated messages, service and client.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("shoal.admin.v1");
}

use proto::admin_server::Admin;

/// Values per exported chunk (1 MiB of f32).
const CHUNK_VALUES: usize = 1 << 18;

/// A question for the coordinator thread.
pub enum AdminQuery {
    /// The run at a glance.
    Status(oneshot::Sender<proto::StatusReply>),
    /// Every known client.
    Clients(oneshot::Sender<Vec<proto::ClientInfo>>),
    /// Pause (`true`) or resume (`false`) sending tasks; answers the new state.
    Pause(bool, oneshot::Sender<bool>),
    /// The current global model and its version.
    Model(oneshot::Sender<(u64, std::sync::Arc<[f32]>)>),
}

/// The admin service.
pub struct AdminService {
    queries: std_mpsc::Sender<crate::daemon::Request>,
    metrics: broadcast::Sender<VersionMetrics>,
}

impl AdminService {
    /// A service asking the coordinator thread through `queries`, streaming `metrics`.
    pub(crate) fn new(
        queries: std_mpsc::Sender<crate::daemon::Request>,
        metrics: broadcast::Sender<VersionMetrics>,
    ) -> Self {
        Self { queries, metrics }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> AdminQuery) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.queries
            .send(crate::daemon::Request::Admin(make(tx)))
            .map_err(|_| Status::unavailable("the server is stopping"))?;
        rx.await
            .map_err(|_| Status::unavailable("the server is stopping"))
    }
}

/// A client of the admin API of the server whose data directory is `dir`: the address it is
/// listening on (`DIR/admin-listening`), else the configured one.
pub async fn connect(dir: &crate::datadir::DataDir) -> anyhow::Result<AdminConnection> {
    use anyhow::Context;
    let token = BearerToken::new(&dir.admin_token()?)?;
    let address = match std::fs::read_to_string(dir.root().join("admin-listening")) {
        Ok(a) if !a.trim().is_empty() => a.trim().to_string(),
        _ => crate::config::ServerConfig::load(&dir.config())?
            .server
            .admin
            .to_string(),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await
        .with_context(|| format!("no fl-server admin API at {address} (is `fl-server run` running?)"))?;
    Ok(proto::admin_client::AdminClient::with_interceptor(channel, token))
}

/// A client of the admin API that sends the data directory's token with every call.
pub type AdminConnection = proto::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// The admin API's token (`tls/admin.token` in the data directory, readable by its owner only):
/// the client side adds it to each call, the server side refuses a call without it.
#[derive(Clone)]
pub struct BearerToken {
    header: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// The token `secret` (printable ASCII, as `fl-server init` writes it).
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        let header = format!("Bearer {}", secret.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the admin token is not printable ASCII"))?;
        Ok(Self { header })
    }

    /// Whether `request` carries this token (compared in constant time).
    fn admits<T>(&self, request: &Request<T>) -> bool {
        let Some(given) = request.metadata().get("authorization") else {
            return false;
        };
        let (given, expected) = (given.as_bytes(), self.header.as_bytes());
        given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }
}

impl tonic::service::Interceptor for BearerToken {
    /// Client side: adds the token.
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

/// The server side's check: a call without the data directory's token is refused.
#[derive(Clone, Debug)]
pub struct RequireToken(pub BearerToken);

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.0.admits(&request) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the admin API needs the data directory's token (tls/admin.token)",
            ))
        }
    }
}

/// The runtime's figures as the admin API sends them.
pub fn runtime_status(r: &RuntimeStats) -> proto::RuntimeStatus {
    let last = r.last.clone().unwrap_or_default();
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    proto::RuntimeStatus {
        invocations: r.invocations,
        folds: r.folds,
        merges: r.merges,
        cold_starts: r.cold_starts,
        warm_reuses: r.warm_reuses,
        retired: r.retired,
        cold_start_seconds: r.cold_start_s,
        instances: n(r.instances),
        idle: n(r.idle),
        leaves: n(r.leaves),
        middles: n(r.middles),
        tops: n(r.tops),
        queue_depth: n(r.queue_depth),
        max_queue_depth: n(r.max_queue_depth),
        fold_mean_s: r.fold_mean_s,
        queue_wait_mean_s: r.queue_wait_mean_s,
        aggregations: r.aggregations,
        last_leaves: n(last.leaves),
        last_middles: n(last.middles),
        last_after_arrival_s: last.after_last_arrival_s,
    }
}

fn to_proto(m: &VersionMetrics) -> proto::VersionMetrics {
    proto::VersionMetrics {
        runtime: Some(runtime_status(&m.runtime)),
        version: m.record.version,
        time_s: m.record.time_s,
        updates: m.record.updates,
        accuracy: m.record.accuracy,
        loss: m.record.loss,
        bytes_up: m.record.bytes_up,
        bytes_down: m.record.bytes_down,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusReply>, Status> {
        Ok(Response::new(self.ask(AdminQuery::Status).await?))
    }

    async fn list_clients(
        &self,
        _: Request<proto::ListClientsRequest>,
    ) -> Result<Response<proto::ListClientsReply>, Status> {
        let clients = self.ask(AdminQuery::Clients).await?;
        Ok(Response::new(proto::ListClientsReply { clients }))
    }

    type WatchMetricsStream = ReceiverStream<Result<proto::VersionMetrics, Status>>;

    async fn watch_metrics(
        &self,
        _: Request<proto::WatchMetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        let mut updates = self.metrics.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let item = match updates.recv().await {
                    Ok(m) => Ok(to_proto(&m)),
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(Status::data_loss(format!(
                        "{n} versions were missed by a slow reader"
                    ))),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pause(&self, _: Request<proto::PauseRequest>) -> Result<Response<proto::PauseReply>, Status> {
        let paused = self.ask(|tx| AdminQuery::Pause(true, tx)).await?;
        Ok(Response::new(proto::PauseReply { paused }))
    }

    async fn resume(&self, _: Request<proto::PauseRequest>) -> Result<Response<proto::PauseReply>, Status> {
        let paused = self.ask(|tx| AdminQuery::Pause(false, tx)).await?;
        Ok(Response::new(proto::PauseReply { paused }))
    }

    type ExportModelStream = ReceiverStream<Result<proto::ModelChunk, Status>>;

    async fn export_model(
        &self,
        _: Request<proto::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let (version, model) = self.ask(AdminQuery::Model).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for (i, chunk) in model.chunks(CHUNK_VALUES).enumerate() {
                let message = proto::ModelChunk {
                    version,
                    dim: model.len() as u64,
                    offset: (i * CHUNK_VALUES) as u64,
                    values: bytemuck::cast_slice::<f32, u8>(chunk).to_vec(),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
