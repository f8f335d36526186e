//! End to end on the real libvirtd (qemu:///system) with a real QEMU guest:
//! the offline-built test image boots from its qcow2 overlay, reads its
//! hostname from the NoCloud seed and prints it on the serial console.
//!
//! This test needs root and libvirtd; `deploy/test.sh` provides both. It
//! fails (never skips) when they are missing.

use std::{path::Path, time::Duration};

use anyhow::Context;
use betang_proto::v1::{
    ApproveVpsRequest, CreateVpsRequest, DeleteVpsRequest, GetVpsRequest, ListAuditRequest, Quota,
    RebootVpsRequest, StartVpsRequest, StopVpsRequest, VpsSpec, VpsState,
};
use betang_tests::{
    Authed, application, eventually, prometheus::Prometheus, real::RealHost, wait_state,
};

const BOOT: Duration = Duration::from_secs(240);

fn serial(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

async fn wait_serial(path: &Path, needle: &str, count: usize) -> anyhow::Result<()> {
    let p = path.to_path_buf();
    let n = needle.to_owned();
    eventually(
        BOOT,
        &format!("{count}× {needle:?} on the serial console"),
        || {
            let (p, n) = (p.clone(), n.clone());
            async move { (serial(&p).matches(&n).count() >= count).then_some(()) }
        },
    )
    .await
    .map_err(|e| e.context(format!("console so far:\n{}", serial(path))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vps_boots_as_a_real_qemu_guest() -> anyhow::Result<()> {
    let quota = Quota {
        vcpus: 4,
        memory_mib: 1024,
        disk_gib: 10,
        vps_count: 2,
    };
    let host = RealHost::start(quota).await?;
    let (prefix, people, host_id) = (&host.prefix, &host.people, &host.host_id);
    let operator = host.operator().await?;
    let member = host.member().await?;
    let mut c = member.vps.clone();
    let (conn, controller, vm_dir) = (&host.conn, &host.controller, &host.vm_dir);
    let agent = host.agent();
    let domain = |_: &virt::connect::Connect, id: &str| host.domain(id);
    let dir = &host.dir;

    // A member of institution A asks; an operator approves.
    let name = format!("{prefix}-e2e");
    let v = c
        .create_vps(CreateVpsRequest {
            request_id: format!("{prefix}-req"),
            spec: Some(VpsSpec {
                name: name.clone(),
                vcpus: 2,
                memory_mib: 128,
                disk_gib: 1,
                image: "betang-test".into(),
                ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2eTestKey e2e@betang".into(),
                user_data: "#cloud-config\nruncmd: [echo hi]\n".into(),
                network: String::new(),
            }),
            application: Some(application()),
            institution_id: String::new(),
            host_id: String::new(),
            placement: None,
            ip_address: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(v.state, VpsState::PendingApproval as i32);
    let t0 = std::time::Instant::now();
    operator
        .vps
        .clone()
        .approve_vps(ApproveVpsRequest {
            id: v.id.clone(),
            ..Default::default()
        })
        .await?;
    let id = v.id.clone();
    wait_state(&c, &id, VpsState::Running, Duration::from_secs(120)).await?;
    let running_after = t0.elapsed();

    let console = agent.vms.serial_log(&id)?;
    wait_serial(&console, "BETANG-BOOT-OK", 1).await?;
    wait_serial(&console, &format!("BETANG-HOSTNAME={name}"), 1).await?;
    wait_serial(&console, &format!("BETANG-INSTANCE-ID={id}"), 1).await?;
    let booted_after = t0.elapsed();
    eprintln!(
        "figures: RUNNING after {:.2} s, guest init read its seed after {:.2} s",
        running_after.as_secs_f64(),
        booted_after.as_secs_f64()
    );

    // libvirt agrees with what was asked.
    let dom = domain(conn, &id).context("domain missing")?;
    let info = dom.info()?;
    assert_eq!(info.nr_virt_cpu, 2);
    assert_eq!(info.max_mem, 128 * 1024);
    assert!(dom.is_persistent()?);
    assert!(dom.autostart()?);
    let xml = dom.xml_desc(0)?;
    assert!(xml.contains("<acpi/>"), "{xml}");

    // CPU usage reported through the API grows.
    let cpu = |c: &betang_proto::v1::vps_service_client::VpsServiceClient<Authed>| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.get_vps(GetVpsRequest {
                id,
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .usage
            .map(|u| u.cpu_time_ns)
        }
    };
    let first = eventually(Duration::from_secs(30), "usage", || cpu(&c)).await?;
    eventually(Duration::from_secs(60), "CPU time to grow", || async {
        cpu(&c).await.filter(|t| *t > first)
    })
    .await?;

    // A real Prometheus scrapes the agent and the controller and sees the
    // guest's CPU seconds rise.
    let prom = Prometheus::start(
        dir.path(),
        &[agent.metrics_addr.context("agent metrics")?],
        controller.metrics_addr.context("controller metrics")?,
    )
    .await?;
    let q = format!("betang_vm_cpu_seconds_total{{vps_id=\"{id}\",job=\"betang-agent\"}}");
    let first = eventually(
        Duration::from_secs(60),
        "the guest's CPU seconds in Prometheus",
        || prom.value(&q),
    )
    .await?;
    eventually(
        Duration::from_secs(60),
        "CPU seconds rising in Prometheus",
        || async { prom.value(&q).await.filter(|v| *v > first) },
    )
    .await?;
    let labelled = prom.query(&q).await?;
    assert_eq!(labelled[0]["metric"]["vps_name"], name.as_str());
    assert_eq!(labelled[0]["metric"]["institution"], people.inst_a.as_str());
    assert_eq!(
        prom.value("betang_vps{state=\"RUNNING\",job=\"betang-controller\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        prom.value(&format!("betang_host_up{{host_id=\"{host_id}\"}}"))
            .await,
        Some(1.0)
    );
    // Prometheus accepts every expression Betang ships, and the alert rules
    // load and evaluate without error.
    for e in betang_tests::prometheus::shipped_expressions()? {
        prom.query(&e)
            .await
            .with_context(|| format!("shipped expression {e:?}"))?;
    }
    let rules = eventually(
        Duration::from_secs(30),
        "the alert rules evaluated",
        || async {
            let data = prom.api("rules").await.ok()?;
            let rules = data["groups"][0]["rules"].as_array()?.clone();
            rules.iter().all(|r| r["health"] == "ok").then_some(rules)
        },
    )
    .await?;
    // Every rule the shipped file defines.
    let shipped = std::fs::read_to_string(
        betang_tests::workspace_root().join("deploy/prometheus/betang-rules.yml"),
    )?;
    assert_eq!(rules.len(), shipped.matches("- alert:").count());
    assert_eq!(rules.len(), 11);
    drop(prom);

    // Graceful stop: the test guest powers off on the ACPI button.
    let t = std::time::Instant::now();
    c.stop_vps(StopVpsRequest {
        id: id.clone(),
        timeout_seconds: 60,
        force: false,
    })
    .await?;
    wait_state(&c, &id, VpsState::Stopped, Duration::from_secs(120)).await?;
    eprintln!(
        "figures: graceful stop took {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(serial(&console).contains("BETANG-POWER-BUTTON"));
    let dom = domain(conn, &id).context("domain missing after stop")?;
    assert!(!dom.is_active()?);
    assert!(!dom.autostart()?);

    c.start_vps(StartVpsRequest { id: id.clone() }).await?;
    wait_state(&c, &id, VpsState::Running, Duration::from_secs(120)).await?;
    wait_serial(&console, "BETANG-BOOT-OK", 2).await?;

    c.reboot_vps(RebootVpsRequest {
        id: id.clone(),
        force: true,
    })
    .await?;
    wait_serial(&console, "BETANG-BOOT-OK", 3).await?;

    c.delete_vps(DeleteVpsRequest { id: id.clone() }).await?;
    wait_state(&c, &id, VpsState::Deleted, Duration::from_secs(120)).await?;
    assert!(domain(conn, &id).is_none(), "domain left behind");
    assert!(!vm_dir.join(&id).exists(), "disk or seed left behind");

    // Every step is in the audit trail, attributed to who did it.
    let audit = operator
        .audit
        .clone()
        .list_audit(ListAuditRequest {
            target: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let actions: Vec<_> = audit.records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "vps.request",
            "vps.approve",
            "vps.stop",
            "vps.start",
            "vps.reboot",
            "vps.delete"
        ]
    );
    Ok(())
}
