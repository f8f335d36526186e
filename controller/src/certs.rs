//! What the controller knows of the installation's certificates while it
//! runs: which are revoked (the list `betangctl pki revoke` keeps beside the
//! CA, read again when it changes) and when each one it has seen expires
//! (its own, and each host's as the host last presented it), for the metric
//! that warns ahead of an expiry.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use crate::{config::TlsConfig, error::ApiError, pki};

/// How often the revoked list's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Revoked {
    modified: Option<SystemTime>,
    checked: Option<Instant>,
    serials: HashSet<String>,
}

#[derive(Debug, Default)]
pub struct CertWatch {
    revoked_list: Option<PathBuf>,
    revoked: Mutex<Revoked>,
    /// The controller's own certificate: its name and expiry.
    own: Option<(String, i64)>,
    /// Each host's certificate expiry, as last presented.
    hosts: Mutex<BTreeMap<String, i64>>,
}

/// One certificate's expiry, for the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub name: String,
    pub role: &'static str,
    pub not_after_ms: i64,
}

impl CertWatch {
    pub fn new(tls: Option<&TlsConfig>) -> anyhow::Result<Self> {
        let Some(tls) = tls else {
            return Ok(CertWatch::default());
        };
        let pem = std::fs::read(&tls.cert)?;
        let own = x509_parser::pem::parse_x509_pem(&pem)
            .ok()
            .and_then(|(_, p)| pki::not_after_ms(&p.contents))
            .map(|at| (pki::CONTROLLER_NAME.to_owned(), at));
        let watch = CertWatch {
            revoked_list: tls.ca.parent().map(|d| d.join(pki::REVOKED_LIST)),
            own,
            ..CertWatch::default()
        };
        watch.refresh(true);
        Ok(watch)
    }

    /// Refuses a revoked certificate; notes when the host's expires.
    pub fn admit(&self, host: &str, der: &[u8]) -> Result<(), ApiError> {
        self.refresh(false);
        let serial = pki::serial_of(der).unwrap_or_default();
        let revoked = self
            .revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serials
            .contains(&serial);
        if revoked {
            return Err(ApiError::PermissionDenied(format!(
                "certificate {serial} of {host} has been revoked; issue the host a new one \
                 (betangctl pki issue {host})"
            )));
        }
        if let Some(at) = pki::not_after_ms(der) {
            self.hosts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host.to_owned(), at);
        }
        Ok(())
    }

    /// The revoked serials, for the agents (which then refuse a revoked
    /// controller certificate).
    pub fn revoked_serials(&self) -> Vec<String> {
        self.refresh(false);
        let mut v: Vec<String> = self
            .revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serials
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn expiries(&self) -> Vec<Expiry> {
        let mut out: Vec<Expiry> = self
            .own
            .iter()
            .map(|(name, at)| Expiry {
                name: name.clone(),
                role: "controller",
                not_after_ms: *at,
            })
            .collect();
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(hosts.iter().map(|(name, at)| Expiry {
            name: name.clone(),
            role: "host",
            not_after_ms: *at,
        }));
        out
    }

    /// Reads the revoked list again if it changed (looked at every few
    /// seconds, or now when `force`). A list that cannot be read keeps the
    /// serials read before: revoking can only add.
    fn refresh(&self, force: bool) {
        let Some(path) = &self.revoked_list else {
            return;
        };
        let mut r = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        if !force && r.checked.is_some_and(|at| at.elapsed() < RECHECK) {
            return;
        }
        r.checked = Some(Instant::now());
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if !force && modified == r.modified {
            return;
        }
        match pki::read_revoked(path) {
            Ok(serials) => {
                if serials.len() != r.serials.len() {
                    tracing::info!(revoked = serials.len(), list = %path.display(), "revoked certificates read");
                }
                r.serials.extend(serials);
                r.modified = modified;
            }
            Err(e) => {
                tracing::error!(list = %path.display(), error = %e, "cannot read the revoked certificates")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_host_certificate_is_refused_and_expiries_are_known() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = pki::PkiDir(dir.path().to_path_buf());
        pki_dir.init().unwrap();
        let own = pki_dir.issue(pki::CONTROLLER_NAME, &[]).unwrap();
        let host = pki_dir.issue("host-1", &[]).unwrap();
        let der = |path: &std::path::Path| {
            let pem = std::fs::read(path).unwrap();
            x509_parser::pem::parse_x509_pem(&pem).unwrap().1.contents
        };
        let watch = CertWatch::new(Some(&TlsConfig {
            ca: pki_dir.ca_cert(),
            cert: own.cert.clone(),
            key: own.key.clone(),
            user_api: false,
        }))
        .unwrap();
        let host_der = der(&host.cert);
        watch.admit("host-1", &host_der).unwrap();
        let expiries = watch.expiries();
        assert_eq!(
            expiries.iter().map(|e| e.role).collect::<Vec<_>>(),
            ["controller", "host"]
        );
        let in_days = (expiries[1].not_after_ms - crate::now_ms()) / 86_400_000;
        assert!((395..=397).contains(&in_days), "{in_days}");

        let serial = pki_dir.revoke("host-1", 1).unwrap();
        assert_eq!(
            pki_dir.revoke("host-1", 2).unwrap(),
            serial,
            "revoking twice lists it once"
        );
        assert_eq!(
            std::fs::read_to_string(pki_dir.revoked_list())
                .unwrap()
                .lines()
                .count(),
            1
        );
        watch.refresh(true);
        let e = watch.admit("host-1", &host_der).unwrap_err();
        assert!(e.to_string().contains("has been revoked"), "{e}");
        assert_eq!(watch.revoked_serials(), [serial]);
        // A new certificate for the same host is good.
        let renewed = pki_dir.issue("host-1", &[]).unwrap();
        watch.admit("host-1", &der(&renewed.cert)).unwrap();
    }
}
