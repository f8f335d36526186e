//! Metrics benchmark: the Betang agent's `/metrics` beside Debian's
//! `prometheus-libvirt-exporter`, both pointed at the same libvirt, scraped
//! in turns. First a libvirt test-driver host of 500 domains
//! (`test:///…/node.xml`), then the real libvirtd with as many real guests as
//! asked. Reports p50/p99 scrape latency for each, and the agent's RSS and
//! CPU per scrape, and ends with one line of JSON. Run by
//! `deploy/bench-metrics.sh`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use betang_proto::v1::{
    DeleteVmRequest, EnsureVmRequest, PowerState, VpsSpec, agent_service_client::AgentServiceClient,
};
use betang_tests::bench::{arg, pct, proc_mib};
use tokio::process::{Child, Command};

/// What Prometheus sends.
const ACCEPT: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

fn cpu_seconds(pid: u32) -> f64 {
    betang_tests::bench::cpu_seconds(&pid.to_string())
}

/// One scrape: status line checked, body returned.
async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: {ACCEPT}\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::with_capacity(1 << 20);
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    if !head.contains(" 200 ") {
        bail!("{addr}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The agent binary on `uri`, serving /metrics; collector every 5 s.
async fn start_agent(
    dir: &Path,
    tag: &str,
    uri: &str,
    image_dir: &Path,
    vm_dir: &Path,
) -> anyhow::Result<(Child, SocketAddr, SocketAddr)> {
    let metrics = free_addr()?;
    let listen = free_addr()?;
    std::fs::create_dir_all(image_dir)?;
    let cfg = dir.join(format!("agent-{tag}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "host_id = \"bench-{tag}\"\nlisten = \"{listen}\"\n\
             controller_endpoint = \"http://127.0.0.1:9\"\nlibvirt_uri = \"{uri}\"\n\
             domain_type = \"qemu\"\nimage_dir = \"{}\"\nvm_dir = \"{}\"\n\
             metrics_listen = \"{metrics}\"\nstats_interval_ms = 5000\n",
            image_dir.display(),
            vm_dir.display()
        ),
    )?;
    let child = Command::new(std::env::current_exe()?.with_file_name("betang-agent"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting target/release/betang-agent")?;
    Ok((child, metrics, listen))
}

fn start_exporter(uri: &str) -> anyhow::Result<(Child, SocketAddr)> {
    let addr = free_addr()?;
    let child = Command::new("prometheus-libvirt-exporter")
        .arg(format!("--libvirt.uri={uri}"))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus-libvirt-exporter (Debian package of that name)")?;
    Ok((child, addr))
}

/// Waits until a scrape of `addr` satisfies `ready`.
async fn wait_for(
    addr: SocketAddr,
    what: &str,
    ready: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(b) = scrape(addr).await
            && ready(&b)
        {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{what} not ready after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Default)]
struct Side {
    lat: Vec<Duration>,
    bytes: usize,
}

/// `rounds` scrapes of each, in turns; the agent's CPU counted over its own scrapes.
async fn scrape_both(
    agent: (SocketAddr, u32),
    exporter: SocketAddr,
    rounds: usize,
) -> anyhow::Result<(Side, Side, f64)> {
    let (mut a, mut e) = (Side::default(), Side::default());
    let mut agent_cpu = 0.0;
    for _ in 0..rounds {
        let cpu0 = cpu_seconds(agent.1);
        let t = Instant::now();
        a.bytes = scrape(agent.0).await?.len();
        a.lat.push(t.elapsed());
        agent_cpu += cpu_seconds(agent.1) - cpu0;
        let t = Instant::now();
        e.bytes = scrape(exporter).await?.len();
        e.lat.push(t.elapsed());
    }
    a.lat.sort();
    e.lat.sort();
    Ok((a, e, agent_cpu / rounds as f64))
}

fn node_xml(domains: usize) -> String {
    let mut x = String::from(
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>128</active><nodes>1</nodes>\
         <sockets>2</sockets><cores>32</cores><threads>2</threads></cpu><memory>1073741824</memory>",
    );
    for i in 0..domains {
        let id = format!("6f1c1c7e-0000-4000-8000-{i:012}");
        x.push_str(&format!(
            "<domain type=\"test\"><name>betang-{id}</name><uuid>{id}</uuid>\
             <memory>1048576</memory><currentMemory>1048576</currentMemory><vcpu>2</vcpu>\
             <os><type>hvm</type></os><metadata><betang:vps xmlns:betang=\"https://betang.dev/xmlns/vps/1\" \
             id=\"{id}\" generation=\"1\" name=\"bench-{i}\" institution=\"dinas-bench\"/></metadata>\
             <devices><disk type=\"file\" device=\"disk\"><source file=\"/guest/{i}.qcow2\"/>\
             <target dev=\"vda\" bus=\"virtio\"/></disk><interface type=\"network\">\
             <source network=\"default\"/><target dev=\"vnet{i}\"/></interface></devices></domain>"
        ));
    }
    x.push_str("</node>");
    x
}

struct Figures {
    agent_p50: f64,
    agent_p99: f64,
    exporter_p50: f64,
    exporter_p99: f64,
    agent_cpu_ms_per_scrape: f64,
    agent_bytes: usize,
    exporter_bytes: usize,
}

fn report(label: &str, a: &Side, e: &Side, cpu: f64) -> Figures {
    let f = Figures {
        agent_p50: pct(&a.lat, 0.5),
        agent_p99: pct(&a.lat, 0.99),
        exporter_p50: pct(&e.lat, 0.5),
        exporter_p99: pct(&e.lat, 0.99),
        agent_cpu_ms_per_scrape: cpu * 1000.0,
        agent_bytes: a.bytes,
        exporter_bytes: e.bytes,
    };
    println!(
        "{label}: betang-agent p50 {:.2} ms, p99 {:.2} ms ({} KiB); \
         prometheus-libvirt-exporter p50 {:.2} ms, p99 {:.2} ms ({} KiB); \
         agent CPU {:.2} ms per scrape",
        f.agent_p50,
        f.agent_p99,
        f.agent_bytes / 1024,
        f.exporter_p50,
        f.exporter_p99,
        f.exporter_bytes / 1024,
        f.agent_cpu_ms_per_scrape,
    );
    f
}

/// Real guests made through the agent's own API, removed however the run ends.
struct Guests {
    uri: String,
    ids: Vec<String>,
    root: PathBuf,
}

impl Drop for Guests {
    fn drop(&mut self) {
        if let Ok(conn) = virt::connect::Connect::open(Some(&self.uri)) {
            for id in &self.ids {
                if let Ok(d) = conn.lookup_domain_by_name(&format!("betang-{id}")) {
                    let _ = d.destroy();
                    let _ = d.undefine();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn real_guests(
    dir: &Path,
    count: usize,
    total: usize,
    rounds: usize,
) -> anyhow::Result<Option<(Figures, usize, f64)>> {
    const URI: &str = "qemu:///system";
    if count == 0 || virt::connect::Connect::open(Some(URI)).is_err() {
        println!("real libvirtd: not reachable at {URI}; skipped (deploy/test.sh starts it)");
        return Ok(None);
    }
    let image = std::process::Command::new("bash")
        .arg(betang_tests::workspace_root().join("deploy/build-test-image.sh"))
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(image.status.success(), "deploy/build-test-image.sh failed");
    let image = PathBuf::from(String::from_utf8(image.stdout)?.trim());
    let prefix = betang_tests::test_prefix();
    // Under /var/lib so that QEMU, running as libvirt-qemu, can read the disks.
    let root = PathBuf::from(format!("/var/lib/betang-bench/{prefix}"));
    let mut guests = Guests {
        uri: URI.into(),
        ids: Vec::new(),
        root: root.clone(),
    };
    let (images, vms) = (root.join("images"), root.join("vms"));
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(&vms)?;
    for d in [Path::new("/var/lib/betang-bench"), &root, &images, &vms] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::copy(&image, images.join("betang-test.qcow2"))?;
    std::fs::write(
        images.join("catalog.toml"),
        "[[image]]\nname = \"betang-test\"\nfile = \"betang-test.qcow2\"\nos = \"busybox\"\n",
    )?;
    let (mut agent, metrics, listen) = start_agent(dir, "real", URI, &images, &vms).await?;
    let pid = agent.id().context("agent exited")?;
    let mut client = {
        let t = Instant::now();
        loop {
            match AgentServiceClient::connect(format!("http://{listen}")).await {
                Ok(c) => break c,
                Err(_) if t.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    for i in 0..count {
        let id = uuid::Uuid::new_v4().to_string();
        guests.ids.push(id.clone());
        client
            .ensure_vm(EnsureVmRequest {
                vps_id: id,
                spec: Some(VpsSpec {
                    name: format!("{prefix}-g{i}"),
                    vcpus: 1,
                    memory_mib: 128,
                    disk_gib: 1,
                    image: "betang-test".into(),
                    ..Default::default()
                }),
                desired_power: PowerState::Running as i32,
                generation: 1,
                institution_id: "dinas-bench".into(),
                ..Default::default()
            })
            .await
            .context("creating a real guest through the agent")?;
    }
    // Up to `total` domains on the real libvirtd: the rest defined but shut
    // off (this machine cannot run hundreds of guests), so the agent's memory
    // is measured at that many domains with libvirt's state in libvirtd, where
    // it lives in production.
    let conn = virt::connect::Connect::open(Some(URI))?;
    for i in count..total {
        let id = uuid::Uuid::new_v4().to_string();
        guests.ids.push(id.clone());
        conn.define_domain_xml(&format!(
            "<domain type=\"qemu\"><name>betang-{id}</name><uuid>{id}</uuid>\
             <memory unit=\"MiB\">128</memory><vcpu>1</vcpu><os><type arch=\"x86_64\">hvm</type></os>\
             <metadata><betang:vps xmlns:betang=\"https://betang.dev/xmlns/vps/1\" id=\"{id}\" \
             generation=\"1\" name=\"{prefix}-off{i}\" institution=\"dinas-bench\"/></metadata>\
             </domain>"
        ))?;
    }
    let (mut exporter, exporter_addr) = start_exporter(URI)?;
    let last = format!("betang-{}", guests.ids.last().cloned().unwrap_or_default());
    wait_for(metrics, "agent with its guests", |b| {
        b.contains(&last) && b.contains("betang_vm_cpu_seconds_total")
    })
    .await?;
    let first = format!("betang-{}", guests.ids.first().cloned().unwrap_or_default());
    wait_for(exporter_addr, "exporter", |b| b.contains(&first)).await?;
    let (a, e, cpu) = scrape_both((metrics, pid), exporter_addr, rounds).await?;
    let f = report(
        &format!(
            "real libvirtd, {count} running QEMU guests and {} shut off",
            total.saturating_sub(count)
        ),
        &a,
        &e,
        cpu,
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let real_rss = proc_mib(&pid.to_string(), "status", "VmRSS:");
    println!(
        "agent on real libvirtd at {} domains: RSS {real_rss:.1} MiB; exporter RSS {:.1} MiB",
        total.max(count),
        proc_mib(&exporter.id().unwrap_or(0).to_string(), "status", "VmRSS:")
    );
    for id in &guests.ids {
        let _ = client
            .delete_vm(DeleteVmRequest { vps_id: id.clone() })
            .await;
    }
    agent.kill().await.ok();
    exporter.kill().await.ok();
    drop(guests);
    Ok(Some((f, count, real_rss)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Lookups of guests already gone are expected during cleanup; libvirt
    // would print each one.
    virt::error::clear_error_callback();
    let domains = arg("--domains", 500);
    let rounds = arg("--scrapes", 200);
    let guests = arg("--guests", 3);
    let dir = tempfile::tempdir()?;
    let node = dir.path().join("node.xml");
    std::fs::write(&node, node_xml(domains))?;
    let uri = format!("test://{}", node.display());

    let (mut agent, metrics, _) = start_agent(
        dir.path(),
        "test",
        &uri,
        &dir.path().join("images"),
        &dir.path().join("vms"),
    )
    .await?;
    let pid = agent.id().context("agent exited")?;
    let (mut exporter, exporter_addr) = start_exporter(&uri)?;
    let last = format!("betang-6f1c1c7e-0000-4000-8000-{:012}", domains - 1);
    wait_for(metrics, "agent", |b| {
        b.contains(&last) && b.contains("betang_vm_disk_read_bytes_total")
    })
    .await?;
    wait_for(exporter_addr, "exporter", |b| b.contains(&last)).await?;

    // The agent's own cost while nobody scrapes: its collector, every 5 s.
    let quiet = Duration::from_secs(15);
    let cpu0 = cpu_seconds(pid);
    tokio::time::sleep(quiet).await;
    let idle_cpu_per_s = (cpu_seconds(pid) - cpu0) / quiet.as_secs_f64();

    let (a, e, cpu) = scrape_both((metrics, pid), exporter_addr, rounds).await?;
    let test_fig = report(&format!("test driver, {domains} domains"), &a, &e, cpu);
    // Give the collector a pass to hand the scrapes' memory back, as it does every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_mib = proc_mib(&pid.to_string(), "status", "VmRSS:");
    let hwm_mib = proc_mib(&pid.to_string(), "status", "VmHWM:");
    let anon_mib = proc_mib(&pid.to_string(), "status", "RssAnon:");
    let file_mib = proc_mib(&pid.to_string(), "status", "RssFile:");
    let pss_mib = proc_mib(&pid.to_string(), "smaps_rollup", "Pss:");
    let exporter_rss_mib = proc_mib(&exporter.id().unwrap_or(0).to_string(), "status", "VmRSS:");
    // One scrape every 15 s plus the collector's own work, as a share of one core.
    let core_pct_at_15s = (idle_cpu_per_s + cpu / 15.0) * 100.0;
    println!(
        "agent at {domains} domains: RSS {rss_mib:.1} MiB (peak {hwm_mib:.1} MiB; heap and stacks \
         {anon_mib:.1} MiB, holding the test driver's own copy of the domains; binary and shared \
         libraries {file_mib:.1} MiB; PSS {pss_mib:.1} MiB); collector {:.2} ms CPU per second; \
         {core_pct_at_15s:.3} % of one core at a 15 s scrape interval; exporter RSS \
         {exporter_rss_mib:.1} MiB",
        idle_cpu_per_s * 1000.0
    );
    println!(
        "p99 ratio agent/exporter: {:.4} (goal: at most 0.1)",
        test_fig.agent_p99 / test_fig.exporter_p99
    );
    agent.kill().await.ok();
    exporter.kill().await.ok();

    let real = real_guests(dir.path(), guests, domains, rounds / 4).await?;
    let mut json = serde_json::json!({
        "domains": domains,
        "scrapes_each": rounds,
        "agent_p50_ms": test_fig.agent_p50,
        "agent_p99_ms": test_fig.agent_p99,
        "exporter_p50_ms": test_fig.exporter_p50,
        "exporter_p99_ms": test_fig.exporter_p99,
        "p99_ratio": test_fig.agent_p99 / test_fig.exporter_p99,
        "agent_cpu_ms_per_scrape": test_fig.agent_cpu_ms_per_scrape,
        "agent_collector_cpu_ms_per_s": idle_cpu_per_s * 1000.0,
        "agent_core_pct_at_15s": core_pct_at_15s,
        "agent_rss_mib": rss_mib,
        "agent_rss_anon_mib": anon_mib,
        "agent_rss_file_mib": file_mib,
        "agent_pss_mib": pss_mib,
        "exporter_rss_mib": exporter_rss_mib,
        "agent_peak_rss_mib": hwm_mib,
        "agent_bytes": test_fig.agent_bytes,
        "exporter_bytes": test_fig.exporter_bytes,
    });
    if let Some((f, n, rss)) = real {
        json["real_guests"] = n.into();
        json["real_domains"] = domains.max(n).into();
        json["real_agent_rss_mib"] = rss.into();
        json["real_agent_p50_ms"] = f.agent_p50.into();
        json["real_agent_p99_ms"] = f.agent_p99.into();
        json["real_exporter_p50_ms"] = f.exporter_p50.into();
        json["real_exporter_p99_ms"] = f.exporter_p99.into();
    }
    println!("{json}");
    Ok(())
}
