//! The controller's `/metrics`: requests by RPC and code with latency
//! histograms (a tower layer on every gRPC server), and what the store knows,
//! read at scrape time: VPS by state, hosts by state, capacity and allocation
//! per host, allocation and usage per institution. Names are listed in the
//! README.

use std::{
    collections::BTreeMap,
    fmt::Error,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use betang_exposition::{Labels, escape, gauges as gauge};
use betang_proto::v1::HostState;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use rusqlite::Connection;

use crate::{
    error::ApiError,
    lifecycle::{ALL_STATES, VpsState},
    scheduler::{Policy, Ratios, allocatable},
    store::{Store, hosts, identity},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// Request counts and latencies, kept by `RpcLayer`.
#[derive(Debug)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 16 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 17))
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RpcMetrics {
    pub fn new() -> Self {
        RpcMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }

    fn observe(&self, method: String, code: &str, seconds: f64) {
        self.requests
            .get_or_create(&RpcLabels {
                method: method.clone(),
                code: code.to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }
}

/// Only Betang's own RPCs get a series of their own; anything else a client
/// sends is counted as `other`, so made-up paths cannot grow the exposition.
fn method_label(path: &str) -> String {
    let known = path.starts_with("/betang.v1.") || path.starts_with("/grpc.health.v1.");
    let ok = known
        && path.len() <= 100
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_'));
    if ok {
        path.to_owned()
    } else {
        "other".to_owned()
    }
}

fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Cancelled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

/// Counts every request of the server it wraps. A failed call answers with
/// its status in the response headers (tonic's trailers-only reply); a reply
/// without one is a success, whose status travels in the trailers.
#[derive(Clone)]
pub struct RpcLayer(pub Arc<RpcMetrics>);

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .map_or("OK", code_name),
                Err(_) => "Internal",
            };
            metrics.observe(method, code, started.elapsed().as_secs_f64());
            res
        })
    }
}

/// What the store holds, read once per scrape.
#[derive(Debug, Default)]
pub struct StoreFigures {
    vps_by_state: BTreeMap<String, i64>,
    hosts: Vec<betang_proto::v1::Host>,
    institutions: Vec<(betang_proto::v1::Institution, f64, u64)>,
    networks: Vec<betang_proto::v1::Network>,
}

fn read_figures(c: &Connection, now_ms: i64, down_after_ms: i64) -> Result<StoreFigures, ApiError> {
    let hosts = hosts::list(c, now_ms, down_after_ms)?;
    let down: std::collections::HashSet<&str> = hosts
        .iter()
        .filter(|h| h.state == HostState::Down as i32)
        .map(|h| h.id.as_str())
        .collect();
    let mut vps_by_state = BTreeMap::new();
    let mut q = c.prepare_cached(
        "SELECT state, host_id, count(*) FROM vps WHERE state <> 'DELETED' GROUP BY state, host_id",
    )?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (state, host, n) = row?;
        // As the API shows them: a VPS on a host that is down is UNKNOWN.
        let shown = match host {
            Some(h) if down.contains(h.as_str()) => "UNKNOWN".to_owned(),
            _ => state,
        };
        *vps_by_state.entry(shown).or_insert(0) += n;
    }
    let mut use_q = c.prepare_cached(
        "SELECT institution_id, coalesce(sum(cpu_rate), 0), coalesce(sum(mem_used_bytes), 0)
         FROM vps WHERE state <> 'DELETED' GROUP BY institution_id",
    )?;
    let used: BTreeMap<String, (f64, i64)> = use_q
        .query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))?
        .collect::<Result<_, _>>()?;
    let institutions = identity::list_institutions(c)?
        .into_iter()
        .map(|i| {
            let (cpu, mem) = used.get(&i.id).copied().unwrap_or_default();
            (i, cpu, mem.max(0) as u64)
        })
        .collect();
    Ok(StoreFigures {
        vps_by_state,
        hosts,
        institutions,
        networks: crate::store::networks::list(c, &crate::auth::Scope::All)?,
    })
}

/// When each certificate the controller knows expires.
#[derive(Debug)]
struct CertCollector(Arc<crate::certs::CertWatch>);

impl Collector for CertCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let rows: Vec<(Labels, i64)> = self
            .0
            .expiries()
            .into_iter()
            .map(|x| {
                (
                    vec![("name", x.name), ("role", x.role.to_owned())],
                    x.not_after_ms / 1000,
                )
            })
            .collect();
        gauge(
            &mut e,
            "betang_certificate_expires_timestamp_seconds",
            "When a certificate of the installation expires: the controller's own, and each \
             host's as it last presented it.",
            &rows,
        )
    }
}

/// Renders the last figures read; `ControllerMetrics::render` fills them in
/// just before encoding.
#[derive(Debug)]
struct StoreCollector {
    figures: Arc<Mutex<Arc<StoreFigures>>>,
    ratios: Ratios,
    policy: Policy,
}

impl Collector for StoreCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let f = self
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Every state appears, at 0 when empty, so an alert on ERROR has a series.
        let mut states: BTreeMap<String, i64> = ALL_STATES
            .iter()
            .filter(|s| **s != VpsState::Deleted)
            .map(|s| (s.as_str().to_owned(), 0))
            .chain([("UNKNOWN".to_owned(), 0)])
            .collect();
        for (s, n) in &f.vps_by_state {
            *states.entry(s.clone()).or_insert(0) += n;
        }
        let rows: Vec<(Labels, i64)> = states
            .into_iter()
            .map(|(s, n)| (vec![("state", s)], n))
            .collect();
        gauge(
            &mut e,
            "betang_vps",
            "VPS by state (deleted ones excluded).",
            &rows,
        )?;

        let host_state = |h: &betang_proto::v1::Host| {
            if h.state == HostState::Down as i32 {
                "down"
            } else if h.state == HostState::Degraded as i32 {
                "degraded"
            } else if h.cordoned {
                "cordoned"
            } else {
                "up"
            }
        };
        let mut by_state: BTreeMap<&str, i64> =
            [("up", 0), ("down", 0), ("degraded", 0), ("cordoned", 0)].into();
        for h in &f.hosts {
            *by_state.entry(host_state(h)).or_insert(0) += 1;
        }
        let rows: Vec<(Labels, i64)> = by_state
            .into_iter()
            .map(|(s, n)| (vec![("state", s.to_owned())], n))
            .collect();
        gauge(
            &mut e,
            "betang_hosts",
            "Hosts by state: up, down, degraded (agent reports, hypervisor does not answer) or cordoned (and up).",
            &rows,
        )?;

        let per_host = |v: &dyn Fn(&betang_proto::v1::Host) -> f64| -> Vec<(Labels, f64)> {
            f.hosts
                .iter()
                .map(|h| (vec![("host_id", escape(&h.id))], v(h)))
                .collect()
        };
        let cap = |h: &betang_proto::v1::Host| h.capacity.unwrap_or_default();
        let alloc = |h: &betang_proto::v1::Host| h.allocated.unwrap_or_default();
        let room = |h: &betang_proto::v1::Host| allocatable(&cap(h), &self.ratios, &self.policy);
        gauge(
            &mut e,
            "betang_host_up",
            "1 while the host sends heartbeats.",
            &per_host(&|h| f64::from(u8::from(h.state != HostState::Down as i32))),
        )?;
        gauge(
            &mut e,
            "betang_host_degraded",
            "1 while the host's agent reports but its hypervisor does not answer.",
            &per_host(&|h| f64::from(u8::from(h.state == HostState::Degraded as i32))),
        )?;
        gauge(
            &mut e,
            "betang_host_cordoned",
            "1 when no new VPS may be placed on the host.",
            &per_host(&|h| f64::from(u8::from(h.cordoned))),
        )?;
        gauge(
            &mut e,
            "betang_host_last_heartbeat_timestamp_seconds",
            "When the host's last heartbeat arrived (Unix time).",
            &per_host(&|h| h.last_heartbeat_ms as f64 / 1000.0),
        )?;
        gauge(
            &mut e,
            "betang_host_capacity_vcpus",
            "vCPUs the host registered.",
            &per_host(&|h| f64::from(cap(h).vcpus)),
        )?;
        gauge(
            &mut e,
            "betang_host_capacity_memory_bytes",
            "Memory the host registered.",
            &per_host(&|h| (cap(h).memory_mib << 20) as f64),
        )?;
        gauge(
            &mut e,
            "betang_host_capacity_disk_bytes",
            "Disk the host registered.",
            &per_host(&|h| (cap(h).disk_gib << 30) as f64),
        )?;
        gauge(
            &mut e,
            "betang_host_allocatable_vcpus",
            "vCPUs that may be allocated: capacity less the reserve, times the overcommit ratio.",
            &per_host(&|h| f64::from(room(h).vcpus)),
        )?;
        gauge(
            &mut e,
            "betang_host_allocatable_memory_bytes",
            "Memory that may be allocated, after reserve and overcommit.",
            &per_host(&|h| (room(h).memory_mib << 20) as f64),
        )?;
        gauge(
            &mut e,
            "betang_host_allocatable_disk_bytes",
            "Disk that may be allocated, after reserve and overcommit.",
            &per_host(&|h| (room(h).disk_gib << 30) as f64),
        )?;
        gauge(
            &mut e,
            "betang_host_allocated_vcpus",
            "vCPUs of the VPS placed on the host.",
            &per_host(&|h| f64::from(alloc(h).vcpus)),
        )?;
        gauge(
            &mut e,
            "betang_host_allocated_memory_bytes",
            "Memory of the VPS placed on the host.",
            &per_host(&|h| (alloc(h).memory_mib << 20) as f64),
        )?;
        gauge(
            &mut e,
            "betang_host_allocated_disk_bytes",
            "Disk of the VPS placed on the host.",
            &per_host(&|h| (alloc(h).disk_gib << 30) as f64),
        )?;
        gauge(
            &mut e,
            "betang_host_vps",
            "VPS placed on the host.",
            &per_host(&|h| f64::from(h.vps_count)),
        )?;
        gauge(
            &mut e,
            "betang_host_leftovers",
            "Domains and VM directories on the host that no live VPS owns (left for an operator).",
            &per_host(&|h| h.leftovers.len() as f64),
        )?;

        let per_inst =
            |v: &dyn Fn(&(betang_proto::v1::Institution, f64, u64)) -> f64| -> Vec<(Labels, f64)> {
                f.institutions
                    .iter()
                    .map(|i| {
                        (
                            vec![
                                ("institution", escape(&i.0.id)),
                                ("code", escape(&i.0.code)),
                            ],
                            v(i),
                        )
                    })
                    .collect()
            };
        let quota = |i: &(betang_proto::v1::Institution, f64, u64)| i.0.quota.unwrap_or_default();
        let used = |i: &(betang_proto::v1::Institution, f64, u64)| i.0.used.unwrap_or_default();
        gauge(
            &mut e,
            "betang_institution_quota_vcpus",
            "The institution's vCPU quota.",
            &per_inst(&|i| f64::from(quota(i).vcpus)),
        )?;
        gauge(
            &mut e,
            "betang_institution_quota_memory_bytes",
            "The institution's memory quota.",
            &per_inst(&|i| (quota(i).memory_mib << 20) as f64),
        )?;
        gauge(
            &mut e,
            "betang_institution_quota_disk_bytes",
            "The institution's disk quota.",
            &per_inst(&|i| (quota(i).disk_gib << 30) as f64),
        )?;
        gauge(
            &mut e,
            "betang_institution_allocated_vcpus",
            "vCPUs of the institution's VPS.",
            &per_inst(&|i| f64::from(used(i).vcpus)),
        )?;
        gauge(
            &mut e,
            "betang_institution_allocated_memory_bytes",
            "Memory of the institution's VPS.",
            &per_inst(&|i| (used(i).memory_mib << 20) as f64),
        )?;
        gauge(
            &mut e,
            "betang_institution_allocated_disk_bytes",
            "Disk of the institution's VPS.",
            &per_inst(&|i| (used(i).disk_gib << 30) as f64),
        )?;
        gauge(
            &mut e,
            "betang_institution_vps",
            "The institution's VPS.",
            &per_inst(&|i| f64::from(used(i).vps_count)),
        )?;
        gauge(
            &mut e,
            "betang_institution_cpu_usage_cores",
            "CPU the institution's VPS use now, in busy vCPUs, as their agents last reported.",
            &per_inst(&|i| i.1),
        )?;
        gauge(
            &mut e,
            "betang_institution_memory_used_bytes",
            "Memory in use inside the institution's VPS, where guests report it.",
            &per_inst(&|i| i.2 as f64),
        )?;
        let per_network = |v: &dyn Fn(&betang_proto::v1::Network) -> u32| -> Vec<(Labels, i64)> {
            f.networks
                .iter()
                .map(|n| (vec![("network", n.name.clone())], i64::from(v(n))))
                .collect()
        };
        gauge(
            &mut e,
            "betang_network_addresses",
            "Addresses the network can hand out (less its gateway and reserved ranges).",
            &per_network(&|n| n.addresses_total),
        )?;
        gauge(
            &mut e,
            "betang_network_addresses_used",
            "Addresses VPS hold on the network.",
            &per_network(&|n| n.addresses_used),
        )?;
        Ok(())
    }
}

/// Everything the controller's `/metrics` serves.
pub struct ControllerMetrics {
    pub rpc: Arc<RpcMetrics>,
    registry: Registry,
    figures: Arc<Mutex<Arc<StoreFigures>>>,
    store: Store,
    down_after_ms: i64,
}

impl ControllerMetrics {
    pub fn new(
        store: Store,
        ratios: Ratios,
        policy: Policy,
        down_after_ms: i64,
        certs: Arc<crate::certs::CertWatch>,
    ) -> Self {
        let rpc = Arc::new(RpcMetrics::new());
        let figures = Arc::new(Mutex::new(Arc::new(StoreFigures::default())));
        let mut registry = Registry::default();
        registry.register(
            "betang_rpc_requests",
            "gRPC requests by method and status code.",
            RpcCounters(rpc.clone()),
        );
        registry.register(
            "betang_rpc_duration_seconds",
            "gRPC request latency by method.",
            RpcLatency(rpc.clone()),
        );
        registry.register_collector(Box::new(StoreCollector {
            figures: figures.clone(),
            ratios,
            policy,
        }));
        registry.register_collector(Box::new(CertCollector(certs)));
        ControllerMetrics {
            rpc,
            registry,
            figures,
            store,
            down_after_ms,
        }
    }

    /// Reads the store, then renders everything in OpenMetrics.
    pub async fn render(&self) -> String {
        let down = self.down_after_ms;
        let now = crate::now_ms();
        match self.store.run(move |c| read_figures(c, now, down)).await {
            Ok(f) => *self.figures.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(f),
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the store"),
        }
        betang_exposition::openmetrics(&self.registry)
    }
}

/// The families registered by reference, so the layer and the registry share them.
#[derive(Debug)]
struct RpcCounters(Arc<RpcMetrics>);
#[derive(Debug)]
struct RpcLatency(Arc<RpcMetrics>);

impl EncodeMetric for RpcCounters {
    fn encode(&self, encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), Error> {
        self.0.requests.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

impl EncodeMetric for RpcLatency {
    fn encode(&self, encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), Error> {
        self.0.latency.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_betang_paths_get_their_own_series() {
        assert_eq!(
            method_label("/betang.v1.VpsService/CreateVps"),
            "/betang.v1.VpsService/CreateVps"
        );
        assert_eq!(method_label("/evil/\"x\""), "other");
        assert_eq!(method_label("/betang.v1.VpsService/<script>"), "other");
    }

    #[test]
    fn status_codes_have_their_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(16), "Unauthenticated");
        assert_eq!(code_name(99), "Unknown");
    }
}
