//! The gRPC services. Handlers validate, call the store, wake the reconciler,
//! and translate errors once through `From<ApiError> for Status`.

pub mod hosts;
pub mod registry;
pub mod vps;

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;

use crate::{agents::AgentClients, config::ControllerConfig, store::Store};

/// What every service needs.
#[derive(Clone)]
pub struct Ctx {
    pub store: Store,
    pub wake: Arc<Notify>,
    pub agents: Arc<AgentClients>,
    pub cfg: Arc<ControllerConfig>,
}

impl Ctx {
    pub fn down_after_ms(&self) -> i64 {
        self.cfg.host_down_after_ms as i64
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}
