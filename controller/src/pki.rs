//! The installation's small PKI for mutual TLS between the controller and the
//! agents: one CA, one certificate per host whose DNS name is the host id, and
//! one for the controller named `betang-controller`. Issuing again renews.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub use betang_proto::v1::CONTROLLER_NAME;
const CA_DAYS: u64 = 3650;
const LEAF_DAYS: u64 = 397;

pub struct PkiDir(pub PathBuf);

/// Paths of one certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PkiDir {
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.0.join("ca-key.pem")
    }
    pub fn files(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.0.join(format!("{name}.pem")),
            key: self.0.join(format!("{name}-key.pem")),
        }
    }

    /// Creates the CA unless it exists. Returns whether it was created.
    pub fn init(&self) -> anyhow::Result<bool> {
        if self.ca_cert().exists() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.0)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, "Betang installation CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p, CA_DAYS);
        let cert = p.self_signed(&key)?;
        write_private(&self.ca_key(), &key.serialize_pem())?;
        write_public(&self.ca_cert(), &cert.pem())?;
        Ok(true)
    }

    /// Issues (or renews) a certificate for `name`, usable as both TLS server
    /// and client; `name` must be a host id or `betang-controller`.
    pub fn issue(&self, name: &str, extra_sans: &[String]) -> anyhow::Result<CertFiles> {
        check_name(name)?;
        let ca_pem = std::fs::read_to_string(self.ca_cert()).with_context(|| {
            format!(
                "no CA in {}; run `betangctl pki init` first",
                self.0.display()
            )
        })?;
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.ca_key())?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut sans = vec![name.to_owned()];
        sans.extend(extra_sans.iter().cloned());
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        for s in &sans {
            p.subject_alt_names
                .push(match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(s.clone().try_into()?),
                });
        }
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p, LEAF_DAYS);
        let cert = p.signed_by(&key, &issuer)?;
        let files = self.files(name);
        write_private(&files.key, &key.serialize_pem())?;
        write_public(&files.cert, &cert.pem())?;
        Ok(files)
    }

    /// The certificates revoked so far, beside the CA: one line each,
    /// `SERIAL NAME REVOKED_AT_MS`, the serial in lowercase hex. The
    /// controller reads it again whenever it changes.
    pub fn revoked_list(&self) -> PathBuf {
        self.0.join(REVOKED_LIST)
    }

    /// Revokes the certificate now in `NAME.pem` (a retired host, a key that
    /// got out). Answers its serial. Issuing again gives a new one.
    pub fn revoke(&self, name: &str, now_ms: i64) -> anyhow::Result<String> {
        check_name(name)?;
        let files = self.files(name);
        let pem = std::fs::read(&files.cert)
            .with_context(|| format!("no certificate {}", files.cert.display()))?;
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?;
        let serial = serial_of(&p.contents)
            .with_context(|| format!("{}: not a certificate", files.cert.display()))?;
        let list = self.revoked_list();
        let mut text = match std::fs::read_to_string(&list) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", list.display())),
        };
        if !text
            .lines()
            .any(|l| l.split_whitespace().next() == Some(serial.as_str()))
        {
            text.push_str(&format!("{serial} {name} {now_ms}\n"));
            write_public(&list, &text)?;
        }
        Ok(serial)
    }
}

/// The revoked list's file name, beside `ca.pem`.
pub const REVOKED_LIST: &str = "revoked.txt";

/// A certificate's serial (DER), lowercase hex, as the revoked list has it.
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// When a certificate (DER) expires, in ms since the epoch.
pub fn not_after_ms(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() * 1000)
}

/// The serials in a revoked list.
pub fn read_revoked(path: &Path) -> std::io::Result<std::collections::HashSet<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| !s.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn validity(p: &mut CertificateParams, days: u64) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(3600);
    p.not_after = now + Duration::from_secs(days * 86_400);
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !ok {
        bail!("name: {name:?} must be a host id (a-z, 0-9, '-') or {CONTROLLER_NAME}");
    }
    Ok(())
}

fn write_private(path: &Path, pem: &str) -> anyhow::Result<()> {
    write_atomic(path, pem, 0o600)
}

fn write_public(path: &Path, pem: &str) -> anyhow::Result<()> {
    write_atomic(path, pem, 0o644)
}

/// Writes under a temporary name with `mode` (whatever a file left there
/// had), flushes, then renames: a reader sees the old file or the new one,
/// never half of one, and a key is never readable by others, even briefly.
fn write_atomic(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{OpenOptionsExt, PermissionsExt},
    };
    let part = path.with_extension("part");
    let _ = std::fs::remove_file(&part);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&part)
        .with_context(|| format!("writing {}", part.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&part, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The identity a peer's certificate names: its first DNS subject alternative
/// name. The TLS layer has already checked that the installation's CA signed it.
pub fn peer_name(certs: &[tonic::transport::CertificateDer<'static>]) -> Option<String> {
    let first = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_certificates_naming_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir(dir.path().to_path_buf());
        assert!(pki.init().unwrap());
        assert!(!pki.init().unwrap(), "init twice keeps the CA");
        let files = pki.issue("host-7", &["127.0.0.1".into()]).unwrap();
        let pem = std::fs::read(&files.cert).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(peer_name(&[der]).as_deref(), Some("host-7"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(pki.issue("../etc", &[]).is_err());
        // A renewal over a key someone made readable puts it back to 0600,
        // and leaves no temporary file behind.
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let again = pki.issue("host-7", &[]).unwrap();
        let mode = std::fs::metadata(&again.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(std::fs::read(&again.cert).unwrap(), pem, "renewed");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(leftovers.is_empty());
    }

    fn rustls_pemfile_der(pem: &[u8]) -> tonic::transport::CertificateDer<'static> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).unwrap();
        tonic::transport::CertificateDer::from(p.contents)
    }
}
