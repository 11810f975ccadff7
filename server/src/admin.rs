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
pub async fn connect(
    dir: &crate::datadir::DataDir,
) -> anyhow::Result<proto::admin_client::AdminClient<tonic::transport::Channel>> {
    use anyhow::Context;
    let address = match std::fs::read_to_string(dir.root().join("admin-listening")) {
        Ok(a) if !a.trim().is_empty() => a.trim().to_string(),
        _ => crate::config::ServerConfig::load(&dir.config())?
            .server
            .admin
            .to_string(),
    };
    proto::admin_client::AdminClient::connect(format!("http://{address}"))
        .await
        .with_context(|| format!("no fl-server admin API at {address} (is `fl-server run` running?)"))
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
