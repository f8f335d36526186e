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
    /// A VM was being defined on a disk that was already there, and a later
    /// step failed. The disk stays as it is; the status says so, so that the
    /// controller's cleanup after a failed build does not remove it.
    #[error("{source}; the disk {path} that was already there is kept")]
    KeptDisk {
        path: String,
        #[source]
        source: Box<AgentError>,
    },
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
    /// libvirtd itself does not answer (a call that never waits on a guest
    /// has been running this long); calls are refused until it does.
    #[error("libvirt has not answered for {} s", .0.as_secs())]
    HypervisorSilent(std::time::Duration),
    /// The guest's QEMU has not answered its monitor for a while (hung or
    /// stopped); only what does not need its answer may be done.
    #[error(
        "the guest of VPS {vps_id} has not answered for {} s; only a forced stop or a delete can act on it now",
        .silent_for.as_secs()
    )]
    GuestNotAnswering {
        vps_id: String,
        silent_for: std::time::Duration,
    },
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
        libvirt_error(&e, Asked::Other)
    }
}

/// What libvirt was asked when it failed; the same code can mean "not now"
/// for one call and "never" for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// Defining a domain from its XML.
    Define,
    Other,
}

/// libvirt's error as the agent reports it: transient (`Libvirt`) or
/// permanent (`LibvirtRefused`), with libvirt's own words.
pub fn libvirt_error(e: &virt::error::Error, asked: Asked) -> AgentError {
    let message = e.message().to_owned();
    if libvirt_error_is_transient(e.code(), e.domain(), asked) {
        AgentError::Libvirt(message)
    } else {
        AgentError::LibvirtRefused(message)
    }
}

/// Whether libvirt's error says "not now" (the daemon, a guest or a lock did
/// not answer) rather than "never" (the request itself is wrong). Codes not
/// named here count as transient: a retry costs little, a wrong ERROR costs a
/// person's time.
fn libvirt_error_is_transient(
    code: virt::error::ErrorNumberEnum,
    from: virt::error::ErrorDomainEnum,
    asked: Asked,
) -> bool {
    use virt::error::{ErrorDomain, ErrorNumber::*};
    let virt::enumutil::Enum::Known(code) = code else {
        return true;
    };
    match code {
        // The connection to the daemon, or something the daemon waits on.
        NoConnect | InvalidConn | Rpc | GnutlsError | AuthUnavailable | OperationTimeout
        | AgentUnresponsive | AgentCommandTimeout | OperationInvalid | ResourceBusy
        | BlockCopyActive | OperationAborted | NoDomain | InternalError | NoMemory => true,
        // A system call failed: on the way to the daemon it is worth another
        // try; a storage file that cannot be opened is still missing next time.
        SystemError => !matches!(from, virt::enumutil::Enum::Known(ErrorDomain::Storage)),
        // At define time "operation failed" is the definition refused (its
        // name or UUID taken by another domain, say); elsewhere it may be a
        // guest that did not come up in time.
        OperationFailed => asked != Asked::Define,
        XmlError | XmlDetail | XmlInvalidSchema | ConfigUnsupported | NoSupport
        | ArgumentUnsupported | OperationUnsupported | InvalidArg | InvalidDomain
        | InvalidNetwork | InvalidMac | NoStorageVolume | NoStoragePool | NoNetwork
        | NoSecurityModel | DomExist | NetworkExist | StorageVolExist | MultipleInterfaces
        | MultipleDomains | BuildFirewall | OsType | NoKernel | NoRoot | NoSource | NoTarget
        | NoName | NoOs | NoDevice | DeviceMissing | CpuIncompatible | OperationDenied
        | AccessDenied | AuthFailed | Overflow => false,
        _ => true,
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
            AgentError::DiskMismatch { .. } => disk_kept(tonic::Status::failed_precondition(msg)),
            // Retried or not as the failure underneath says; either way the
            // disk is not cleaned up after.
            AgentError::KeptDisk { source, .. } => {
                disk_kept(tonic::Status::new(tonic::Status::from(*source).code(), msg))
            }
            AgentError::NoSuchVm(_) => tonic::Status::not_found(msg),
            AgentError::HypervisorTimeout(_) => tonic::Status::deadline_exceeded(msg),
            AgentError::Libvirt(_)
            | AgentError::HypervisorSilent(_)
            | AgentError::GuestNotAnswering { .. } => tonic::Status::unavailable(msg),
            AgentError::Disk(_)
            | AgentError::Seed(_)
            | AgentError::Xml(_)
            | AgentError::Io { .. }
            | AgentError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

/// Marks a refusal that kept a disk, so the controller runs no cleanup (a
/// `DeleteVm`) that would remove it.
fn disk_kept(mut s: tonic::Status) -> tonic::Status {
    s.metadata_mut().insert(
        DISK_KEPT_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    s
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use virt::error::{ErrorDomain, ErrorDomainEnum, ErrorNumber, ErrorNumberEnum};

    #[test]
    fn libvirt_errors_are_permanent_or_transient() {
        let from = |d: ErrorDomain| ErrorDomainEnum::from(d);
        let transient = |code: ErrorNumber, d: ErrorDomain, asked: Asked| {
            libvirt_error_is_transient(ErrorNumberEnum::from(code), from(d), asked)
        };
        for code in [
            ErrorNumber::XmlError,
            ErrorNumber::XmlDetail,
            ErrorNumber::ConfigUnsupported,
            ErrorNumber::NoSupport,
            ErrorNumber::InvalidArg,
            ErrorNumber::NoStorageVolume,
            ErrorNumber::NoStoragePool,
            ErrorNumber::OperationUnsupported,
            ErrorNumber::DomExist,
        ] {
            assert!(
                !transient(code, ErrorDomain::Domain, Asked::Other),
                "{code:?}"
            );
            assert!(
                !transient(code, ErrorDomain::Domain, Asked::Define),
                "{code:?}"
            );
        }
        for code in [
            ErrorNumber::NoConnect,
            ErrorNumber::InvalidConn,
            ErrorNumber::Rpc,
            ErrorNumber::OperationTimeout,
            ErrorNumber::AgentUnresponsive,
            ErrorNumber::OperationInvalid,
            ErrorNumber::ResourceBusy,
            ErrorNumber::NoDomain,
        ] {
            assert!(transient(code, ErrorDomain::Qemu, Asked::Other), "{code:?}");
        }
        // A system call failing on the way to the daemon is worth a retry; a
        // storage file that cannot be opened is not.
        assert!(transient(
            ErrorNumber::SystemError,
            ErrorDomain::Rpc,
            Asked::Other
        ));
        assert!(transient(
            ErrorNumber::SystemError,
            ErrorDomain::Remote,
            Asked::Define
        ));
        assert!(!transient(
            ErrorNumber::SystemError,
            ErrorDomain::Storage,
            Asked::Other
        ));
        // "operation failed" refuses a definition for good; a start that
        // failed may work next time.
        assert!(!transient(
            ErrorNumber::OperationFailed,
            ErrorDomain::Qemu,
            Asked::Define
        ));
        assert!(transient(
            ErrorNumber::OperationFailed,
            ErrorDomain::Qemu,
            Asked::Other
        ));
        // Codes libvirt adds later than this agent are retried.
        assert!(libvirt_error_is_transient(
            ErrorNumberEnum::from_raw(100_000),
            from(ErrorDomain::Qemu),
            Asked::Define
        ));
        // What virt makes of a path with a NUL byte is an invalid argument.
        let nul = virt::error::Error::from(std::ffi::CString::new("a\0b").unwrap_err());
        assert!(matches!(
            libvirt_error(&nul, Asked::Other),
            AgentError::LibvirtRefused(_)
        ));
        let code = |e: AgentError| tonic::Status::from(e).code();
        assert_eq!(
            code(AgentError::Libvirt("busy".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(AgentError::LibvirtRefused("bad XML".into())),
            tonic::Code::FailedPrecondition
        );
        for permanent in [
            AgentError::Disk("x".into()),
            AgentError::Seed("x".into()),
            AgentError::Xml("x".into()),
            AgentError::io("/x", std::io::Error::other("x")),
        ] {
            assert_eq!(code(permanent), tonic::Code::Internal);
        }
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
        assert_eq!(DISK_KEPT_METADATA, "betang-disk-kept");
        let s = tonic::Status::from(AgentError::UnknownImage("x".into()));
        assert!(!s.metadata().contains_key(DISK_KEPT_METADATA));
        // A failure after an existing disk was taken up keeps its own code
        // (a busy libvirt is retried) and says the disk was kept.
        let s = tonic::Status::from(AgentError::KeptDisk {
            path: "/v/x/root.qcow2".into(),
            source: Box::new(AgentError::Libvirt("timed out".into())),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.metadata().contains_key(DISK_KEPT_METADATA));
        assert!(
            s.message()
                .contains("timed out; the disk /v/x/root.qcow2 that was already there is kept"),
            "{}",
            s.message()
        );
    }
}
