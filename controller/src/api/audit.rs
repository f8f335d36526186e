use betang_proto::v1::{ListAuditRequest, ListAuditResponse, audit_service_server::AuditService};
use tonic::{Request, Response, Status};

use super::{Ctx, page_after, page_size};
use crate::{auth::Permission, error::ApiError, store::identity};

pub struct AuditApi {
    pub ctx: Ctx,
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.ctx
            .caller(&req)
            .await?
            .require(Permission::ViewAudit)?;
        let r = req.into_inner();
        let size = page_size(r.page_size, 100, 1000)?;
        for (field, v) in [("since_ms", r.since_ms), ("until_ms", r.until_ms)] {
            if v < 0 {
                return Err(
                    ApiError::invalid(field, "must be Unix milliseconds, not negative").into(),
                );
            }
        }
        let institution = r.institution_id.clone();
        let institution_id = if institution.is_empty() {
            String::new()
        } else {
            self.ctx
                .store
                .run(move |c| identity::institution_id_of(c, &institution))
                .await?
        };
        let filter = identity::AuditFilter {
            institution_id,
            actor_user_id: r.actor_user_id,
            action: r.action,
            target: r.target,
            since_ms: r.since_ms,
            until_ms: r.until_ms,
            after_id: page_after(&r.page_token)?,
            limit: size + 1,
        };
        let mut records = self
            .ctx
            .store
            .run(move |c| identity::list_audit(c, &filter))
            .await?;
        let next = if records.len() > size as usize {
            records.truncate(size as usize);
            records.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListAuditResponse {
            records,
            next_page_token: next,
        }))
    }
}
