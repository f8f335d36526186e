//! Placement benchmark: the real controller binary in its own process, 1,000
//! real agents on the simulated hypervisor in this one (mixed sizes,
//! heartbeating every 2 s over the registry API), and 20,000 VPS created
//! through the gRPC API. Prints figures, then one line of JSON.
//!
//! `bash deploy/bench-placement.sh --hosts 1000 --vps 20000 --concurrency 4`

use std::{
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use betang_agent::{
    config::{AgentConfig, CapacityConfig, DomainTypeSetting, HypervisorSetting, NetworkConfig},
    server::RunningAgent,
};
use betang_proto::v1::{
    CreateNetworkRequest, GetHostRequest, GrantNetworkRequest, HostState, ListHostsRequest,
    ListVpsRequest, Network, Quota, VpsState,
};
use betang_tests::{
    Clients, application,
    bench::{arg, cpu_seconds, pct, proc_mib},
    make_people,
};

fn peak_rss_mib(pid: &str) -> f64 {
    proc_mib(pid, "status", "VmHWM:")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The controller binary next to this one (both built by the bench script).
fn controller_binary() -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me
        .parent()
        .context("no directory")?
        .join("betang-controller");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing; run deploy/bench-placement.sh",
        bin.display()
    );
    Ok(bin)
}

struct Controller {
    child: tokio::process::Child,
    pid: String,
    endpoint: String,
    registry: String,
    admin_token: String,
}

async fn start_controller(dir: &Path) -> anyhow::Result<Controller> {
    let (api, registry) = (free_port()?, free_port()?);
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{api}\"\nagent_listen = \"127.0.0.1:{registry}\"\n\
             data_dir = \"{}\"\nhost_down_after_ms = 10000\nheartbeat_interval_ms = 2000\n\
             reconcile_interval_ms = 1000\n\
             # One token drives the whole benchmark.\n[limits]\nrequests_per_second = 0\n",
            dir.join("data").display()
        ),
    )?;
    let bin = controller_binary()?;
    let admin_token = betang_tests::bench::bootstrap_admin(&bin, &config).await?;
    let child = tokio::process::Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("controller exited")?.to_string();
    let endpoint = format!("http://127.0.0.1:{api}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", api))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "controller did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Controller {
        child,
        pid,
        endpoint,
        registry: format!("http://127.0.0.1:{registry}"),
        admin_token,
    })
}

/// One simulated host: the real agent on the simulated hypervisor.
async fn start_agent(
    dir: &Path,
    registry: &str,
    image_dir: &Path,
    i: usize,
) -> anyhow::Result<RunningAgent> {
    let vcpus = [16u32, 32, 64][i % 3];
    let cfg = AgentConfig {
        metrics_listen: None,
        metrics_token_file: None,
        stats_interval_ms: 5000,
        guest_unresponsive_after_ms: 10_000,
        libvirt_unresponsive_after_ms: 5_000,
        host_id: format!("sim-{i:04}"),
        listen: "127.0.0.1:0".parse()?,
        advertise_endpoint: None,
        controller_endpoint: registry.to_owned(),
        libvirt_uri: String::new(),
        hypervisor: HypervisorSetting::Simulated,
        simulated_persist: false,
        domain_type: DomainTypeSetting::Qemu,
        image_dir: image_dir.to_owned(),
        vm_dir: dir.join(format!("vms-{i:04}")),
        heartbeat_interval_ms: 2000,
        reconcile_interval_seconds: 60,
        libvirt_call_timeout_seconds: 10,
        capacity: Some(CapacityConfig {
            vcpus,
            memory_mib: u64::from(vcpus) * 4096,
            disk_gib: 4000,
        }),
        network: NetworkConfig::None,
        zone: String::new(),
        labels: Default::default(),
        tls: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    betang_agent::server::start(cfg, listener).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let hosts = arg("--hosts", 1000);
    let total = arg("--vps", 20_000);
    // Four requests in flight: enough to keep both cores busy (about 2,600
    // placements a second) while each waits behind few others.
    let concurrency = arg("--concurrency", 4);
    let dir = tempfile::tempdir()?;
    // The simulated hosts' disks are small text files, 60,000 of them for
    // 20,000 VPS: in memory, so that what is measured is placement, not the
    // allocation of inodes on this machine's file system. The controller's
    // SQLite file stays on disk.
    let disks = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm")?,
        false => tempfile::tempdir()?,
    };
    let controller = start_controller(dir.path()).await?;
    let endpoint = controller.endpoint.clone();

    let image_dir = dir.path().join("images");
    std::fs::create_dir_all(&image_dir)?;
    std::fs::write(image_dir.join("tiny.img"), "simulated base image\n")?;
    std::fs::write(
        image_dir.join("catalog.toml"),
        "[[image]]\nname = \"tiny\"\nfile = \"tiny.img\"\nos = \"none\"\n",
    )?;
    let t = Instant::now();
    let mut agents = Vec::with_capacity(hosts);
    let mut capacity_vcpus = 0u64;
    for i in 0..hosts {
        capacity_vcpus += u64::from([16u32, 32, 64][i % 3]);
        agents.push(start_agent(disks.path(), &controller.registry, &image_dir, i).await?);
    }
    let quota = Quota {
        vcpus: u32::MAX,
        memory_mib: u64::MAX >> 8,
        disk_gib: u64::MAX >> 8,
        vps_count: u32::MAX,
    };
    let people = make_people(&endpoint, &controller.admin_token, "bench", quota).await?;
    let op = Clients::connect(&endpoint, Some(&people.operator)).await?;
    loop {
        let listed = op.hosts.clone().list_hosts(ListHostsRequest {}).await?;
        let up = listed
            .get_ref()
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Up as i32)
            .count();
        if up == hosts {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "only {up} of {hosts} hosts came up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hosts_up_after = t.elapsed();

    let cpu_before = (cpu_seconds(&controller.pid), cpu_seconds("self"));
    let started = Instant::now();
    let (load_endpoint, token, inst) = (
        endpoint.clone(),
        people.operator.clone(),
        people.inst_a.clone(),
    );
    let Batch {
        lat,
        failed,
        took: placing,
        ..
    } = tokio::task::spawn_blocking(move || {
        place_all(
            &load_endpoint,
            &token,
            &inst,
            ("vps", ""),
            total,
            concurrency,
        )
    })
    .await??;
    let cpu_ms_per_placement = (
        (cpu_seconds(&controller.pid) - cpu_before.0) * 1000.0 / total as f64,
        (cpu_seconds("self") - cpu_before.1) * 1000.0 / total as f64,
    );

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
    let listed = count_in_state(&op, VpsState::Unspecified).await?;
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

    // The agents build every placed VPS; how long until all run.
    let running = loop {
        let running = count_in_state(&op, VpsState::Running).await?;
        if running >= total - failed || started.elapsed() > Duration::from_secs(600) {
            break running;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let all_running_after = started.elapsed();
    let mut domains = 0;
    for a in &agents {
        domains += a.vms.list().await.map_or(0, |l| l.len());
    }

    // Addresses: the same batch of placements all at once, without and then
    // with a network, so the allocation's cost shows as the difference.
    let alloc = arg("--alloc", 1000);
    op.networks
        .clone()
        .create_network(CreateNetworkRequest {
            network: Some(Network {
                name: "bench-net".into(),
                attach_kind: "bridge".into(),
                attach_source: "br-bench".into(),
                cidr: "198.18.0.0/20".into(),
                ..Default::default()
            }),
        })
        .await?;
    op.networks
        .clone()
        .grant_network(GrantNetworkRequest {
            name: "bench-net".into(),
            institution_id: people.inst_a.clone(),
            is_default: false,
        })
        .await?;
    let mut batches = Vec::new();
    for (tag, network) in [("plain", ""), ("addressed", "bench-net")] {
        let (e, t, i) = (
            endpoint.clone(),
            people.operator.clone(),
            people.inst_a.clone(),
        );
        let cpu = cpu_seconds(&controller.pid);
        let batch = tokio::task::spawn_blocking(move || {
            place_all(&e, &t, &i, (tag, network), alloc, alloc)
        })
        .await??;
        let cpu_ms = (cpu_seconds(&controller.pid) - cpu) * 1000.0 / alloc as f64;
        batches.push((batch, cpu_ms));
    }
    let (plain, addressed) = (&batches[0], &batches[1]);
    let distinct: std::collections::HashSet<&String> = addressed.0.addresses.iter().collect();
    anyhow::ensure!(
        addressed.0.failed == 0 && distinct.len() == alloc,
        "{} refused, {} distinct addresses for {alloc} placements",
        addressed.0.failed,
        distinct.len()
    );

    // A host goes silent: time from its last accepted heartbeat to DOWN.
    let mut silent_agent = agents.swap_remove(0);
    let silent = silent_agent.host.host_id().to_owned();
    silent_agent.shutdown();
    let last_beat = silent_agent.host.last_heartbeat_ms();
    let down_after = loop {
        let h = op
            .hosts
            .clone()
            .get_host(GetHostRequest { id: silent.clone() })
            .await?
            .into_inner();
        if h.state == HostState::Down as i32 {
            break Duration::from_millis((now_ms() - last_beat).max(0) as u64);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let controller_rss = peak_rss_mib(&controller.pid);
    let bench_rss = peak_rss_mib("self");
    let placed = total - failed;
    let rate = placed as f64 / placing.as_secs_f64();
    println!(
        "hosts {hosts} ({capacity_vcpus} vCPUs; real agents on the simulated hypervisor, all up after {:.1} s)",
        hosts_up_after.as_secs_f64()
    );
    println!("VPS requested {total}, placed {placed}, refused {failed}");
    println!(
        "placements/s {rate:.0}; latency p50 {:.2} ms, p99 {:.2} ms (concurrency {concurrency})",
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    println!(
        "CPU per placement while placing: controller {:.3} ms, agents and load {:.3} ms",
        cpu_ms_per_placement.0, cpu_ms_per_placement.1
    );
    println!(
        "running on their agents: {running} after {:.1} s; domains on the agents: {domains}",
        all_running_after.as_secs_f64()
    );
    println!(
        "ListVps 500-row page p50 {:.2} ms, p99 {:.2} ms; all {listed} VPS in {:.3} s",
        pct(&page_times, 0.5),
        pct(&page_times, 0.99),
        full_list.as_secs_f64()
    );
    println!(
        "hosts over their ratio: {over}; silent host DOWN {:.2} s after its last heartbeat",
        down_after.as_secs_f64()
    );
    for (name, (b, cpu_ms)) in [("without a network", plain), ("with addresses", addressed)] {
        println!(
            "{alloc} at once {name}: {:.2} s, p50 {:.2} ms, p99 {:.2} ms, controller CPU {cpu_ms:.3} ms each, refused {}",
            b.took.as_secs_f64(),
            pct(&b.lat, 0.5),
            pct(&b.lat, 0.99),
            b.failed
        );
    }
    println!(
        "address allocation adds {:.3} ms of controller CPU per placement; {} distinct addresses",
        addressed.1 - plain.1,
        distinct.len()
    );
    println!(
        "peak RSS: controller {controller_rss:.0} MiB; this process ({} agents and the load) {bench_rss:.0} MiB",
        hosts
    );
    drop(agents);
    let mut child = controller.child;
    child.kill().await.ok();
    println!(
        "{}",
        serde_json::json!({
            "hosts": hosts,
            "concurrency": concurrency,
            "vps_requested": total,
            "vps_placed": placed,
            "vps_running": running,
            "all_running_s": all_running_after.as_secs_f64(),
            "placements_per_s": (rate * 10.0).round() / 10.0,
            "placement_p50_ms": pct(&lat, 0.5),
            "placement_p99_ms": pct(&lat, 0.99),
            "controller_cpu_ms_per_placement": cpu_ms_per_placement.0,
            "agents_and_load_cpu_ms_per_placement": cpu_ms_per_placement.1,
            "list_page_500_p50_ms": pct(&page_times, 0.5),
            "list_page_500_p99_ms": pct(&page_times, 0.99),
            "list_all_s": full_list.as_secs_f64(),
            "listed": listed,
            "hosts_over_ratio": over,
            "silent_to_down_s": down_after.as_secs_f64(),
            "concurrent_allocations": alloc,
            "alloc_plain_s": plain.0.took.as_secs_f64(),
            "alloc_plain_p99_ms": pct(&plain.0.lat, 0.99),
            "alloc_plain_cpu_ms": plain.1,
            "alloc_addressed_s": addressed.0.took.as_secs_f64(),
            "alloc_addressed_p99_ms": pct(&addressed.0.lat, 0.99),
            "alloc_addressed_cpu_ms": addressed.1,
            "alloc_added_cpu_ms_per_placement": addressed.1 - plain.1,
            "alloc_distinct_addresses": distinct.len(),
            "controller_peak_rss_mib": controller_rss,
            "agents_and_load_peak_rss_mib": bench_rss,
        })
    );
    Ok(())
}

/// What one batch of CreateVps calls gave.
struct Batch {
    /// Sorted.
    lat: Vec<Duration>,
    failed: usize,
    took: Duration,
    /// The address each placed VPS was given, where it asked for a network.
    addresses: Vec<String>,
}

/// The load: `total` CreateVps calls named `tag-N`, `concurrency` at a time
/// (on one connection per 64, the controller's limit of streams on one), on
/// `network` if one is named, run on a runtime of its own, so that its
/// timings do not include waiting behind the thousand agents' tasks on
/// theirs (a client of the controller runs apart from its hosts).
fn place_all(
    endpoint: &str,
    token: &str,
    inst: &str,
    (tag, network): (&str, &str),
    total: usize,
    concurrency: usize,
) -> anyhow::Result<Batch> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-load")
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..concurrency.div_ceil(64) {
            connections.push(Clients::connect(endpoint, Some(token)).await?);
        }
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
        let addresses = Arc::new(std::sync::Mutex::new(Vec::new()));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let (mut c, lat, next, fail, given) = (
                    connections[w / 64].vps.clone(),
                    latencies.clone(),
                    next.clone(),
                    failures.clone(),
                    addresses.clone(),
                );
                let (inst, tag, network) = (inst.to_owned(), tag.to_owned(), network.to_owned());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        let req = betang_proto::v1::CreateVpsRequest {
                            request_id: format!("{tag}-{i}"),
                            spec: Some(betang_proto::v1::VpsSpec {
                                name: format!("{tag}-{i}"),
                                network: network.clone(),
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
                        match c.create_vps(req).await {
                            Ok(v) => {
                                lat.lock().unwrap().push(t.elapsed());
                                if let Some(a) = v.into_inner().attachment {
                                    given.lock().unwrap().push(a.ip_address);
                                }
                            }
                            Err(_) => {
                                lat.lock().unwrap().push(t.elapsed());
                                fail.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
        let took = started.elapsed();
        let mut lat = latencies.lock().unwrap().clone();
        lat.sort();
        let addresses = addresses.lock().unwrap().clone();
        Ok(Batch {
            lat,
            failed: failures.load(std::sync::atomic::Ordering::Relaxed),
            took,
            addresses,
        })
    })
}

/// Pages through every VPS in `state` (all of them for `Unspecified`).
async fn count_in_state(op: &Clients, state: VpsState) -> anyhow::Result<usize> {
    let (mut token, mut n) = (String::new(), 0usize);
    loop {
        let p = op
            .vps
            .clone()
            .list_vps(ListVpsRequest {
                page_size: 1000,
                page_token: token.clone(),
                state: state as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        n += p.vps.len();
        if p.next_page_token.is_empty() {
            return Ok(n);
        }
        token = p.next_page_token;
    }
}
