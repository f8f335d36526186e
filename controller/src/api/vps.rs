use betang_proto::v1::{
    ApproveVpsRequest, CancelVpsRequest, CreateVpsRequest, DeleteVpsRequest, GetVpsRequest,
    ListImagesRequest, ListImagesResponse, ListVpsRequest, ListVpsResponse, MoveVpsRequest,
    RebootVmRequest, RebootVpsRequest, RejectVpsRequest, ResizeVpsRequest, StartVpsRequest,
    StopVpsRequest, UsageReportRequest, UsageReportResponse, Vps, vps_service_server::VpsService,
};
use tonic::{Request, Response, Status};
use tracing::{Span, info, instrument};

use super::{Ctx, page_after, page_size};
use crate::{
    auth::{Caller, Permission, Scope},
    error::ApiError,
    ids::{HostId, VpsId},
    lifecycle::{DesiredPower, VpsState},
    now_ms,
    store::{history, hosts, identity, vps},
    validation,
};

pub struct VpsApi {
    pub ctx: Ctx,
}

const MAX_STOP_TIMEOUT_S: u32 = 3600;

impl VpsApi {
    async fn set_power(
        &self,
        caller: Caller,
        id: &str,
        desired: DesiredPower,
        stop_timeout_s: u32,
        force: bool,
    ) -> Result<Vps, ApiError> {
        caller.require(Permission::OwnVps)?;
        let id = VpsId::parse(id)?;
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::set_desired(c, &caller, &id, desired, stop_timeout_s, force, now))
            .await?;
        self.ctx.wake.notify_one();
        Ok(v.to_proto())
    }

    async fn decide_against(
        &self,
        caller: Caller,
        id: &str,
        next: VpsState,
        reason: String,
    ) -> Result<Vps, ApiError> {
        let id = VpsId::parse(id)?;
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::decide_against(c, &caller, &id, next, &reason, now))
            .await?;
        Ok(v.to_proto())
    }
}

/// A VPS whose host has gone silent is shown as UNKNOWN (its recorded state
/// is kept, and shown again when the host returns).
fn present(
    v: &vps::VpsRecord,
    down_hosts: &std::collections::HashSet<String>,
    rebooting: &super::Rebooting,
) -> Vps {
    let mut p = v.to_proto();
    if v.state == VpsState::Running && rebooting.contains(&v.id) {
        p.power_change = "rebooting".into();
    }
    let on_down_host = v
        .host_id
        .as_ref()
        .is_some_and(|h| down_hosts.contains(h.as_str()));
    if on_down_host
        && matches!(
            v.state,
            VpsState::Provisioning | VpsState::Running | VpsState::Stopped
        )
    {
        p.state = betang_proto::v1::VpsState::Unknown as i32;
        p.state_reason = format!(
            "host {} has stopped reporting; last known state {}",
            v.host_id.as_ref().map(HostId::as_str).unwrap_or(""),
            v.state
        );
    }
    p
}

fn pin(host_id: &str) -> Result<Option<HostId>, ApiError> {
    if host_id.is_empty() {
        Ok(None)
    } else {
        HostId::parse(host_id).map(Some)
    }
}

#[tonic::async_trait]
impl VpsService for VpsApi {
    type ConsoleVpsStream = super::console::ConsoleStream;

    async fn console_vps(
        &self,
        req: Request<tonic::Streaming<betang_proto::v1::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleVpsStream>, Status> {
        Ok(Response::new(super::console::open(&self.ctx, req).await?))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id, user))]
    async fn move_vps(&self, req: Request<MoveVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageHosts)?;
        Span::current().record("user", caller.username.as_str());
        let r = req.into_inner();
        let id = VpsId::parse(&r.id)?;
        let (place, now) = (self.ctx.placement(), now_ms());
        let (v, _) = self
            .ctx
            .store
            .run(move |c| crate::store::moves::request(c, &caller, &id, r.restart, &place, now))
            .await?;
        self.ctx.moves.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    #[instrument(skip_all, fields(request_id = %req.get_ref().request_id, vps_id, user))]
    async fn create_vps(&self, req: Request<CreateVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        Span::current().record("user", caller.username.as_str());
        let r = req.into_inner();
        validation::request_id(&r.request_id)?;
        let spec = r
            .spec
            .ok_or_else(|| ApiError::invalid("spec", "is required"))?;
        validation::spec(&spec)?;
        let application = r.application.ok_or_else(|| {
            ApiError::invalid(
                "application",
                "is required: name the application and the person responsible",
            )
        })?;
        validation::application(&application)?;
        let placement = r.placement.unwrap_or_default();
        validation::placement(&placement)?;
        let new = vps::NewVps {
            request_id: r.request_id,
            spec,
            application,
            institution_id: r.institution_id,
            pin: pin(&r.host_id)?,
            placement,
            ip_address: r.ip_address,
        };
        let placement = self.ctx.placement();
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::create(c, &caller, &new, &placement, now))
            .await?;
        Span::current().record("vps_id", tracing::field::display(v.id));
        info!(host_id = ?v.host_id, state = %v.state, "VPS created");
        self.ctx.wake.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    async fn get_usage_report(
        &self,
        req: Request<UsageReportRequest>,
    ) -> Result<Response<UsageReportResponse>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        let r = req.into_inner();
        validation::report_period(r.from_ms, r.to_ms)?;
        let institution = match (caller.scope(), r.institution_id.as_str()) {
            (_, "") if caller.is_staff() => None,
            (Scope::All, id) => Some(id.to_owned()),
            (Scope::Institution(own), id) if id.is_empty() || id == own => Some(own),
            // Another institution's figures do not exist for a member.
            (Scope::Institution(_), id) => {
                return Err(ApiError::NotFound {
                    what: "institution",
                    id: id.to_owned(),
                }
                .into());
            }
        };
        let (from, to, now) = (r.from_ms, r.to_ms, now_ms());
        let rows = self
            .ctx
            .store
            .run(move |c| {
                // By id or by code (operators; a member's is their own id).
                let institution = match &institution {
                    Some(id) => Some(identity::institution_id_of(c, id)?),
                    None => None,
                };
                history::report(c, from, to, institution.as_deref(), now)
            })
            .await?;
        Ok(Response::new(UsageReportResponse {
            from_ms: from,
            to_ms: to,
            institutions: rows,
        }))
    }

    async fn get_vps(&self, req: Request<GetVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        let id = VpsId::parse(&req.get_ref().id)?;
        let minutes = validation::history_minutes(req.get_ref().history_minutes)?;
        let scope = caller.scope();
        let (now, down) = (now_ms(), self.ctx.down_after_ms());
        let (v, down, points) = self
            .ctx
            .store
            .run(move |c| {
                let v = vps::get(c, &id, &scope)?;
                let points = match minutes {
                    0 => Vec::new(),
                    m => history::points(
                        c,
                        &v.id.to_string(),
                        now - i64::from(m) * 60_000,
                        history::step_for(m),
                    )?,
                };
                Ok((v, hosts::down_hosts(c, now, down)?, points))
            })
            .await?;
        let mut p = present(&v, &down, &self.ctx.rebooting);
        p.history = points;
        Ok(Response::new(p))
    }

    async fn list_vps(
        &self,
        req: Request<ListVpsRequest>,
    ) -> Result<Response<ListVpsResponse>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        let r = req.into_inner();
        let size = page_size(r.page_size, 100, 1000)?;
        let state = match betang_proto::v1::VpsState::try_from(r.state) {
            Ok(betang_proto::v1::VpsState::Unspecified) => None,
            Ok(s) => VpsState::parse(s.as_str_name().trim_start_matches("VPS_STATE_")),
            Err(_) => return Err(ApiError::invalid("state", "is not a VPS state").into()),
        };
        let filter = vps::ListFilter {
            host_id: r.host_id,
            after_seq: page_after(&r.page_token)?,
            limit: size + 1,
            include_deleted: r.include_deleted,
            institution_id: r.institution_id,
            state,
        };
        let scope = caller.scope();
        let (now, down) = (now_ms(), self.ctx.down_after_ms());
        let (mut rows, down) = self
            .ctx
            .store
            .run(move |c| {
                let mut filter = filter;
                // By id or by code; a name that is neither just lists nothing.
                if let Some(id) = (!filter.institution_id.is_empty())
                    .then(|| identity::institution_id_of(c, &filter.institution_id).ok())
                    .flatten()
                {
                    filter.institution_id = id;
                }
                Ok((
                    vps::list(c, &scope, &filter)?,
                    hosts::down_hosts(c, now, down)?,
                ))
            })
            .await?;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|v| v.seq.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListVpsResponse {
            // User-data can be 64 KiB each and may hold secrets: only
            // GetVps returns it.
            vps: rows
                .iter()
                .map(|v| {
                    let mut p = present(v, &down, &self.ctx.rebooting);
                    if let Some(s) = p.spec.as_mut() {
                        s.user_data.clear();
                    }
                    p
                })
                .collect(),
            next_page_token: next,
        }))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn delete_vps(&self, req: Request<DeleteVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        let id = VpsId::parse(&req.get_ref().id)?;
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::mark_deleting(c, &caller, &id, now))
            .await?;
        self.ctx.wake.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn start_vps(&self, req: Request<StartVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        Ok(Response::new(
            self.set_power(caller, &req.get_ref().id, DesiredPower::Running, 0, false)
                .await?,
        ))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn stop_vps(&self, req: Request<StopVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
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
            self.set_power(
                caller,
                &r.id,
                DesiredPower::Stopped,
                r.timeout_seconds,
                r.force,
            )
            .await?,
        ))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id, host_id))]
    async fn reboot_vps(&self, req: Request<RebootVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        let r = req.into_inner();
        let id = VpsId::parse(&r.id)?;
        let scope = caller.scope();
        let v = self
            .ctx
            .store
            .run(move |c| vps::get(c, &id, &scope))
            .await?;
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
        let _mark = self.ctx.rebooting.start(v.id);
        client.reboot_vm(call).await.map_err(|s| ApiError::Agent {
            host: host.to_string(),
            message: s.message().to_owned(),
        })?;
        let now = now_ms();
        let institution = v.institution_id.clone().unwrap_or_default();
        let target = v.id.to_string();
        let result = if r.force { "reset" } else { "rebooted" };
        self.ctx
            .store
            .run(move |c| {
                identity::audit(c, &caller, &institution, "vps.reboot", &target, result, now)
            })
            .await?;
        info!(force = r.force, "rebooted");
        Ok(Response::new(v.to_proto()))
    }

    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.ctx.caller(&req).await?.require(Permission::OwnVps)?;
        let images = self.ctx.store.run(|c| hosts::catalogue(c)).await?;
        Ok(Response::new(ListImagesResponse { images }))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn approve_vps(&self, req: Request<ApproveVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::AllVps)?;
        let r = req.into_inner();
        let id = VpsId::parse(&r.id)?;
        let approval = vps::Approval {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_gib: r.disk_gib,
            pin: pin(&r.host_id)?,
            ip_address: r.ip_address,
        };
        let placement = self.ctx.placement();
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::approve(c, &caller, &id, &approval, &placement, now))
            .await?;
        info!(host_id = ?v.host_id, "approved");
        self.ctx.wake.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn reject_vps(&self, req: Request<RejectVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::AllVps)?;
        let r = req.into_inner();
        if r.reason.trim().is_empty() || r.reason.chars().count() > 1000 {
            return Err(ApiError::invalid(
                "reason",
                "is required (at most 1000 characters): the member sees it",
            )
            .into());
        }
        Ok(Response::new(
            self.decide_against(caller, &r.id, VpsState::Rejected, r.reason)
                .await?,
        ))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn resize_vps(&self, req: Request<ResizeVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::AllVps)?;
        let r = req.into_inner();
        let id = VpsId::parse(&r.id)?;
        let size = vps::Approval {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_gib: r.disk_gib,
            pin: None,
            ip_address: String::new(),
        };
        let placement = self.ctx.placement();
        let now = now_ms();
        let v = self
            .ctx
            .store
            .run(move |c| vps::resize(c, &caller, &id, &size, &placement, now))
            .await?;
        self.ctx.wake.notify_one();
        Ok(Response::new(v.to_proto()))
    }

    #[instrument(skip_all, fields(vps_id = %req.get_ref().id))]
    async fn cancel_vps(&self, req: Request<CancelVpsRequest>) -> Result<Response<Vps>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::OwnVps)?;
        let id = req.into_inner().id;
        Ok(Response::new(
            self.decide_against(caller, &id, VpsState::Cancelled, String::new())
                .await?,
        ))
    }
}
