//! gRPC clients for the agents, one lazily connected channel per host.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use betang_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::{error::ApiError, ids::HostId};

#[derive(Default)]
pub struct AgentClients {
    channels: Mutex<HashMap<HostId, (String, Channel)>>,
}

impl AgentClients {
    pub fn client(
        &self,
        host: &HostId,
        endpoint: &str,
    ) -> Result<AgentServiceClient<Channel>, ApiError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ep, ch)) = map.get(host)
            && ep == endpoint
        {
            return Ok(AgentServiceClient::new(ch.clone()));
        }
        let ch = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| ApiError::Agent {
                host: host.to_string(),
                message: format!("bad endpoint {endpoint:?}: {e}"),
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .connect_lazy();
        map.insert(host.clone(), (endpoint.to_owned(), ch.clone()));
        Ok(AgentServiceClient::new(ch))
    }
}
