use betang_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, RegisterHostRequest, RegisterHostResponse,
    registry_service_server::RegistryService,
};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::Ctx;
use crate::{error::ApiError, ids::HostId, now_ms, pki, store::hosts};

pub struct RegistryApi {
    pub ctx: Ctx,
    /// Agents present certificates; each may speak only for its own host.
    pub mutual_tls: bool,
}

type PeerCerts = Option<std::sync::Arc<Vec<tonic::transport::CertificateDer<'static>>>>;

impl RegistryApi {
    fn check_peer(&self, host: &HostId, peer: &PeerCerts) -> Result<(), ApiError> {
        if !self.mutual_tls {
            return Ok(());
        }
        let name = peer.as_deref().and_then(|c| pki::peer_name(c));
        match name {
            Some(n) if n == host.as_str() => {
                let der = peer.as_deref().and_then(|c| c.first());
                self.ctx
                    .certs
                    .admit(host.as_str(), der.map_or(&[][..], |d| d.as_ref()))
            }
            Some(n) => Err(ApiError::PermissionDenied(format!(
                "this certificate is for {n}, not for host {host}"
            ))),
            None => Err(ApiError::Unauthenticated(
                "agents must present a client certificate".into(),
            )),
        }
    }
}

/// An agent's endpoint: a URL, and `https://` under mutual TLS, since the
/// controller would otherwise send user-data, keys and disks to it in clear.
fn check_endpoint(e: &str, mutual_tls: bool) -> Result<(), ApiError> {
    let ok = (e.starts_with("http://") || e.starts_with("https://"))
        && e.len() <= 255
        && e.parse::<tonic::transport::Uri>().is_ok();
    if !ok {
        return Err(ApiError::invalid(
            "agent_endpoint",
            "must be an http:// or https:// URL",
        ));
    }
    if mutual_tls && !e.starts_with("https://") {
        return Err(ApiError::invalid(
            "agent_endpoint",
            format!("{e:?} must be https:// under mutual TLS"),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    #[instrument(skip_all, fields(host_id))]
    async fn register_host(
        &self,
        req: Request<RegisterHostRequest>,
    ) -> Result<Response<RegisterHostResponse>, Status> {
        let peer = req.peer_certs();
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| ApiError::invalid("info", "is required"))?;
        let host = HostId::parse(&info.host_id)?;
        tracing::Span::current().record("host_id", info.host_id.as_str());
        self.check_peer(&host, &peer)?;
        check_endpoint(&r.agent_endpoint, self.mutual_tls)?;
        for img in &info.images {
            crate::validation::image(&img.name)?;
        }
        crate::validation::placement(&betang_proto::v1::PlacementRequest {
            zone: info.zone.clone(),
            host_labels: info.labels.clone(),
            anti_affinity_group: String::new(),
        })?;
        let now = now_ms();
        let endpoint = r.agent_endpoint.clone();
        self.ctx
            .store
            .run(move |c| hosts::register(c, &info, &endpoint, now))
            .await?;
        info!(endpoint = %r.agent_endpoint, "host registered");
        // A returning host may have work waiting.
        self.ctx.wake.notify_one();
        Ok(Response::new(RegisterHostResponse {
            heartbeat_interval_ms: self.ctx.cfg.heartbeat_interval_ms,
            revoked_serials: self.ctx.certs.revoked_serials(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = req.peer_certs();
        let r = req.into_inner();
        let host = HostId::parse(&r.host_id)?;
        self.check_peer(&host, &peer)?;
        let (now, usage_every) = (now_ms(), self.ctx.cfg.usage_interval_ms as i64);
        // The next heartbeat says it all again: no flush of its own.
        self.ctx
            .store
            .run_relaxed(move |db| {
                hosts::heartbeat(db, &host, &r, usage_every, now)?;
                db.hosts.beat(&host, now);
                Ok(())
            })
            .await?;
        Ok(Response::new(HeartbeatResponse {
            revoked_serials: self.ctx.certs.revoked_serials(),
        }))
    }
}
