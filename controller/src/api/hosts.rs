use betang_proto::v1::{
    CordonHostRequest, GetHostRequest, Host, ListHostsRequest, ListHostsResponse,
    SetHostWeightRequest, UncordonHostRequest, host_service_server::HostService,
};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::{
    auth::Permission,
    error::ApiError,
    ids::HostId,
    now_ms,
    store::hosts::{self, HostChange},
};

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

    async fn cordon_host(&self, req: Request<CordonHostRequest>) -> Result<Response<Host>, Status> {
        self.change(req.metadata(), &req.get_ref().id, HostChange::Cordon(true))
            .await
    }

    async fn uncordon_host(
        &self,
        req: Request<UncordonHostRequest>,
    ) -> Result<Response<Host>, Status> {
        self.change(req.metadata(), &req.get_ref().id, HostChange::Cordon(false))
            .await
    }

    async fn set_host_weight(
        &self,
        req: Request<SetHostWeightRequest>,
    ) -> Result<Response<Host>, Status> {
        let w = req.get_ref().weight;
        self.change(req.metadata(), &req.get_ref().id, HostChange::Weight(w))
            .await
    }
}

impl HostApi {
    async fn change(
        &self,
        md: &tonic::metadata::MetadataMap,
        id: &str,
        change: HostChange,
    ) -> Result<Response<Host>, Status> {
        let mut probe = Request::new(());
        *probe.metadata_mut() = md.clone();
        let caller = self.ctx.caller(&probe).await?;
        caller.require(Permission::ManageHosts)?;
        let id = HostId::parse(id).map_err(|_| ApiError::HostNotFound(id.to_owned()))?;
        let (now, down) = (now_ms(), self.ctx.down_after_ms());
        let host = self
            .ctx
            .store
            .run(move |c| {
                hosts::update(c, &caller, &id, change, now)?;
                hosts::get(c, &id, now, down)
            })
            .await?;
        Ok(Response::new(host))
    }
}
