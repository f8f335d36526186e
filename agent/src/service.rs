//! The agent's gRPC service, called by the controller.

use std::{sync::Arc, time::Duration};

use betang_proto::v1::{
    ConsoleInput, ConsoleOutput, DeleteVmRequest, DeleteVmResponse, DiskChunk, EnsureVmRequest,
    ExportDiskRequest, HostInfoRequest, HostInfoResponse, ImportDiskRequest, ImportDiskResponse,
    ListVmsRequest, ListVmsResponse, PowerState, RebootVmRequest, VmStatus,
    agent_service_server::AgentService,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    error::AgentError,
    host::HostReporter,
    names,
    vms::{DEFAULT_STOP_TIMEOUT, EnsureArgs, Incoming, VmManager},
};

type ChunkStream = std::pin::Pin<Box<dyn Stream<Item = Result<DiskChunk, Status>> + Send>>;
type ConsoleStream = std::pin::Pin<Box<dyn Stream<Item = Result<ConsoleOutput, Status>> + Send>>;

pub struct AgentApi {
    pub vms: Arc<VmManager>,
    pub host: Arc<HostReporter>,
    /// The guests' consoles open now.
    pub consoles: Arc<crate::console::Hub>,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ExportDiskStream = ChunkStream;
    type ConsoleStream = ConsoleStream;

    #[instrument(skip_all, fields(host_id = %self.host.host_id()))]
    async fn console(
        &self,
        req: Request<tonic::Streaming<ConsoleInput>>,
    ) -> Result<Response<ConsoleStream>, Status> {
        let mut input_stream = req.into_inner();
        let first = input_stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("vps_id: the first message names the VPS"))?;
        let pty = self.vms.console_pty(&first.vps_id).await?;
        let (hub, vps_id) = (self.consoles.clone(), first.vps_id.clone());
        let attached = tokio::task::spawn_blocking(move || hub.attach(&vps_id, &pty))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(vps_id = %first.vps_id, "console opened");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut output = attached.output;
        tokio::spawn(async move {
            loop {
                let data = match output.recv().await {
                    Ok(d) => d,
                    // A slow session misses some output rather than holding the others.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                let msg = ConsoleOutput {
                    data,
                    notice: String::new(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        let input = attached.input;
        let mut pending = first.data;
        tokio::spawn(async move {
            loop {
                if !pending.is_empty() {
                    let (data, pty) = (std::mem::take(&mut pending), input.clone());
                    let typed =
                        tokio::task::spawn_blocking(move || crate::console::type_in(&pty, &data))
                            .await;
                    if !matches!(typed, Ok(Ok(()))) {
                        return;
                    }
                }
                match input_stream.message().await {
                    Ok(Some(m)) => pending = m.data,
                    _ => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().vps_id, host_id = %self.host.host_id()))]
    async fn export_disk(
        &self,
        req: Request<ExportDiskRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (total_bytes, chunks) = self.vms.export_disk(&req.into_inner().vps_id).await?;
        let header = DiskChunk {
            data: Vec::new(),
            total_bytes,
        };
        let data = chunks.map(|c| {
            c.map(|data| DiskChunk {
                data,
                total_bytes: 0,
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async move { Ok(header) }).chain(data),
        )))
    }

    #[instrument(skip_all, fields(host_id = %self.host.host_id()))]
    async fn import_disk(
        &self,
        req: Request<tonic::Streaming<ImportDiskRequest>>,
    ) -> Result<Response<ImportDiskResponse>, Status> {
        let chunks = req.into_inner().map(|m| {
            m.map(|m| Incoming {
                vps_id: m.vps_id,
                image: m.image,
                data: m.data,
                total_bytes: m.total_bytes,
                image_digest: m.image_digest,
            })
            .map_err(|s| AgentError::Internal(format!("disk stream: {}", s.message())))
        });
        let bytes = self.vms.import_disk(chunks).await?;
        Ok(Response::new(ImportDiskResponse { bytes }))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().vps_id, host_id = %self.host.host_id()))]
    async fn ensure_vm(&self, req: Request<EnsureVmRequest>) -> Result<Response<VmStatus>, Status> {
        let r = req.into_inner();
        let spec = r.spec.ok_or(AgentError::InvalidArgument {
            field: "spec",
            rule: "is required".into(),
        })?;
        let desired = PowerState::try_from(r.desired_power).unwrap_or(PowerState::Unspecified);
        let stop_timeout = match r.stop_timeout_seconds {
            0 => DEFAULT_STOP_TIMEOUT,
            s => Duration::from_secs(s.into()),
        };
        let status = self
            .vms
            .ensure(EnsureArgs {
                vps_id: r.vps_id,
                spec,
                desired,
                generation: r.generation,
                stop_timeout,
                force_stop: r.force_stop,
                institution_id: names::check_institution_id(&r.institution_id)
                    .map_err(AgentError::from)?,
                image_digest: names::check_digest(&r.image_digest).map_err(AgentError::from)?,
                attachment: r
                    .attachment
                    .as_ref()
                    .map(crate::attachment::Attachment::from_proto)
                    .transpose()?,
            })
            .await?;
        Ok(Response::new(status))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().vps_id, host_id = %self.host.host_id()))]
    async fn delete_vm(
        &self,
        req: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        self.vms.delete(&req.into_inner().vps_id).await?;
        Ok(Response::new(DeleteVmResponse {}))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().vps_id, host_id = %self.host.host_id()))]
    async fn reboot_vm(&self, req: Request<RebootVmRequest>) -> Result<Response<VmStatus>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.vms.reboot(&r.vps_id, r.force).await?))
    }

    async fn list_vms(
        &self,
        _req: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        Ok(Response::new(ListVmsResponse {
            vms: self.vms.list().await?,
        }))
    }

    async fn host_info(
        &self,
        _req: Request<HostInfoRequest>,
    ) -> Result<Response<HostInfoResponse>, Status> {
        Ok(Response::new(self.host.info(&self.vms).await?))
    }
}
