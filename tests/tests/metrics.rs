//! The agent's `/metrics`: a hung domain never delays a scrape and shows as
//! stale, and `promtool` accepts the exposition, odd names included.

use std::{sync::Arc, time::Duration, time::Instant};

use betang_agent::{
    config::{AgentConfig, CapacityConfig, DomainTypeSetting, HypervisorSetting, NetworkConfig},
    domain_xml::{DomainSpec, DomainType, VpsMetadata},
    hypervisor::{Hypervisor, NodeFacts, SimulatedHypervisor},
    names,
};
use betang_tests::{eventually, http_get, http_get_with, promtool_check_metrics, sample};

const SCRAPE_DEADLINE: Duration = Duration::from_millis(500);

fn domain(hv: &SimulatedHypervisor, n: u32, vps_name: &str) -> String {
    let id = format!("6f1c1c7e-0000-4000-8000-{n:012}");
    let name = names::domain_name(&id);
    let spec = DomainSpec {
        domain_type: DomainType::Qemu,
        name: name.clone(),
        uuid: id.clone(),
        title: vps_name.into(),
        metadata: VpsMetadata {
            vps_id: id,
            generation: 1,
            name: vps_name.into(),
            institution: "dinas-kominfo".into(),
            ..Default::default()
        },
        vcpus: 2,
        memory_mib: 1024,
        root_disk: "/nonexistent/root.qcow2".into(),
        seed_disk: "/nonexistent/seed.img".into(),
        serial_log: "/nonexistent/console.log".into(),
        network: NetworkConfig::None,
        attachment: None,
    };
    hv.define(&spec.to_xml().unwrap()).unwrap();
    hv.start(&name).unwrap();
    name
}

async fn agent_on(
    hv: Arc<SimulatedHypervisor>,
    dir: &std::path::Path,
) -> anyhow::Result<betang_agent::server::RunningAgent> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let cfg = AgentConfig {
        metrics_listen: Some("127.0.0.1:0".parse()?),
        metrics_token_file: None,
        stats_interval_ms: 100,
        guest_unresponsive_after_ms: 300,
        libvirt_unresponsive_after_ms: 1_000,
        host_id: "metrics-test".into(),
        listen: "127.0.0.1:0".parse()?,
        advertise_endpoint: None,
        // Nobody listens there: the agent only warns that it cannot register.
        controller_endpoint: "http://127.0.0.1:9".into(),
        libvirt_uri: "test:///default".into(),
        hypervisor: HypervisorSetting::Simulated,
        simulated_persist: false,
        domain_type: DomainTypeSetting::Qemu,
        image_dir: images,
        vm_dir: dir.join("vms"),
        heartbeat_interval_ms: 60_000,
        reconcile_interval_seconds: 3600,
        libvirt_call_timeout_seconds: 5,
        capacity: Some(CapacityConfig {
            vcpus: 16,
            memory_mib: 65536,
            disk_gib: 1000,
        }),
        network: NetworkConfig::None,
        tls: None,
        zone: String::new(),
        labels: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    betang_agent::server::start_with(cfg, listener, hv).await
}

async fn timed_scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let t = Instant::now();
    let body = tokio::time::timeout(SCRAPE_DEADLINE, http_get(addr, "/metrics"))
        .await
        .map_err(|_| anyhow::anyhow!("a scrape took longer than {SCRAPE_DEADLINE:?}"))??;
    assert!(t.elapsed() < SCRAPE_DEADLINE);
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_domain_neither_delays_a_scrape_nor_the_others() -> anyhow::Result<()> {
    betang_tests::init_tracing();
    let dir = tempfile::tempdir()?;
    let hv = Arc::new(SimulatedHypervisor::new(NodeFacts {
        cpus: 16,
        memory_kib: 64 << 20,
    }));
    let hung = domain(&hv, 1, "stuck");
    let fine = domain(&hv, 2, "fine");
    let agent = agent_on(hv.clone(), dir.path()).await?;
    let addr = agent.metrics_addr.expect("metrics_listen was set");
    let labels = |d: &str| vec![("domain", d.to_owned())];
    let value = |body: &str, metric: &str, d: &str| {
        let l = labels(d);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        sample(body, metric, &l)
    };
    eventually(Duration::from_secs(10), "both domains measured", || async {
        let body = timed_scrape(addr).await.expect("scrape");
        (value(&body, "betang_vm_cpu_seconds_total", &hung).is_some()
            && value(&body, "betang_vm_cpu_seconds_total", &fine).is_some())
        .then_some(())
    })
    .await?;

    hv.hang(&hung);
    // Released however the test ends, so no blocking thread outlives it.
    struct Release(Arc<SimulatedHypervisor>, String);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release(&self.1);
        }
    }
    let _release = Release(hv.clone(), hung.clone());
    let body = eventually(
        Duration::from_secs(10),
        "the hung domain marked stale and not answering",
        || async {
            let body = timed_scrape(addr).await.expect("scrape");
            (value(&body, "betang_vm_stats_stale", &hung) == Some(1.0)
                && value(&body, "betang_vm_responding", &hung) == Some(0.0))
            .then_some(body)
        },
    )
    .await?;
    assert_eq!(value(&body, "betang_vm_stats_stale", &fine), Some(0.0));
    let frozen = value(&body, "betang_vm_cpu_seconds_total", &hung).expect("last value kept");
    let before = value(&body, "betang_vm_cpu_seconds_total", &fine).unwrap();

    // Scrapes stay fast for a while, the other guest's figures keep moving,
    // the hung one keeps its last value, and the collector stays healthy.
    let mut last = String::new();
    for _ in 0..10 {
        last = timed_scrape(addr).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value(&last, "betang_vm_stats_stale", &hung), Some(1.0));
    assert_eq!(
        value(&last, "betang_vm_cpu_seconds_total", &hung),
        Some(frozen)
    );
    let after = value(&last, "betang_vm_cpu_seconds_total", &fine).unwrap();
    assert!(
        after > before,
        "the healthy guest's CPU seconds must rise: {before} -> {after}"
    );
    // The hung one is reported as not answering, and only it.
    assert_eq!(value(&last, "betang_vm_responding", &hung), Some(0.0));
    assert_eq!(value(&last, "betang_vm_responding", &fine), Some(1.0));
    assert!(value(&last, "betang_vm_unresponsive_seconds", &hung).unwrap() >= 0.3);
    assert_eq!(value(&last, "betang_vm_unresponsive_seconds", &fine), None);
    assert!(value(&last, "betang_vm_stats_age_seconds", &fine).unwrap() < 0.9);
    // It holds one thread: the guest pass that met it.
    assert_eq!(
        sample(&last, "betang_agent_libvirt_calls_running", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&last, "betang_agent_libvirt_responding", &[]),
        Some(1.0)
    );
    let last_ok = sample(
        &last,
        "betang_agent_collection_last_success_timestamp_seconds",
        &[],
    )
    .expect("collector health");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(now - last_ok < 1.0, "passes go on while a domain hangs");
    assert_eq!(
        sample(&last, "betang_agent_collection_failures_total", &[]),
        Some(0.0)
    );

    hv.release(&hung);
    eventually(
        Duration::from_secs(10),
        "the released domain fresh again",
        || async {
            let body = timed_scrape(addr).await.expect("scrape");
            (value(&body, "betang_vm_stats_stale", &hung) == Some(0.0)
                && value(&body, "betang_vm_responding", &hung) == Some(1.0))
            .then_some(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_agent_exposition() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hv = Arc::new(SimulatedHypervisor::new(NodeFacts {
        cpus: 16,
        memory_kib: 64 << 20,
    }));
    let odd = "web \"prod\" <&> \\ naïve/../x";
    let d1 = domain(&hv, 1, odd);
    let d2 = domain(&hv, 2, "plain");
    hv.destroy(&d2)?;
    let agent = agent_on(hv.clone(), dir.path()).await?;
    let body = eventually(Duration::from_secs(10), "a first pass", || async {
        let body = http_get(agent.metrics_addr.unwrap(), "/metrics")
            .await
            .expect("scrape");
        body.contains(&d1).then_some(body)
    })
    .await?;
    promtool_check_metrics(&body)?;
    // The odd name is escaped, not dropped or mangled into another label.
    assert!(
        body.contains(r#"vps_name="web \"prod\" <&> \\ naïve/../x""#),
        "{body}"
    );
    for metric in [
        "betang_host_memory_total_bytes",
        "betang_host_cpu_usage_ratio",
        "betang_vm_vcpus",
        "betang_vm_memory_max_bytes",
        "betang_vm_disk_read_bytes_total",
        "betang_vm_network_receive_packets_total",
        "betang_agent_collection_duration_seconds",
    ] {
        assert!(body.contains(metric), "{metric} missing");
    }
    assert_eq!(
        sample(
            &body,
            "betang_vm_power_state",
            &[("domain", &d1), ("state", "running")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_vm_power_state",
            &[("domain", &d2), ("state", "stopped")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_vm_vcpus",
            &[("institution", "dinas-kominfo"), ("domain", &d1)]
        ),
        Some(2.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_metrics_follow_requests_vps_hosts_and_institutions() -> anyhow::Result<()> {
    use betang_proto::v1::{CordonHostRequest, VpsState, WhoAmIRequest};
    use betang_tests::{Cluster, ClusterOptions, wait_state};

    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let addr = cluster
        .controller
        .as_ref()
        .and_then(|c| c.metrics_addr)
        .expect("controller metrics_listen was set");
    // A network, so that its figures are served (a VPS of institution B
    // would go on it; this test's VPS is for A).
    cluster
        .as_operator()
        .await?
        .networks
        .create_network(betang_proto::v1::CreateNetworkRequest {
            network: Some(betang_proto::v1::Network {
                name: "metrics-net".into(),
                attach_kind: "bridge".into(),
                attach_source: "br-metrics".into(),
                cidr: "198.18.0.0/24".into(),
                ..Default::default()
            }),
        })
        .await?;
    let mut c = cluster.vps_client().await?;
    let v = c
        .create_vps(cluster.create(cluster.spec("m")))
        .await?
        .into_inner();
    let v = wait_state(&c, &v.id, VpsState::Running, Duration::from_secs(120)).await?;
    let stranger = cluster.clients("btg_not_a_real_token").await?;
    assert!(
        stranger
            .identity
            .clone()
            .who_am_i(WhoAmIRequest {})
            .await
            .is_err()
    );
    cluster
        .host_client()
        .await?
        .cordon_host(CordonHostRequest {
            id: cluster.hosts[0].host_id.clone(),
        })
        .await?;

    let body = http_get(addr, "/metrics").await?;
    promtool_check_metrics(&body)?;
    let create = "/betang.v1.VpsService/CreateVps";
    assert_eq!(
        sample(
            &body,
            "betang_rpc_requests_total",
            &[("method", create), ("code", "OK")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_rpc_requests_total",
            &[
                ("method", "/betang.v1.IdentityService/WhoAmI"),
                ("code", "Unauthenticated")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_rpc_duration_seconds_count",
            &[("method", create)]
        ),
        Some(1.0)
    );
    // Heartbeats go through the agent API and are counted too.
    assert!(
        sample(
            &body,
            "betang_rpc_requests_total",
            &[
                ("method", "/betang.v1.RegistryService/Heartbeat"),
                ("code", "OK")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        sample(&body, "betang_vps", &[("state", "RUNNING")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "betang_vps", &[("state", "ERROR")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "betang_hosts", &[("state", "cordoned")]),
        Some(1.0)
    );
    assert_eq!(sample(&body, "betang_hosts", &[("state", "up")]), Some(1.0));
    assert_eq!(
        sample(&body, "betang_hosts", &[("state", "down")]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_host_allocated_vcpus",
            &[("host_id", &v.host_id)]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_host_allocated_memory_bytes",
            &[("host_id", &v.host_id)]
        ),
        Some((512u64 << 20) as f64)
    );
    assert_eq!(
        sample(
            &body,
            "betang_institution_allocated_vcpus",
            &[("institution", &cluster.people.inst_a)]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            "betang_institution_vps",
            &[("institution", &cluster.people.inst_b)]
        ),
        Some(0.0)
    );

    // Every metric the shipped alerts and dashboard read is one the agent or
    // the controller serves (histograms through their _bucket series).
    let mut served = body.clone();
    for h in &cluster.hosts {
        let at = h.agent.as_ref().and_then(|a| a.metrics_addr);
        let at = at.expect("agent metrics");
        let b = eventually(
            Duration::from_secs(10),
            "the VPS in its agent's metrics",
            || async {
                let b = http_get(at, "/metrics").await.expect("scrape");
                (h.host_id != v.host_id
                    || sample(&b, "betang_vm_cpu_seconds_total", &[("vps_id", &v.id)]).is_some())
                .then_some(b)
            },
        )
        .await?;
        served.push_str(&b);
    }
    let exprs = betang_tests::prometheus::shipped_expressions()?;
    assert!(exprs.len() >= 20, "{exprs:?}");
    for e in &exprs {
        for name in betang_tests::prometheus::metric_names(e) {
            assert!(
                served.contains(&format!("\n{name}{{")) || served.contains(&format!("\n{name} ")),
                "{name} (read by {e:?}) is not served"
            );
        }
    }
    Ok(())
}

fn promtool(args: &[&str]) -> anyhow::Result<()> {
    let dir = betang_tests::workspace_root().join("deploy/prometheus");
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn shipped_prometheus_files_pass_promtool() -> anyhow::Result<()> {
    promtool(&["check", "config", "prometheus.yml"])?;
    promtool(&["check", "rules", "betang-rules.yml"])?;
    // The alert rules' own unit tests: each alert fires on what should raise it.
    promtool(&["test", "rules", "betang-rules.test.yml"])
}

/// With `metrics_token_file`, `/metrics` answers only a scrape that carries
/// the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_with_a_token_answer_only_with_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hv = Arc::new(SimulatedHypervisor::new(NodeFacts {
        cpus: 4,
        memory_kib: 8 << 20,
    }));
    let token_file = dir.path().join("metrics.token");
    std::fs::write(&token_file, "scrape-token-0123456789\n")?;
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images)?;
    let mut cfg = AgentConfig::from_toml(&format!(
        "host_id = \"metrics-token\"\ncontroller_endpoint = \"http://127.0.0.1:9\"\n\
         hypervisor = \"simulated\"\ndomain_type = \"qemu\"\nimage_dir = \"{}\"\n\
         vm_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\nmetrics_token_file = \"{}\"\n\
         [capacity]\nvcpus = 4\nmemory_mib = 8192\ndisk_gib = 100\n",
        images.display(),
        dir.path().join("vms").display(),
        token_file.display()
    ))?;
    cfg.heartbeat_interval_ms = 60_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent = betang_agent::server::start_with(cfg, listener, hv).await?;
    let addr = agent.metrics_addr.expect("metrics_listen was set");
    let e = http_get(addr, "/metrics").await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let e = http_get_with(addr, "/metrics", Some("scrape-token-0123456780"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let body = http_get_with(addr, "/metrics", Some("scrape-token-0123456789")).await?;
    assert!(body.contains("betang_agent_domains"), "{body}");
    Ok(())
}
