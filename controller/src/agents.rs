//! gRPC clients for the agents, one lazily connected channel per host, under
//! mutual TLS when the controller has its certificates.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use betang_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::{error::ApiError, ids::HostId, tls::Tls};

#[derive(Default)]
pub struct AgentClients {
    channels: Mutex<HashMap<HostId, (String, Channel)>>,
    tls: Option<Tls>,
}

impl AgentClients {
    pub fn new(tls: Option<Tls>) -> Self {
        AgentClients {
            channels: Mutex::default(),
            tls,
        }
    }

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
        let bad = |e: String| ApiError::Agent {
            host: host.to_string(),
            message: format!("endpoint {endpoint:?}: {e}"),
        };
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.agent_client(host))
                .map_err(|e| bad(e.to_string()))?;
        }
        let ch = ep.connect_lazy();
        map.insert(host.clone(), (endpoint.to_owned(), ch.clone()));
        Ok(AgentServiceClient::new(ch))
    }
}
