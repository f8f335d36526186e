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
    #[error("libvirt: {0}")]
    Libvirt(String),
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

impl From<virt::error::Error> for AgentError {
    fn from(e: virt::error::Error) -> Self {
        AgentError::Libvirt(e.message().to_owned())
    }
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        let msg = e.to_string();
        match e {
            AgentError::InvalidName(_) | AgentError::InvalidArgument { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            AgentError::UnknownImage(_) | AgentError::WrongState { .. } => {
                tonic::Status::failed_precondition(msg)
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
