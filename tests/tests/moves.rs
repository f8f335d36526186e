//! Moving VPS between hosts: draining a host, a move with nowhere to go, and
//! many simulated agents filled and drained.

use std::{path::PathBuf, process::Command, time::Duration};

use betang_agent::{config::CapacityConfig, hypervisor::Power};
use betang_proto::v1::{
    DrainHostRequest, GetVpsRequest, ListAuditRequest, MoveVpsRequest, StartVpsRequest,
    StopVpsRequest, UncordonHostRequest, VpsState,
};
use betang_tests::{
    Cluster, ClusterOptions, eventually, real::qemu_io, state_of, wait_on_host, wait_state,
};
use tonic::Code;

/// Generous: a loaded two-core machine may run the whole suite beside a build.
const T: Duration = Duration::from_secs(120);

fn root_disk(cluster: &Cluster, host: usize, vps_id: &str) -> PathBuf {
    cluster.hosts[host]
        .cfg
        .vm_dir
        .join(vps_id)
        .join("root.qcow2")
}

async fn move_vps(
    cluster: &Cluster,
    token: &str,
    id: &str,
    restart: bool,
) -> Result<betang_proto::v1::Vps, tonic::Status> {
    let mut c = cluster.clients(token).await.expect("clients").vps;
    c.move_vps(MoveVpsRequest {
        id: id.to_owned(),
        restart,
    })
    .await
    .map(|r| r.into_inner())
}

/// Waits until `host`'s hypervisor holds the VPS's domain in `power`.
async fn wait_domain(
    cluster: &Cluster,
    host: usize,
    vps_id: &str,
    power: Power,
) -> anyhow::Result<()> {
    let hv = cluster.hosts[host].hv.clone();
    let dom = format!("betang-{vps_id}");
    eventually(T, &format!("{dom} {power:?} on host {host}"), || {
        let (hv, dom) = (hv.clone(), dom.clone());
        async move { (hv.lookup(&dom).ok()??.power == power).then_some(()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_moves_stopped_vps_and_running_ones_only_when_asked() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let mut c = op.vps.clone();
    let (h0, h1) = (
        cluster.hosts[0].host_id.clone(),
        cluster.hosts[1].host_id.clone(),
    );
    let mut ids = Vec::new();
    for name in ["cold", "warm"] {
        let mut req = cluster.create(cluster.spec(name));
        req.host_id = h0.clone();
        let v = c.create_vps(req).await?.into_inner();
        wait_state(&c, &v.id, VpsState::Running, T).await?;
        ids.push(v.id);
    }
    let (cold, warm) = (ids[0].clone(), ids[1].clone());
    c.stop_vps(StopVpsRequest {
        id: cold.clone(),
        timeout_seconds: 1,
        force: false,
    })
    .await?;
    wait_state(&c, &cold, VpsState::Stopped, T).await?;
    // Something the guest wrote, to find again on the other host.
    qemu_io(&root_disk(&cluster, 0, &cold), "write -P 0xab 1M 64k")?;

    // Only operators move VPS, and a running one only with a restart.
    let member = &cluster.people.member_a;
    let err = move_vps(&cluster, member, &cold, false).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let operator = &cluster.people.operator;
    let err = move_vps(&cluster, operator, &warm, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("restart"), "{}", err.message());

    // Drain, moving the stopped VPS only.
    let r = op
        .hosts
        .clone()
        .drain_host(DrainHostRequest {
            id: h0.clone(),
            move_stopped: true,
            move_running: false,
        })
        .await?
        .into_inner();
    assert!(r.host.unwrap().cordoned);
    let outcome = |id: &str| {
        r.vps
            .iter()
            .find(|v| v.vps_id == id)
            .map(|v| (v.outcome.clone(), v.to_host.clone()))
    };
    assert_eq!(outcome(&cold), Some(("moving".into(), h1.clone())));
    assert_eq!(outcome(&warm), Some(("left".into(), String::new())));
    wait_on_host(&c, &cold, VpsState::Stopped, &h1, T).await?;
    wait_domain(&cluster, 1, &cold, Power::Stopped).await?;
    let old_dir = cluster.hosts[0].cfg.vm_dir.join(&cold);
    eventually(T, "the old copy's files removed from the source", || {
        let gone = !old_dir.exists();
        async move { gone.then_some(()) }
    })
    .await?;
    assert_eq!(cluster.domains(0), vec![format!("betang-{warm}")]);
    // The data came along, and the disk is based on the target's image.
    let read = qemu_io(&root_disk(&cluster, 1, &cold), "read -P 0xab 1M 64k")?;
    assert!(read.contains("read 65536/65536"), "{read}");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(root_disk(&cluster, 1, &cold))
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    let image = cluster.hosts[1].cfg.image_dir.join("tiny.qcow2");
    assert_eq!(info["backing-filename"].as_str(), image.to_str(), "{info}");
    // The warm VPS was not touched.
    wait_state(&c, &warm, VpsState::Running, T).await?;

    // Now the running one too: stopped, moved, started again.
    let r = op
        .hosts
        .clone()
        .drain_host(DrainHostRequest {
            id: h0.clone(),
            move_stopped: true,
            move_running: true,
        })
        .await?
        .into_inner();
    assert_eq!(r.vps.len(), 1);
    assert_eq!(r.vps[0].outcome, "moving");
    wait_on_host(&c, &warm, VpsState::Running, &h1, T).await?;
    wait_domain(&cluster, 1, &warm, Power::Running).await?;
    eventually(T, "nothing left on the drained host", || {
        let empty = cluster.domains(0).is_empty();
        async move { empty.then_some(()) }
    })
    .await?;

    // The moved cold VPS boots from its new host.
    c.start_vps(StartVpsRequest { id: cold.clone() }).await?;
    wait_state(&c, &cold, VpsState::Running, T).await?;
    wait_domain(&cluster, 1, &cold, Power::Running).await?;

    let audit = op
        .audit
        .clone()
        .list_audit(ListAuditRequest {
            target: cold.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let moves: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.action == "vps.move")
        .map(|r| r.result.clone())
        .collect();
    assert_eq!(
        moves,
        [
            format!("MIGRATING from {h0} to {h1}"),
            format!("moved from {h0} to {h1}")
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_with_nowhere_to_go_leaves_the_vps_in_place() -> anyhow::Result<()> {
    use betang_proto::v1::CordonHostRequest;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let mut c = op.vps.clone();
    let (h0, h1) = (
        cluster.hosts[0].host_id.clone(),
        cluster.hosts[1].host_id.clone(),
    );
    let mut req = cluster.create(cluster.spec("stay"));
    req.host_id = h0.clone();
    let id = c.create_vps(req).await?.into_inner().id;
    wait_state(&c, &id, VpsState::Running, T).await?;
    c.stop_vps(StopVpsRequest {
        id: id.clone(),
        timeout_seconds: 1,
        force: true,
    })
    .await?;
    wait_state(&c, &id, VpsState::Stopped, T).await?;
    op.hosts
        .clone()
        .cordon_host(CordonHostRequest { id: h1.clone() })
        .await?;
    let operator = &cluster.people.operator;
    let err = move_vps(&cluster, operator, &id, false).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().ends_with(": 1 cordoned"), "{}", err.message());
    let v = c
        .get_vps(GetVpsRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        (state_of(&v), v.host_id.as_str()),
        (VpsState::Stopped, h0.as_str())
    );
    assert!(root_disk(&cluster, 0, &id).exists());
    wait_domain(&cluster, 0, &id, Power::Stopped).await?;
    // With room again it moves, and back to where it started.
    op.hosts
        .clone()
        .uncordon_host(UncordonHostRequest { id: h1.clone() })
        .await?;
    let v = move_vps(&cluster, operator, &id, false).await?;
    assert_eq!(
        state_of(&v),
        VpsState::Migrating,
        "a move is recorded and runs on"
    );
    assert_eq!(
        (v.host_id.as_str(), v.move_target.as_str()),
        (h0.as_str(), h1.as_str())
    );
    wait_on_host(&c, &id, VpsState::Stopped, &h1, T).await?;
    // The next move waits until this one has removed the old copy and the
    // target has defined the VM.
    eventually(T, "a move back accepted", || async {
        move_vps(&cluster, operator, &id, false).await.ok()
    })
    .await?;
    wait_on_host(&c, &id, VpsState::Stopped, &h0, T).await?;
    wait_domain(&cluster, 0, &id, Power::Stopped).await?;
    eventually(T, "nothing left on the middle host", || {
        let empty = cluster.domains(1).is_empty();
        async move { empty.then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_simulated_agents_hold_what_the_controller_places() -> anyhow::Result<()> {
    let hosts = 12;
    let cluster = Cluster::start(ClusterOptions {
        hosts: vec![
            CapacityConfig {
                vcpus: 4,
                memory_mib: 8192,
                disk_gib: 200,
            };
            hosts
        ],
        simulated: true,
        ..ClusterOptions::default()
    })
    .await?;
    let c = cluster.vps_client().await?;
    let creates: Vec<_> = (0..36)
        .map(|i| {
            let mut c = c.clone();
            let req = cluster.create(cluster.spec(&format!("s{i}")));
            tokio::spawn(async move { c.create_vps(req).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut placed = Vec::new();
    for t in creates {
        placed.push(t.await??);
    }
    for v in &placed {
        wait_state(&c, &v.id, VpsState::Running, T).await?;
    }
    // Each simulated host holds exactly the VPS the controller put on it.
    for (i, h) in cluster.hosts.iter().enumerate() {
        let mut want: Vec<String> = placed
            .iter()
            .filter(|v| v.host_id == h.host_id)
            .map(|v| format!("betang-{}", v.id))
            .collect();
        want.sort();
        let mut have = cluster.domains(i);
        have.sort();
        assert_eq!(have, want, "host {}", h.host_id);
        assert_eq!(want.len(), 3, "spread puts three on each of the hosts");
    }
    // Draining one moves its running guests to the others through the
    // simulated disks, and starts them again there.
    let r = cluster
        .host_client()
        .await?
        .drain_host(DrainHostRequest {
            id: cluster.hosts[0].host_id.clone(),
            move_stopped: true,
            move_running: true,
        })
        .await?
        .into_inner();
    assert_eq!(r.vps.len(), 3);
    for d in &r.vps {
        assert_eq!(d.outcome, "moving", "{d:?}");
        let i = cluster
            .hosts
            .iter()
            .position(|h| h.host_id == d.to_host)
            .unwrap();
        assert_ne!(i, 0);
        wait_on_host(&c, &d.vps_id, VpsState::Running, &d.to_host, T).await?;
        wait_domain(&cluster, i, &d.vps_id, Power::Running).await?;
    }
    eventually(T, "nothing left on the drained host", || {
        let empty = cluster.domains(0).is_empty();
        async move { empty.then_some(()) }
    })
    .await?;
    Ok(())
}

/// The controller stops at different points of a move (recorded, stopping
/// the guest, copying, switching, removing the old copy) and starts again:
/// each time the move is resumed or unwound so that the VPS ends on exactly
/// one host with its data, nothing of it is left on the other, and the
/// store's totals still agree with its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restarted_mid_move_leaves_the_vps_on_one_host_with_its_data()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let c = op.vps.clone();
    let mut req = cluster.create(cluster.spec("keep"));
    req.host_id = cluster.hosts[0].host_id.clone();
    let id = c.clone().create_vps(req).await?.into_inner().id;
    wait_state(&c, &id, VpsState::Running, T).await?;
    c.clone()
        .stop_vps(StopVpsRequest {
            id: id.clone(),
            timeout_seconds: 1,
            force: true,
        })
        .await?;
    wait_state(&c, &id, VpsState::Stopped, T).await?;
    qemu_io(&root_disk(&cluster, 0, &id), "write -P 0x5a 2M 256k")?;
    let operator = cluster.people.operator.clone();
    for (round, delay_ms) in [0u64, 5, 20, 50, 100, 200, 400].into_iter().enumerate() {
        let restart = round % 2 == 1;
        if restart {
            c.clone()
                .start_vps(StartVpsRequest { id: id.clone() })
                .await?;
            wait_state(&c, &id, VpsState::Running, T).await?;
        }
        eventually(T, "move accepted", || async {
            move_vps(&cluster, &operator, &id, restart).await.ok()
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cluster.restart_controller().await?;
        // Settled: no step of the move left, the VPS applied where it is.
        let store = cluster.controller.as_ref().unwrap().store.clone();
        eventually(T, "the move to settle", || {
            let (store, mut c, id) = (store.clone(), c.clone(), id.clone());
            async move {
                let pending = store
                    .run(|db| betang_controller::store::moves::all(db))
                    .await
                    .ok()?;
                let v = betang_tests::fetch(&mut c, id).await?;
                let want = if restart {
                    VpsState::Running
                } else {
                    VpsState::Stopped
                };
                (pending.is_empty() && state_of(&v) == want).then_some(())
            }
        })
        .await?;
        let v = betang_tests::fetch(&mut c.clone(), id.clone())
            .await
            .expect("vps");
        let home = cluster
            .hosts
            .iter()
            .position(|h| h.host_id == v.host_id)
            .expect("on a known host");
        let away = 1 - home;
        let power = if restart {
            Power::Running
        } else {
            Power::Stopped
        };
        wait_domain(&cluster, home, &id, power).await?;
        assert!(
            cluster.domains(away).is_empty(),
            "round {round}: a domain left on the other host"
        );
        assert!(
            !cluster.hosts[away].cfg.vm_dir.join(&id).exists(),
            "round {round}: files left on the other host"
        );
        if restart {
            c.clone()
                .stop_vps(StopVpsRequest {
                    id: id.clone(),
                    timeout_seconds: 1,
                    force: true,
                })
                .await?;
            wait_state(&c, &id, VpsState::Stopped, T).await?;
        }
        let read = qemu_io(&root_disk(&cluster, home, &id), "read -P 0x5a 2M 256k")?;
        assert!(read.contains("read 262144/262144"), "round {round}: {read}");
        store.run_sync(|db| {
            use betang_controller::store::totals;
            assert_eq!(totals::kept(db)?, totals::recounted(db)?, "round {round}");
            Ok(())
        })?;
    }
    Ok(())
}

/// A restart-move with nowhere to go is refused before anything happens:
/// the guest is not stopped, and a drain that could not move it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_move_with_nowhere_to_go_never_stops_the_guest() -> anyhow::Result<()> {
    use betang_proto::v1::CordonHostRequest;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let c = op.vps.clone();
    let (h0, h1) = (
        cluster.hosts[0].host_id.clone(),
        cluster.hosts[1].host_id.clone(),
    );
    let mut req = cluster.create(cluster.spec("busy"));
    req.host_id = h0.clone();
    let id = c.clone().create_vps(req).await?.into_inner().id;
    wait_state(&c, &id, VpsState::Running, T).await?;
    op.hosts
        .clone()
        .cordon_host(CordonHostRequest { id: h1.clone() })
        .await?;
    let err = move_vps(&cluster, &cluster.people.operator, &id, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let r = op
        .hosts
        .clone()
        .drain_host(DrainHostRequest {
            id: h0.clone(),
            move_stopped: true,
            move_running: true,
        })
        .await?
        .into_inner();
    assert!(r.vps[0].outcome.contains("no host fits"), "{:?}", r.vps[0]);
    // Still running where it was, never stopped.
    let v = wait_state(&c, &id, VpsState::Running, T).await?;
    assert_eq!(v.host_id, h0);
    wait_domain(&cluster, 0, &id, Power::Running).await?;
    let audit = op
        .audit
        .clone()
        .list_audit(ListAuditRequest {
            target: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        audit
            .records
            .iter()
            .all(|r| r.action != "vps.stop" && r.action != "vps.move"),
        "{:?}",
        audit.records
    );
    Ok(())
}
