//! Monitoring: the background stats collector and the Prometheus endpoint
//! that serves its snapshot.

pub mod collector;
mod exposition;

use std::sync::Arc;

use prometheus_client::registry::Registry;

pub use collector::{Collector, Snapshot, StatsCache, VmEntry};
pub use exposition::AgentMetrics;

pub fn registry_for(metrics: AgentMetrics) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(metrics));
    r
}

/// Serves the agent's `/metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    token: Option<Arc<str>>,
) -> std::io::Result<()> {
    let registry = Arc::new(registry);
    betang_exposition::serve(
        listener,
        Arc::new(move || {
            let text = betang_exposition::openmetrics(&registry);
            Box::pin(async move { text })
        }),
        token,
    )
    .await
}
