//! Typed errors inside the controller and their one translation into gRPC
//! statuses at the edge.

use thiserror::Error;

/// The metadata key of the wait a rate-limited caller is told to keep.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{field}: {rule}")]
    InvalidArgument { field: &'static str, rule: String },
    /// Also what a caller gets for a VPS they may not see.
    #[error("VPS {0} not found")]
    VpsNotFound(String),
    #[error("host {0} not found")]
    HostNotFound(String),
    #[error("{0}")]
    NoHostFits(crate::scheduler::NoFit),
    #[error("VPS {id} is {state}; {action} is not possible now")]
    WrongState {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("agent on host {host}: {message}")]
    Agent { host: String, message: String },
    /// An institution's requests waiting for approval are capped.
    #[error(
        "institution {institution} already has {limit} requests waiting for approval, the most it \
         may have; cancel one or wait for a decision"
    )]
    TooManyPending { institution: String, limit: u32 },
    /// A network with no free address left.
    #[error("{0}")]
    NoAddress(String),
    /// A token past its request budget.
    #[error(
        "too many requests with this token; retry in {} s",
        retry_after_ms.div_ceil(1000)
    )]
    RateLimited { retry_after_ms: u64 },
    /// More tokens unknown to the cache are being looked up than the store
    /// is given at once.
    #[error("the controller is busy signing in other callers; retry in a moment")]
    SignInsBusy,
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Says which limit and by how much.
    #[error("quota: {0}")]
    QuotaExceeded(QuotaExcess),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn invalid(field: &'static str, rule: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field,
            rule: rule.into(),
        }
    }
}

/// Which of an institution's limits a request would pass, and the figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExcess {
    /// `vcpus`, `memory_mib`, `disk_gib` or `vps_count`.
    pub limit_name: &'static str,
    pub institution_code: String,
    pub used: u64,
    pub asked: u64,
    pub limit: u64,
    /// " MiB", " GiB" or "".
    pub unit: &'static str,
}

impl std::fmt::Display for QuotaExcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (total, unit) = (self.used.saturating_add(self.asked), self.unit);
        write!(
            f,
            "{} of institution {} would be {total}{unit}, {}{unit} over its limit of {}{unit} ({}{unit} in use, {}{unit} asked)",
            self.limit_name,
            self.institution_code,
            total.saturating_sub(self.limit),
            self.limit,
            self.used,
            self.asked
        )
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("store file: {0}")]
    File(String),
    #[error("store task: {0}")]
    Task(String),
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            ApiError::VpsNotFound(_) | ApiError::HostNotFound(_) | ApiError::NotFound { .. } => {
                tonic::Status::not_found(msg)
            }
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            ApiError::QuotaExceeded(_) => tonic::Status::resource_exhausted(msg),
            ApiError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            ApiError::NoHostFits(_) | ApiError::TooManyPending { .. } => {
                tonic::Status::resource_exhausted(msg)
            }
            ApiError::RateLimited { retry_after_ms } => {
                let mut status = tonic::Status::resource_exhausted(msg);
                status
                    .metadata_mut()
                    .insert(RETRY_AFTER_MS, retry_after_ms.into());
                status
            }
            ApiError::SignInsBusy => tonic::Status::unavailable(msg),
            ApiError::NoAddress(_) => tonic::Status::resource_exhausted(msg),
            ApiError::WrongState { .. } => tonic::Status::failed_precondition(msg),
            ApiError::Agent { .. } => tonic::Status::unavailable(msg),
            ApiError::Store(_) => {
                tracing::error!(error = %msg, "store error");
                tonic::Status::internal("internal error in the controller's store")
            }
        }
    }
}
