//! The gRPC services. Handlers authenticate the caller, validate, call the
//! store, wake the reconciler, and translate errors once through
//! `From<ApiError> for Status`.

pub mod audit;
pub mod console;
pub mod hosts;
pub mod identity;
pub mod networks;
pub mod registry;
pub mod vps;

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;

use crate::{
    agents::AgentClients,
    auth::{self, Caller},
    config::ControllerConfig,
    error::ApiError,
    now_ms,
    store::Store,
};

/// What every service needs.
#[derive(Clone)]
pub struct Ctx {
    pub store: Store,
    pub wake: Arc<Notify>,
    pub agents: Arc<AgentClients>,
    pub cfg: Arc<ControllerConfig>,
    /// Wakes the mover when a move is recorded.
    pub moves: Arc<Notify>,
    /// VPS whose reboot an agent is carrying out now, shown as "rebooting".
    pub rebooting: Arc<Rebooting>,
    /// Each token's request budget.
    pub limits: Arc<crate::limits::RateLimits>,
    /// Revoked certificates and when those seen expire.
    pub certs: Arc<crate::certs::CertWatch>,
    /// Who types on each VPS's console.
    pub consoles: Arc<crate::console::Consoles>,
}

/// The VPS being rebooted: a reboot is one call to the agent, so this is
/// kept in memory for as long as the call lasts.
#[derive(Debug, Default)]
pub struct Rebooting(std::sync::Mutex<std::collections::HashSet<crate::ids::VpsId>>);

impl Rebooting {
    /// Marks `id` until the returned guard is dropped (the call answered,
    /// failed or was cancelled).
    pub fn start(self: &Arc<Self>, id: crate::ids::VpsId) -> RebootMark {
        self.lock().insert(id);
        RebootMark(self.clone(), id)
    }

    pub fn contains(&self, id: &crate::ids::VpsId) -> bool {
        self.lock().contains(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<crate::ids::VpsId>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct RebootMark(Arc<Rebooting>, crate::ids::VpsId);

impl Drop for RebootMark {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

impl Ctx {
    pub fn down_after_ms(&self) -> i64 {
        self.cfg.host_down_after_ms as i64
    }

    /// The scheduler's settings, as every placement and move uses them.
    pub fn placement(&self) -> crate::store::vps::Placement {
        crate::store::vps::Placement {
            ratios: self.cfg.overcommit,
            policy: self.cfg.placement,
            down_after_ms: self.down_after_ms(),
            max_pending: self.cfg.max_pending_requests,
        }
    }

    /// A host as operators see it, with what may be placed on it.
    pub fn shown(&self, mut h: betang_proto::v1::Host) -> betang_proto::v1::Host {
        h.allocatable = h
            .capacity
            .map(|c| crate::scheduler::allocatable(&c, &self.cfg.overcommit, &self.cfg.placement));
        h
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// The caller behind the request's bearer token.
    pub async fn caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        let secret = auth::bearer(req.metadata())?;
        let now = now_ms();
        let caller = self.store.caller(&secret, now).await?;
        let hash = auth::hash_secret(&secret);
        self.limits.check(&hash)?;
        let from = req
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        self.store.note_token_use(hash, from, now);
        Ok(caller)
    }
}

/// Turns a `page_token` into the last id seen.
pub fn page_after(token: &str) -> Result<i64, ApiError> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse()
        .ok()
        .filter(|n: &i64| *n >= 0)
        .ok_or_else(|| ApiError::invalid("page_token", "is not a token from a previous page"))
}

/// 1..=`max`, 0 meaning `default`.
pub fn page_size(n: u32, default: u32, max: u32) -> Result<u32, ApiError> {
    match n {
        0 => Ok(default),
        n if n > max => Err(ApiError::invalid(
            "page_size",
            format!("must be at most {max}, got {n}"),
        )),
        n => Ok(n),
    }
}
