//! Placement benchmark: the real controller (in this process, its gRPC API on
//! loopback) with N registered hosts of mixed sizes that heartbeat like agents
//! and answer EnsureVm at once, and M VPS created through the gRPC API.
//! Prints figures, then one line of JSON.
//!
//! `cargo run --release -p betang-tests --bin bench-placement -- --hosts 1000 --vps 20000`

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use betang_proto::v1::{
    DeleteVmRequest, DeleteVmResponse, EnsureVmRequest, GetHostRequest, HeartbeatRequest,
    HostCapacity, HostInfoRequest, HostInfoResponse, HostState, Image, ListHostsRequest,
    ListVmsRequest, ListVmsResponse, ListVpsRequest, PowerState, Quota, RebootVmRequest,
    RegisterHostRequest, VmStatus,
    agent_service_server::{AgentService, AgentServiceServer},
    registry_service_client::RegistryServiceClient,
};
use betang_tests::{Clients, application, make_people};
use tonic::{Request, Response, Status};

/// An agent that owns nothing and agrees to everything, so that the
/// controller's dispatch costs nothing measurable.
struct NullAgent;

#[tonic::async_trait]
impl AgentService for NullAgent {
    async fn ensure_vm(&self, r: Request<EnsureVmRequest>) -> Result<Response<VmStatus>, Status> {
        let r = r.into_inner();
        Ok(Response::new(VmStatus {
            vps_id: r.vps_id,
            power: r.desired_power,
            generation: r.generation,
            ..Default::default()
        }))
    }
    async fn delete_vm(
        &self,
        _: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        Ok(Response::new(DeleteVmResponse {}))
    }
    async fn reboot_vm(&self, _: Request<RebootVmRequest>) -> Result<Response<VmStatus>, Status> {
        Ok(Response::new(VmStatus {
            power: PowerState::Running as i32,
            ..Default::default()
        }))
    }
    async fn list_vms(
        &self,
        _: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        Ok(Response::new(ListVmsResponse { vms: vec![] }))
    }
    async fn host_info(
        &self,
        _: Request<HostInfoRequest>,
    ) -> Result<Response<HostInfoResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let hosts = arg("--hosts", 1000);
    let total = arg("--vps", 20_000);
    let concurrency = arg("--concurrency", 8);
    let dir = tempfile::tempdir()?;
    let mut cfg =
        betang_controller::config::ControllerConfig::with_data_dir(dir.path().join("data"));
    cfg.reconcile_interval_ms = 1000;
    cfg.host_down_after_ms = 10_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let controller = betang_controller::server::start(cfg, listener, agent_listener).await?;
    let endpoint = format!("http://{}", controller.addr);
    let registry_endpoint = format!("http://{}", controller.agent_addr);

    let null = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let null_endpoint = format!("http://{}", null.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(NullAgent))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(null).with_nodelay(Some(true)),
            ),
    );

    let now = betang_controller::now_ms();
    let (_, admin) = controller.store.run_sync(|c| {
        betang_controller::store::identity::bootstrap_admin(c, "dc", "Data center", "admin", now)
    })?;
    let quota = Quota {
        vcpus: u32::MAX,
        memory_mib: u64::MAX >> 8,
        disk_gib: u64::MAX >> 8,
        vps_count: u32::MAX,
    };
    let people = make_people(&endpoint, &admin, "bench", quota).await?;

    // Hosts of mixed sizes: 16, 32 and 64 vCPUs with 4 GiB per vCPU.
    let mut registry = RegistryServiceClient::new(
        tonic::transport::Endpoint::from_shared(registry_endpoint)?
            .connect()
            .await?,
    );
    let ids: Vec<String> = (0..hosts).map(|i| format!("sim-{i:04}")).collect();
    let mut capacity_vcpus = 0u64;
    for (i, id) in ids.iter().enumerate() {
        let vcpus = [16u32, 32, 64][i % 3];
        capacity_vcpus += u64::from(vcpus);
        registry
            .register_host(RegisterHostRequest {
                info: Some(HostInfoResponse {
                    host_id: id.clone(),
                    hostname: id.clone(),
                    capacity: Some(HostCapacity {
                        vcpus,
                        memory_mib: u64::from(vcpus) * 4096,
                        disk_gib: 4000,
                    }),
                    images: vec![Image {
                        name: "tiny".into(),
                        min_disk_gib: 1,
                        ..Default::default()
                    }],
                    domain_type: "qemu".into(),
                    ..Default::default()
                }),
                agent_endpoint: null_endpoint.clone(),
            })
            .await?;
    }
    // Heartbeats every 2 s, like agents; a silenced host stops sending them.
    let silenced: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    let last_beat: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Arc::default();
    let (beat_ids, mut beat) = (ids.clone(), registry.clone());
    let (quiet, last) = (silenced.clone(), last_beat.clone());
    tokio::spawn(async move {
        loop {
            for id in &beat_ids {
                if quiet.lock().unwrap().contains(id) {
                    continue;
                }
                let _ = beat
                    .heartbeat(HeartbeatRequest {
                        host_id: id.clone(),
                        ..Default::default()
                    })
                    .await;
                last.lock().unwrap().insert(id.clone(), Instant::now());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });

    let op = Clients::connect(&endpoint, Some(&people.operator)).await?;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut c, lat, next, fail) = (
                op.vps.clone(),
                latencies.clone(),
                next.clone(),
                failures.clone(),
            );
            let inst = people.inst_a.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let req = betang_proto::v1::CreateVpsRequest {
                        request_id: format!("bench-{i}"),
                        spec: Some(betang_proto::v1::VpsSpec {
                            name: format!("vps-{i}"),
                            vcpus: [1, 2, 4][i % 3],
                            memory_mib: [1024, 2048, 4096][i % 3],
                            disk_gib: 20,
                            image: "tiny".into(),
                            ..Default::default()
                        }),
                        application: Some(application()),
                        institution_id: inst.clone(),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    if c.create_vps(req).await.is_err() {
                        fail.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    lat.lock().unwrap().push(t.elapsed());
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let placing = started.elapsed();
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort();
    let failed = failures.load(std::sync::atomic::Ordering::Relaxed);

    // Listing: one 500-row page, and everything.
    let mut page_times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        op.vps
            .clone()
            .list_vps(ListVpsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await?;
        page_times.push(t.elapsed());
    }
    page_times.sort();
    let t = Instant::now();
    let (mut token, mut listed) = (String::new(), 0usize);
    loop {
        let p = op
            .vps
            .clone()
            .list_vps(ListVpsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        listed += p.vps.len();
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    let full_list = t.elapsed();

    // No host over its ratio (4 for vCPUs, 1 for memory and disk).
    let host_list = op
        .hosts
        .clone()
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    let over = host_list
        .iter()
        .filter(|h| {
            let (c, a) = (h.capacity.unwrap(), h.allocated.unwrap());
            a.vcpus > c.vcpus * 4 || a.memory_mib > c.memory_mib || a.disk_gib > c.disk_gib
        })
        .count();

    // A host goes silent: time from its last heartbeat to DOWN.
    let silent = ids[0].clone();
    silenced.lock().unwrap().insert(silent.clone());
    let down_after = loop {
        let h = op
            .hosts
            .clone()
            .get_host(GetHostRequest { id: silent.clone() })
            .await?
            .into_inner();
        if h.state == HostState::Down as i32 {
            let last = last_beat.lock().unwrap().get(&silent).copied();
            break last.map_or(Duration::ZERO, |t| t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let placed = total - failed;
    let rate = placed as f64 / placing.as_secs_f64();
    println!(
        "hosts {hosts} ({capacity_vcpus} vCPUs), VPS requested {total}, placed {placed}, refused {failed}"
    );
    println!(
        "placements/s {rate:.0}; latency p50 {:.2} ms, p99 {:.2} ms (concurrency {concurrency})",
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    println!(
        "ListVps 500-row page p50 {:.2} ms, p99 {:.2} ms; all {listed} VPS in {:.3} s",
        pct(&page_times, 0.5),
        pct(&page_times, 0.99),
        full_list.as_secs_f64()
    );
    println!(
        "hosts over their ratio: {over}; silent host DOWN after {:.2} s; peak RSS of this process {:.0} MiB",
        down_after.as_secs_f64(),
        peak_rss_mib()
    );
    println!(
        "{}",
        serde_json::json!({
            "hosts": hosts,
            "vps_requested": total,
            "vps_placed": placed,
            "placements_per_s": (rate * 10.0).round() / 10.0,
            "placement_p50_ms": pct(&lat, 0.5),
            "placement_p99_ms": pct(&lat, 0.99),
            "list_page_500_p50_ms": pct(&page_times, 0.5),
            "list_page_500_p99_ms": pct(&page_times, 0.99),
            "list_all_s": full_list.as_secs_f64(),
            "listed": listed,
            "hosts_over_ratio": over,
            "silent_to_down_s": down_after.as_secs_f64(),
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
