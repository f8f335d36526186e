use betang_proto::v1::{
    CreateInstitutionRequest, CreateInvitationRequest, CreateTokenRequest, CreateUserRequest,
    CreatedToken, GetInstitutionRequest, Institution, Invitation, ListInstitutionsRequest,
    ListInstitutionsResponse, ListTokensRequest, ListTokensResponse, ListUsersRequest,
    ListUsersResponse, RevokeTokenRequest, SetEnabledRequest, SetQuotaRequest, Token, User,
    WhoAmIRequest, identity_service_server::IdentityService,
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::Ctx;
use crate::{
    auth::{Permission, Role},
    error::ApiError,
    now_ms,
    store::{identity, portal},
};

pub struct IdentityApi {
    pub ctx: Ctx,
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<User>, Status> {
        let caller = self.ctx.caller(&req).await?;
        let u = self
            .ctx
            .store
            .run(move |c| identity::get_user(c, &caller.user_id))
            .await?;
        Ok(Response::new(u))
    }

    async fn create_institution(
        &self,
        req: Request<CreateInstitutionRequest>,
    ) -> Result<Response<Institution>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageInstitutions)?;
        let r = req.into_inner();
        let n = identity::NewInstitution {
            code: r.code,
            name: r.name,
            contact_name: r.contact_name,
            contact_email: r.contact_email,
            contact_phone: r.contact_phone,
            // Left out, every limit would be 0 and nothing could ever be
            // approved: the limits are asked for (0 is allowed, and means none).
            quota: r.quota.ok_or_else(|| {
                ApiError::invalid(
                    "quota",
                    "give the institution's limits: vcpus, memory_mib, disk_gib and vps_count \
                     (0 means none of it)",
                )
            })?,
        };
        let now = now_ms();
        let inst = self
            .ctx
            .store
            .run(move |c| identity::create_institution(c, &caller, &n, now))
            .await?;
        info!(institution = %inst.code, "institution created");
        Ok(Response::new(inst))
    }

    async fn list_institutions(
        &self,
        req: Request<ListInstitutionsRequest>,
    ) -> Result<Response<ListInstitutionsResponse>, Status> {
        let caller = self.ctx.caller(&req).await?;
        let mut all = self
            .ctx
            .store
            .run(|c| identity::list_institutions(c))
            .await?;
        // Members see their own institution, with its quota and use.
        if caller.require(Permission::ViewInstitutions).is_err() {
            all.retain(|i| i.id == caller.institution_id);
        }
        Ok(Response::new(ListInstitutionsResponse {
            institutions: all,
        }))
    }

    async fn get_institution(
        &self,
        req: Request<GetInstitutionRequest>,
    ) -> Result<Response<Institution>, Status> {
        let caller = self.ctx.caller(&req).await?;
        let asked = req.into_inner().id;
        // By id or by code; another institution is not found for a member,
        // whether it exists or not.
        let named = asked.clone();
        let id = self
            .ctx
            .store
            .run(move |c| identity::institution_id_of(c, &named))
            .await?;
        if caller.require(Permission::ViewInstitutions).is_err() && id != caller.institution_id {
            return Err(ApiError::NotFound {
                what: "institution",
                id: asked,
            }
            .into());
        }
        let inst = self
            .ctx
            .store
            .run(move |c| identity::get_institution(c, &id))
            .await?;
        Ok(Response::new(inst))
    }

    async fn set_quota(
        &self,
        req: Request<SetQuotaRequest>,
    ) -> Result<Response<Institution>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::SetQuota)?;
        let r = req.into_inner();
        let change = match (r.change, r.quota) {
            (Some(ch), None) => ch,
            (None, Some(q)) => identity::whole(&q),
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "quota",
                    "give either the whole quota or the change, not both",
                )
                .into());
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "change",
                    "name at least one limit to set: vcpus, memory_mib, disk_gib or vps_count",
                )
                .into());
            }
        };
        if change.vcpus.is_none()
            && change.memory_mib.is_none()
            && change.disk_gib.is_none()
            && change.vps_count.is_none()
        {
            return Err(ApiError::invalid(
                "change",
                "name at least one limit to set: vcpus, memory_mib, disk_gib or vps_count",
            )
            .into());
        }
        let now = now_ms();
        let inst = self
            .ctx
            .store
            .run(move |c| {
                let id = identity::institution_id_of(c, &r.institution_id)?;
                identity::set_quota(c, &caller, &id, &change, now)
            })
            .await?;
        Ok(Response::new(inst))
    }

    async fn create_user(&self, req: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageUsers)?;
        let r = req.into_inner();
        let role = Role::from_proto(r.role)
            .ok_or_else(|| ApiError::invalid("role", "must be member, operator or admin"))?;
        let n = identity::NewUser {
            username: r.username,
            full_name: r.full_name,
            email: r.email,
            institution_id: r.institution_id,
            role,
        };
        let now = now_ms();
        let u = self
            .ctx
            .store
            .run(move |c| identity::create_user(c, &caller, &n, now))
            .await?;
        Ok(Response::new(u))
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ViewInstitutions)?;
        let inst = req.into_inner().institution_id;
        let users = self
            .ctx
            .store
            .run(move |c| identity::list_users(c, &inst))
            .await?;
        Ok(Response::new(ListUsersResponse { users }))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreatedToken>, Status> {
        let caller = self.ctx.caller(&req).await?;
        let r = req.into_inner();
        let user_id = if r.user_id.is_empty() || r.user_id == caller.user_id {
            caller.user_id.clone()
        } else {
            caller.require(Permission::ManageAllTokens)?;
            r.user_id
        };
        let (now, max_days) = (now_ms(), self.ctx.cfg.max_token_lifetime_days);
        let (token, secret) = self
            .ctx
            .store
            .run(move |c| {
                identity::create_token(c, &caller, &user_id, &r.name, r.ttl_seconds, max_days, now)
            })
            .await?;
        Ok(Response::new(CreatedToken {
            token: Some(token),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let caller = self.ctx.caller(&req).await?;
        let r = req.into_inner();
        let user_id = if r.user_id == caller.user_id
            || (r.user_id.is_empty() && caller.require(Permission::ManageAllTokens).is_err())
        {
            caller.user_id.clone()
        } else {
            caller.require(Permission::ManageAllTokens)?;
            r.user_id
        };
        let tokens = self
            .ctx
            .store
            .run(move |c| identity::list_tokens(c, &user_id))
            .await?;
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn set_user_enabled(
        &self,
        req: Request<SetEnabledRequest>,
    ) -> Result<Response<User>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageUsers)?;
        let (r, now) = (req.into_inner(), now_ms());
        let user = self
            .ctx
            .store
            .run(move |c| identity::set_user_enabled(c, &caller, &r.id, r.enabled, now))
            .await?;
        Ok(Response::new(user))
    }

    async fn create_invitation(
        &self,
        req: Request<CreateInvitationRequest>,
    ) -> Result<Response<Invitation>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageUsers)?;
        let (r, now) = (req.into_inner(), now_ms());
        let (user, secret) = self
            .ctx
            .store
            .run(move |c| {
                let id = identity::user_id_of(c, &r.user)?;
                portal::create_invitation(c, &caller, &id, now)
            })
            .await?;
        let link = match self.ctx.cfg.portal_url.trim_end_matches('/') {
            "" => String::new(),
            base => format!("{base}/invite/{secret}"),
        };
        Ok(Response::new(Invitation {
            user: Some(user),
            secret,
            link,
            expires_at_ms: now + portal::INVITATION_HOURS * 3_600_000,
        }))
    }

    async fn set_institution_enabled(
        &self,
        req: Request<SetEnabledRequest>,
    ) -> Result<Response<Institution>, Status> {
        let caller = self.ctx.caller(&req).await?;
        caller.require(Permission::ManageInstitutions)?;
        let (r, now) = (req.into_inner(), now_ms());
        let inst = self
            .ctx
            .store
            .run(move |c| identity::set_institution_enabled(c, &caller, &r.id, r.enabled, now))
            .await?;
        Ok(Response::new(inst))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<Token>, Status> {
        let caller = self.ctx.caller(&req).await?;
        let id = req.into_inner().id;
        let now = now_ms();
        let t = self
            .ctx
            .store
            .run(move |c| identity::revoke_token(c, &caller, &id, now))
            .await?;
        Ok(Response::new(t))
    }
}
