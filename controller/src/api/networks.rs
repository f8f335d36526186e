//! Networks: operators define them and grant them to institutions; members
//! see those granted to their own.

use betang_proto::v1::{
    CreateNetworkRequest, GetNetworkRequest, GrantNetworkRequest, ListNetworksRequest,
    ListNetworksResponse, Network, RevokeNetworkRequest, network_service_server::NetworkService,
};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::{auth::Permission, error::ApiError, now_ms, store::networks};

pub struct NetworkApi {
    pub ctx: Ctx,
}

#[tonic::async_trait]
impl NetworkService for NetworkApi {
    async fn create_network(
        &self,
        req: Request<CreateNetworkRequest>,
    ) -> Result<Response<Network>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageNetworks)?;
        let n = req
            .into_inner()
            .network
            .ok_or_else(|| ApiError::invalid("network", "is required"))?;
        let now = now_ms();
        let out = self
            .ctx
            .store
            .run(move |c| networks::create(c, &caller, &n, now))
            .await?;
        Ok(Response::new(out))
    }

    async fn get_network(
        &self,
        req: Request<GetNetworkRequest>,
    ) -> Result<Response<Network>, Status> {
        let scope = self.ctx.caller(&req).await?.scope();
        let name = req.into_inner().name;
        let out = self
            .ctx
            .store
            .run(move |c| networks::get(c, &name, &scope))
            .await?;
        Ok(Response::new(out))
    }

    async fn list_networks(
        &self,
        req: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        let scope = self.ctx.caller(&req).await?.scope();
        let networks = self
            .ctx
            .store
            .run(move |c| networks::list(c, &scope))
            .await?;
        Ok(Response::new(ListNetworksResponse { networks }))
    }

    async fn grant_network(
        &self,
        req: Request<GrantNetworkRequest>,
    ) -> Result<Response<Network>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageNetworks)?;
        let r = req.into_inner();
        let now = now_ms();
        let out = self
            .ctx
            .store
            .run(move |c| {
                networks::grant(c, &caller, &r.name, &r.institution_id, r.is_default, now)
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn revoke_network(
        &self,
        req: Request<RevokeNetworkRequest>,
    ) -> Result<Response<Network>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageNetworks)?;
        let r = req.into_inner();
        let now = now_ms();
        let out = self
            .ctx
            .store
            .run(move |c| networks::revoke(c, &caller, &r.name, &r.institution_id, now))
            .await?;
        Ok(Response::new(out))
    }
}
