use betang_proto::v1::{
    GetHostRequest, Host, ListHostsRequest, ListHostsResponse, host_service_server::HostService,
};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::{auth::Permission, error::ApiError, ids::HostId, now_ms, store::hosts};

pub struct HostApi {
    pub ctx: Ctx,
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn list_hosts(
        &self,
        req: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        self.ctx
            .caller(&req)
            .await?
            .require(Permission::ViewHosts)?;
        let down = self.ctx.down_after_ms();
        let now = now_ms();
        let hosts = self
            .ctx
            .store
            .run(move |c| hosts::list(c, now, down))
            .await?;
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn get_host(&self, req: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        self.ctx
            .caller(&req)
            .await?
            .require(Permission::ViewHosts)?;
        let id = HostId::parse(&req.get_ref().id)
            .map_err(|_| ApiError::HostNotFound(req.get_ref().id.clone()))?;
        let down = self.ctx.down_after_ms();
        let now = now_ms();
        let host = self
            .ctx
            .store
            .run(move |c| hosts::get(c, &id, now, down))
            .await?;
        Ok(Response::new(host))
    }
}
