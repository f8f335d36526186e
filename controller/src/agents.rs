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
        // tonic speaks plaintext to an http:// endpoint whatever TLS is set.
        if self.tls.is_some() && !endpoint.starts_with("https://") {
            return Err(bad("must be https:// under mutual TLS".into()));
        }
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

/// What a person reads about a failed agent call: the agent's own words when
/// it answered, plain words when the call never reached it (a transport
/// error means nothing to an institution's staff).
pub fn plain_reason(host: &HostId, s: &tonic::Status) -> String {
    use tonic::Code::*;
    let msg = s.message();
    let lower = msg.to_ascii_lowercase();
    let transport = [
        "transport error",
        "tcp connect",
        "connection refused",
        "connection reset",
        "error trying to connect",
        "broken pipe",
        "dns error",
        "h2 protocol",
        "operation timed out",
    ]
    .iter()
    .any(|t| lower.contains(t));
    match s.code() {
        DeadlineExceeded => format!("the agent on host {host} did not answer in time"),
        Cancelled if transport || msg.is_empty() => {
            format!("the call to the agent on host {host} was cut off")
        }
        Unavailable | Unknown if transport || msg.is_empty() => {
            format!("the agent on host {host} cannot be reached")
        }
        _ => format!("host {host}: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_read_as_plain_words() {
        let h = HostId::parse("hv-1").unwrap();
        let s = tonic::Status::unavailable("tcp connect error: Connection refused (os error 111)");
        assert_eq!(
            plain_reason(&h, &s),
            "the agent on host hv-1 cannot be reached"
        );
        let s = tonic::Status::deadline_exceeded("Timeout expired");
        assert_eq!(
            plain_reason(&h, &s),
            "the agent on host hv-1 did not answer in time"
        );
        let s =
            tonic::Status::failed_precondition("image debian-12 is not in this host's catalogue");
        assert_eq!(
            plain_reason(&h, &s),
            "host hv-1: image debian-12 is not in this host's catalogue"
        );
    }
}
