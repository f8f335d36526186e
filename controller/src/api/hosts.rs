use betang_proto::v1::{
    CordonHostRequest, DrainHostRequest, DrainHostResponse, DrainedVps, GetHostRequest, Host,
    ListHostsRequest, ListHostsResponse, SetHostWeightRequest, UncordonHostRequest,
    host_service_server::HostService,
};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::{
    auth::{Permission, Scope},
    error::ApiError,
    ids::HostId,
    lifecycle::VpsState,
    now_ms,
    store::{
        hosts::{self, HostChange},
        moves,
        vps::{self, ListFilter},
    },
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
        let hosts = hosts.into_iter().map(|h| self.ctx.shown(h)).collect();
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
        Ok(Response::new(self.ctx.shown(host)))
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

    #[tracing::instrument(skip_all, fields(host_id = %req.get_ref().id))]
    async fn drain_host(
        &self,
        req: Request<DrainHostRequest>,
    ) -> Result<Response<DrainHostResponse>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageHosts)?;
        let r = req.into_inner();
        let id = HostId::parse(&r.id).map_err(|_| ApiError::HostNotFound(r.id.clone()))?;
        let (actor, host, now) = (caller.clone(), id.clone(), now_ms());
        let on_host = self
            .ctx
            .store
            .run(move |c| {
                hosts::update(c, &actor, &host, HostChange::Cordon(true), now)?;
                let filter = ListFilter {
                    host_id: host.to_string(),
                    after_seq: 0,
                    limit: u32::MAX,
                    include_deleted: false,
                    institution_id: String::new(),
                    state: None,
                };
                vps::list(c, &Scope::All, &filter)
            })
            .await?;
        let mut drained = Vec::with_capacity(on_host.len());
        // Each move is recorded (and its target claimed) here; the mover
        // copies them one at a time per host.
        for v in on_host {
            let running = moves::wants_to_run(&v);
            let asked = if running {
                r.move_running
            } else {
                r.move_stopped && v.state == VpsState::Stopped
            };
            let mut item = DrainedVps {
                vps_id: v.id.to_string(),
                name: v.spec.name.clone(),
                state: v.state.as_str().to_owned(),
                outcome: "left".into(),
                to_host: String::new(),
            };
            if asked {
                let (actor, place, now, id) =
                    (caller.clone(), self.ctx.placement(), now_ms(), v.id);
                let recorded = self
                    .ctx
                    .store
                    .run(move |c| moves::request(c, &actor, &id, running, &place, now))
                    .await;
                match recorded {
                    Ok((_, target)) => {
                        item.outcome = "moving".into();
                        item.to_host = target.to_string();
                    }
                    Err(e) => item.outcome = e.to_string(),
                }
            }
            drained.push(item);
        }
        self.ctx.moves.notify_one();
        let (down, now) = (self.ctx.down_after_ms(), now_ms());
        let host = self
            .ctx
            .store
            .run(move |c| hosts::get(c, &id, now, down))
            .await?;
        Ok(Response::new(DrainHostResponse {
            host: Some(self.ctx.shown(host)),
            vps: drained,
        }))
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
        Ok(Response::new(self.ctx.shown(host)))
    }
}
