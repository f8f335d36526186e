//! betang-controller: the gRPC API, the store, the scheduler and the
//! dispatcher that drives agents towards each VPS's desired state.

pub mod agents;
pub mod api;
pub mod auth;
pub mod certs;
pub mod config;
pub mod console;
pub mod error;
pub mod ids;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod moves;
pub mod pki;
pub mod portal;
pub mod reconciler;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tls;
pub mod validation;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
