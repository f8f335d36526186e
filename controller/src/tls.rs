//! Loading the controller's TLS material and turning it into tonic configs.

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{config::TlsConfig, ids::HostId};

#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Identity,
    pub user_api: bool,
}

impl Tls {
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<Tls> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(Tls {
            ca: Certificate::from_pem(read(&cfg.ca)?),
            identity: Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?),
            user_api: cfg.user_api,
        })
    }

    /// Agents must present a certificate from the installation's CA.
    pub fn agent_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    pub fn user_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone())
    }

    /// Calls to an agent trust only the installation's CA and only a
    /// certificate naming that host.
    pub fn agent_client(&self, host: &HostId) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(host.as_str())
    }
}
