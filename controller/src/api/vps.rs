use betang_proto::v1::{
    CreateVpsRequest, DeleteVpsRequest, GetVpsRequest, ListImagesRequest, ListImagesResponse,
    ListVpsRequest, ListVpsResponse, RebootVmRequest, RebootVpsRequest, StartVpsRequest,
    StopVpsRequest, Vps, vps_service_server::VpsService,
};
use tonic::{Request, Response, Status};
use tracing::{Span, info, instrument};

use super::Ctx;
use crate::{
    error::ApiError,
    ids::VpsId,
    lifecycle::{DesiredPower, VpsState},
    now_ms,
    store::{hosts, vps},
    validation,
};

pub struct VpsApi {
    pub ctx: Ctx,
}

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
const MAX_STOP_TIMEOUT_S: u32 = 3600;

impl VpsApi {
    async fn get_record(&self, id: &str) -> Result<vps::VpsRecord, ApiError> {
        let id = VpsId::parse(id)?;
        self.ctx.store.run(move |c| vps::get(c, &id)).await
    }

    async fn set_power(
        &self,
        id: &str,
        desired: DesiredPower,
        stop_timeout_s: u32,
        force: bool,
    ) -> Result<Vps, ApiError> {
        let id = VpsId::parse(id)?;
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::set_desired(c, &id, desired, stop_timeout_s, force, now))
            .await?;
        self.ctx.wake.notify_one();
        Ok(v.to_proto())
    }
}

#[tonic::async_trait]
impl VpsService for VpsApi {
    #[instrument(skip_all, fields(request_id = %req.get_ref().request_id, vps_id))]
    async fn create_vps(&self, req: Request<CreateVpsRequest>) -> Result<Response<Vps>, Status> {
        let r = req.into_inner();
        validation::request_id(&r.request_id)?;
        let spec = r
            .spec
            .ok_or_else(|| ApiError::invalid("spec", "is required"))?;
        validation::spec(&spec)?;
        let placement = vps::Placement {
            ratios: self.ctx.cfg.overcommit,
            down_after_ms: self.ctx.down_after_ms(),
        };
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::create(c, &r.request_id, &spec, &placement, now))
            .await?;
        Span::current().record("vps_id", tracing::field::display(v.id));
        info!(host_id = ?v.host_id, "VPS placed");
        self.ctx.wake.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    async fn get_vps(&self, req: Request<GetVpsRequest>) -> Result<Response<Vps>, Status> {
        Ok(Response::new(
            self.get_record(&req.get_ref().id).await?.to_proto(),
        ))
    }

    async fn list_vps(
        &self,
        req: Request<ListVpsRequest>,
    ) -> Result<Response<ListVpsResponse>, Status> {
        let r = req.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE}, got {n}"),
                )
                .into());
            }
            n => n,
        };
        let after: i64 = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .ok()
                .filter(|n: &i64| *n >= 0)
                .ok_or_else(|| {
                    ApiError::invalid("page_token", "is not a token from a previous ListVps")
                })?
        };
        let include_deleted = r.include_deleted;
        let mut rows = self
            .ctx
            .store
            .run(move |c| vps::list(c, after, size + 1, include_deleted))
            .await?;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|v| v.seq.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListVpsResponse {
            vps: rows.iter().map(vps::VpsRecord::to_proto).collect(),
            next_page_token: next,
        }))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn delete_vps(&self, req: Request<DeleteVpsRequest>) -> Result<Response<Vps>, Status> {
        let id = VpsId::parse(&req.get_ref().id)?;
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::mark_deleting(c, &id, now))
            .await?;
        self.ctx.wake.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn start_vps(&self, req: Request<StartVpsRequest>) -> Result<Response<Vps>, Status> {
        Ok(Response::new(
            self.set_power(&req.get_ref().id, DesiredPower::Running, 0, false)
                .await?,
        ))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn stop_vps(&self, req: Request<StopVpsRequest>) -> Result<Response<Vps>, Status> {
        let r = req.into_inner();
        if r.timeout_seconds > MAX_STOP_TIMEOUT_S {
            return Err(ApiError::invalid(
                "timeout_seconds",
                format!(
                    "must be at most {MAX_STOP_TIMEOUT_S}, got {}",
                    r.timeout_seconds
                ),
            )
            .into());
        }
        Ok(Response::new(
            self.set_power(&r.id, DesiredPower::Stopped, r.timeout_seconds, r.force)
                .await?,
        ))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id, host_id))]
    async fn reboot_vps(&self, req: Request<RebootVpsRequest>) -> Result<Response<Vps>, Status> {
        let r = req.into_inner();
        let v = self.get_record(&r.id).await?;
        let host = match (&v.host_id, v.state) {
            (Some(h), VpsState::Running) => h.clone(),
            _ => {
                return Err(ApiError::WrongState {
                    id: v.id.to_string(),
                    state: v.state.as_str(),
                    action: "reboot",
                }
                .into());
            }
        };
        Span::current().record("host_id", host.as_str());
        let h = host.clone();
        let endpoint = self.ctx.store.run(move |c| hosts::endpoint(c, &h)).await?;
        let mut client = self.ctx.agents.client(&host, &endpoint)?;
        let mut call = Request::new(RebootVmRequest {
            vps_id: v.id.to_string(),
            force: r.force,
        });
        call.set_timeout(self.ctx.agent_timeout());
        client.reboot_vm(call).await.map_err(|s| ApiError::Agent {
            host: host.to_string(),
            message: s.message().to_owned(),
        })?;
        info!(force = r.force, "rebooted");
        Ok(Response::new(v.to_proto()))
    }

    async fn list_images(
        &self,
        _req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let images = self.ctx.store.run(|c| hosts::catalogue(c)).await?;
        Ok(Response::new(ListImagesResponse { images }))
    }
}
