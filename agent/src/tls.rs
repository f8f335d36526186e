//! Mutual TLS with the controller: the agent serves only callers holding the
//! controller's certificate from the installation's CA, and proves its own
//! host id to the controller with its certificate.

use anyhow::Context;
use serde::Deserialize;
use std::path::PathBuf;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use betang_proto::v1::CONTROLLER_NAME;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    /// This host's certificate, naming its host id (`betangctl pki issue <host id>`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Identity,
}

impl Tls {
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<Tls> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(Tls {
            ca: Certificate::from_pem(read(&cfg.ca)?),
            identity: Identity::from_pem(read(&cfg.cert)?, read(&cfg.key)?),
        })
    }

    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(CONTROLLER_NAME)
    }
}

/// The first DNS name in the peer's certificate, which the TLS layer has
/// already checked against the installation's CA.
fn peer_name(req: &tonic::Request<()>) -> Option<String> {
    let certs = req.peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    })
}

/// Serials (lowercase hex) of the installation's revoked certificates, as
/// the controller last listed them.
#[derive(Debug, Default)]
pub struct Revoked(std::sync::RwLock<std::collections::HashSet<String>>);

impl Revoked {
    pub fn replace(&self, serials: Vec<String>) {
        let mut set = self.0.write().unwrap_or_else(|p| p.into_inner());
        if set.len() != serials.len() {
            tracing::info!(
                revoked = serials.len(),
                "revoked certificates from the controller"
            );
        }
        *set = serials.into_iter().collect();
    }

    fn holds(&self, req: &tonic::Request<()>) -> Option<String> {
        let der = req.peer_certs()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.first()?.as_ref()).ok()?;
        let serial: String = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&serial)
            .then_some(serial)
    }
}

/// Interceptor: only the controller may call the agent, and not with a
/// revoked certificate.
pub fn only_controller(
    revoked: &Revoked,
    req: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(serial) = revoked.holds(&req) {
        return Err(tonic::Status::permission_denied(format!(
            "certificate {serial} has been revoked"
        )));
    }
    match peer_name(&req) {
        Some(n) if n == CONTROLLER_NAME => Ok(req),
        Some(n) => Err(tonic::Status::permission_denied(format!(
            "only {CONTROLLER_NAME} may call this agent, not {n}"
        ))),
        None => Err(tonic::Status::unauthenticated(
            "a client certificate is required",
        )),
    }
}
