//! The agent's gRPC service, called by the controller.

use std::{sync::Arc, time::Duration};

use betang_proto::v1::{
    DeleteVmRequest, DeleteVmResponse, EnsureVmRequest, HostInfoRequest, HostInfoResponse,
    ListVmsRequest, ListVmsResponse, PowerState, RebootVmRequest, VmStatus,
    agent_service_server::AgentService,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    error::AgentError,
    host::HostReporter,
    vms::{DEFAULT_STOP_TIMEOUT, EnsureArgs, VmManager},
};

pub struct AgentApi {
    pub vms: Arc<VmManager>,
    pub host: Arc<HostReporter>,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
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
