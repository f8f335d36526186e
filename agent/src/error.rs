//! The agent's typed errors and their one translation into gRPC statuses.

use crate::names::NameError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{field}: {rule}")]
    InvalidArgument { field: &'static str, rule: String },
    #[error("image {0:?} is not in this host's catalogue")]
    UnknownImage(String),
    #[error("no VM for VPS {0} on this host")]
    NoSuchVm(String),
    #[error("VPS {vps_id}: {rule}")]
    WrongState { vps_id: String, rule: &'static str },
    /// libvirt did not answer, was busy or lost its connection: worth
    /// trying again.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// libvirt refused what it was asked (an invalid definition, something
    /// unsupported, a missing file): trying again would not help.
    #[error("libvirt refused: {0}")]
    LibvirtRefused(String),
    /// A disk that is already there does not match what the VPS was built
    /// on, or cannot be read. It is kept as it is, and nothing may clean it up.
    #[error("the disk {path} was kept, not used: {what}; an operator must decide")]
    DiskMismatch { path: String, what: String },
    /// The catalogue's image of that name is not the content the VPS was
    /// built on (or asks for).
    #[error(
        "image {image} on this host is now sha256 {have} ({file}); this VPS was built on sha256 {want}"
    )]
    ImageChanged {
        image: String,
        have: String,
        want: String,
        file: String,
    },
    #[error("libvirt did not answer within {0:?}")]
    HypervisorTimeout(std::time::Duration),
    #[error("disk: {0}")]
    Disk(String),
    #[error("seed: {0}")]
    Seed(String),
    #[error("domain XML: {0}")]
    Xml(String),
    #[error("I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal: {0}")]
    Internal(String),
}

impl AgentError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AgentError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

pub use betang_proto::v1::DISK_KEPT_METADATA;

impl From<virt::error::Error> for AgentError {
    fn from(e: virt::error::Error) -> Self {
        let message = e.message().to_owned();
        if libvirt_error_is_transient(e.code()) {
            AgentError::Libvirt(message)
        } else {
            AgentError::LibvirtRefused(message)
        }
    }
}

/// Whether libvirt's error says "not now" (the daemon, a guest or a lock did
/// not answer) rather than "never" (the request itself is wrong). Unknown
/// codes count as transient: a retry costs little, a wrong ERROR costs a
/// person's time.
fn libvirt_error_is_transient(code: virt::error::ErrorNumberEnum) -> bool {
    use virt::error::ErrorNumber::*;
    match code {
        virt::enumutil::Enum::Known(n) => !matches!(
            n,
            XmlError
                | XmlDetail
                | ConfigUnsupported
                | NoSupport
                | InvalidArg
                | NoStorageVolume
                | NoStoragePool
                | NoNetwork
                | NoSecurityModel
                | OperationUnsupported
                | InvalidDomain
                | InvalidNetwork
                | DomExist
                | MultipleInterfaces
                | BuildFirewall
        ),
        virt::enumutil::Enum::Unknown(_) => true,
    }
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        let msg = e.to_string();
        match e {
            AgentError::InvalidName(_) | AgentError::InvalidArgument { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            AgentError::UnknownImage(_)
            | AgentError::WrongState { .. }
            | AgentError::ImageChanged { .. }
            | AgentError::LibvirtRefused(_) => tonic::Status::failed_precondition(msg),
            AgentError::DiskMismatch { .. } => {
                let mut s = tonic::Status::failed_precondition(msg);
                s.metadata_mut().insert(
                    DISK_KEPT_METADATA,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                s
            }
            AgentError::NoSuchVm(_) => tonic::Status::not_found(msg),
            AgentError::HypervisorTimeout(_) => tonic::Status::deadline_exceeded(msg),
            AgentError::Libvirt(_) => tonic::Status::unavailable(msg),
            AgentError::Disk(_)
            | AgentError::Seed(_)
            | AgentError::Xml(_)
            | AgentError::Io { .. }
            | AgentError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use virt::error::{ErrorNumber, ErrorNumberEnum};

    #[test]
    fn libvirt_errors_are_permanent_or_transient() {
        for code in [
            ErrorNumber::XmlError,
            ErrorNumber::ConfigUnsupported,
            ErrorNumber::NoSupport,
            ErrorNumber::InvalidArg,
            ErrorNumber::NoStorageVolume,
        ] {
            assert!(
                !libvirt_error_is_transient(ErrorNumberEnum::from(code)),
                "{code:?}"
            );
        }
        for code in [
            ErrorNumber::NoConnect,
            ErrorNumber::Rpc,
            ErrorNumber::OperationTimeout,
            ErrorNumber::AgentUnresponsive,
            ErrorNumber::ResourceBusy,
            ErrorNumber::SystemError,
            ErrorNumber::NoDomain,
        ] {
            assert!(
                libvirt_error_is_transient(ErrorNumberEnum::from(code)),
                "{code:?}"
            );
        }
        let code = |e: AgentError| tonic::Status::from(e).code();
        assert_eq!(
            code(AgentError::Libvirt("busy".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(AgentError::LibvirtRefused("bad XML".into())),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn a_kept_disk_says_so_to_the_controller() {
        let s = tonic::Status::from(AgentError::DiskMismatch {
            path: "/v/x/root.qcow2".into(),
            what: "it is based on /i/b.qcow2".into(),
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.metadata().contains_key(DISK_KEPT_METADATA));
        assert!(
            s.message().contains("/v/x/root.qcow2 was kept"),
            "{}",
            s.message()
        );
        let s = tonic::Status::from(AgentError::UnknownImage("x".into()));
        assert!(!s.metadata().contains_key(DISK_KEPT_METADATA));
    }
}
