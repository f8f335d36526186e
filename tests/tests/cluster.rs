//! A controller and two agents on libvirt's test driver, in-process.

use std::{collections::HashMap, time::Duration};

use betang_agent::config::CapacityConfig;
use betang_proto::v1::{
    CreateVpsRequest, DeleteVpsRequest, GetVpsRequest, HostState, ListHostsRequest,
    ListImagesRequest, ListVpsRequest, PowerState, RebootVpsRequest, StartVpsRequest,
    StopVpsRequest, VpsState,
};
use betang_tests::{Cluster, ClusterOptions, eventually, fetch, state_of, wait_state};
use tonic::Code;

/// Generous: a loaded two-core machine may run the whole suite beside a build.
const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_create_list_stop_start_reboot_delete() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut c = cluster.vps_client().await?;

    let images = c
        .list_images(ListImagesRequest {})
        .await?
        .into_inner()
        .images;
    assert_eq!(
        images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["tiny"]
    );

    let mut ids = Vec::new();
    for n in ["a", "b"] {
        let v = c
            .create_vps(cluster.create(cluster.spec(n)))
            .await?
            .into_inner();
        assert_eq!(state_of(&v), VpsState::Scheduled);
        assert!(!v.host_id.is_empty());
        ids.push(v.id);
    }
    let mut placed_on = Vec::new();
    for id in &ids {
        let v = wait_state(&c, id, VpsState::Running, T).await?;
        placed_on.push(v.host_id.clone());
    }
    // Least loaded first: the two VPS land on different hosts.
    assert_ne!(placed_on[0], placed_on[1]);
    let host_index = |host: &str| {
        cluster
            .hosts
            .iter()
            .position(|h| h.host_id == host)
            .unwrap()
    };
    for (id, host) in ids.iter().zip(&placed_on) {
        let doms = cluster.domains(host_index(host));
        assert_eq!(doms, vec![format!("betang-{id}")]);
    }

    let list = c
        .list_vps(ListVpsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(list.vps.len(), 1);
    assert!(!list.next_page_token.is_empty());
    let rest = c
        .list_vps(ListVpsRequest {
            page_size: 1,
            page_token: list.next_page_token,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(rest.vps.len(), 1);
    assert!(rest.next_page_token.is_empty());
    assert_ne!(list.vps[0].id, rest.vps[0].id);

    // Usage arrives with heartbeats.
    let id = ids[0].clone();
    let host = host_index(&placed_on[0]);
    eventually(T, "usage reported", || {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            let v = fetch(&mut c, id).await?;
            v.usage
                .filter(|u| u.memory_max_bytes == 512 << 20 && u.cpu_time_ns > 0)
        }
    })
    .await?;

    // Stop: desired changes at once, the state follows the agent.
    let v = c
        .stop_vps(StopVpsRequest {
            id: id.clone(),
            timeout_seconds: 1,
            force: false,
        })
        .await?
        .into_inner();
    assert_eq!(v.desired_power, PowerState::Stopped as i32);
    wait_state(&c, &id, VpsState::Stopped, T).await?;
    let d = cluster.hosts[host]
        .hv
        .lookup(&format!("betang-{id}"))?
        .unwrap();
    assert_eq!(d.power, betang_agent::hypervisor::Power::Stopped);
    assert!(!d.autostart, "a stopped VPS must not autostart");

    let err = c
        .reboot_vps(RebootVpsRequest {
            id: id.clone(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    c.start_vps(StartVpsRequest { id: id.clone() }).await?;
    wait_state(&c, &id, VpsState::Running, T).await?;
    let d = cluster.hosts[host]
        .hv
        .lookup(&format!("betang-{id}"))?
        .unwrap();
    assert_eq!(d.power, betang_agent::hypervisor::Power::Running);
    assert!(d.autostart);
    c.reboot_vps(RebootVpsRequest {
        id: id.clone(),
        force: true,
    })
    .await?;

    for id in &ids {
        let v = c
            .delete_vps(DeleteVpsRequest { id: id.clone() })
            .await?
            .into_inner();
        assert_eq!(state_of(&v), VpsState::Deleting);
    }
    for id in &ids {
        wait_state(&c, id, VpsState::Deleted, T).await?;
    }
    for i in 0..2 {
        assert!(cluster.domains(i).is_empty(), "host {i} still has domains");
        let vm_dir = &cluster.hosts[i].cfg.vm_dir;
        assert_eq!(
            betang_tests::vm_dir_entries(vm_dir)?,
            Vec::<String>::new(),
            "files left in {vm_dir:?}"
        );
    }
    // Deleted VPS are hidden unless asked for, and their capacity is free.
    assert!(
        c.list_vps(ListVpsRequest::default())
            .await?
            .into_inner()
            .vps
            .is_empty()
    );
    let all = c
        .list_vps(ListVpsRequest {
            include_deleted: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(all.vps.len(), 2);
    let hosts = cluster
        .host_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?;
    for h in &hosts.get_ref().hosts {
        assert_eq!(h.allocated.unwrap().vcpus, 0, "{}", h.id);
    }
    // Deleting again is harmless.
    let again = c
        .delete_vps(DeleteVpsRequest { id: ids[0].clone() })
        .await?;
    assert_eq!(state_of(again.get_ref()), VpsState::Deleted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_request_id_twice_gives_one_vps() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let c = cluster.vps_client().await?;
    let req = cluster.create(cluster.spec("once"));
    // Ten concurrent retries of one request.
    let results = futures::future::join_all((0..10).map(|_| {
        let mut c = c.clone();
        let req = req.clone();
        async move { c.create_vps(req).await }
    }))
    .await;
    let ids: std::collections::BTreeSet<_> = results
        .into_iter()
        .map(|r| r.map(|v| v.into_inner().id))
        .collect::<Result<_, _>>()?;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids.into_iter().next().unwrap();
    wait_state(&c, &id, VpsState::Running, T).await?;
    let total: usize = (0..2).map(|i| cluster.domains(i).len()).sum();
    assert_eq!(total, 1);

    // The same request id with another spec is refused, and nothing is created.
    let mut other = req.clone();
    other.spec.as_mut().unwrap().vcpus = 2;
    let err = c.clone().create_vps(other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("request_id:"),
        "{}",
        err.message()
    );
    let all = c
        .clone()
        .list_vps(ListVpsRequest::default())
        .await?
        .into_inner();
    assert_eq!(all.vps.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vps_that_fits_nowhere_is_refused_with_reasons() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut c = cluster.vps_client().await?;
    let mut spec = cluster.spec("huge");
    spec.memory_mib = 32 * 1024;
    let err = c.create_vps(cluster.create(spec)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "no host fits 1 vCPU / 32768 MiB memory / 5 GiB disk with image tiny: 2 lack memory"
    );
    let mut spec = cluster.spec("many-cpus");
    spec.vcpus = 64;
    let err = c.create_vps(cluster.create(spec)).await.unwrap_err();
    assert!(
        err.message().ends_with(": 2 lack vCPUs"),
        "{}",
        err.message()
    );
    assert!(
        c.list_vps(ListVpsRequest {
            include_deleted: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .vps
        .is_empty()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_names_the_field_and_creates_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut c = cluster.vps_client().await?;
    type Mutate = Box<dyn Fn(&mut betang_proto::v1::VpsSpec)>;
    let cases: Vec<(&str, Mutate)> = vec![
        ("name", Box::new(|s| s.name = "web\"<&>/..".into())),
        ("name", Box::new(|s| s.name = "dinas-pendidikan-ü".into())),
        ("vcpus", Box::new(|s| s.vcpus = 0)),
        ("memory_mib", Box::new(|s| s.memory_mib = u64::MAX)),
        ("disk_gib", Box::new(|s| s.disk_gib = 0)),
        ("image", Box::new(|s| s.image = "../../etc/passwd".into())),
        ("image", Box::new(|s| s.image = "ubuntu-99".into())),
        (
            "ssh_public_key",
            Box::new(|s| s.ssh_public_key = "hello".into()),
        ),
    ];
    for (field, mutate) in cases {
        let mut spec = cluster.spec("bad");
        mutate(&mut spec);
        let err = c.create_vps(cluster.create(spec)).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            err.message()
        );
    }
    let err = c
        .create_vps(CreateVpsRequest {
            request_id: String::new(),
            ..cluster.create(cluster.spec("x"))
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("request_id: "));
    // Ids that are not ids, and ids that do not exist, are both simply not found.
    for id in ["../../etc", "", &uuid::Uuid::new_v4().to_string()] {
        let err = c
            .get_vps(GetVpsRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{id}");
        let err = c
            .delete_vps(DeleteVpsRequest { id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{id}");
    }
    let err = c
        .list_vps(ListVpsRequest {
            page_token: "abc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("page_token: "));
    assert!(
        c.list_vps(ListVpsRequest {
            include_deleted: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .vps
        .is_empty()
    );
    for i in 0..2 {
        assert!(cluster.domains(i).is_empty());
    }
    Ok(())
}

/// Many placements at once never overfill a host: with room for exactly
/// twelve 1-vCPU VPS (two hosts of 6 vCPUs at ratio 1), 30 concurrent
/// requests give exactly 12 placements.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_placements_never_overfill() -> anyhow::Result<()> {
    let cap = CapacityConfig {
        vcpus: 6,
        memory_mib: 65536,
        disk_gib: 1000,
    };
    let mut cluster = Cluster::start(ClusterOptions {
        hosts: vec![cap; 2],
        ..Default::default()
    })
    .await?;
    // Restart the controller with no CPU overcommit.
    cluster.controller_cfg.overcommit.cpu = 1.0;
    cluster.restart_controller().await?;
    let c = cluster.vps_client().await?;
    let results = futures::future::join_all((0..30).map(|i| {
        let mut c = c.clone();
        let req = cluster.create(cluster.spec(&format!("p{i}")));
        async move { c.create_vps(req).await }
    }))
    .await;
    let mut per_host: HashMap<String, usize> = HashMap::new();
    let mut refused = 0;
    for r in results {
        match r {
            Ok(v) => *per_host.entry(v.into_inner().host_id).or_default() += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 18);
    assert_eq!(per_host.values().copied().collect::<Vec<_>>(), vec![6, 6]);
    // And every one of them really becomes a running guest.
    let list = c
        .clone()
        .list_vps(ListVpsRequest::default())
        .await?
        .into_inner();
    for v in &list.vps {
        wait_state(&c, &v.id, VpsState::Running, T).await?;
    }
    assert_eq!(cluster.domains(0).len() + cluster.domains(1).len(), 12);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_host_goes_down_and_comes_back_without_losing_guests() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut c = cluster.vps_client().await?;
    let v = c
        .create_vps(cluster.create(cluster.spec("keep")))
        .await?
        .into_inner();
    let v = wait_state(&c, &v.id, VpsState::Running, T).await?;
    let i = cluster
        .hosts
        .iter()
        .position(|h| h.host_id == v.host_id)
        .unwrap();
    let dom = format!("betang-{}", v.id);
    let before = cluster.hosts[i]
        .libvirt
        .as_ref()
        .expect("a test-driver host")
        .conn()?
        .lookup_domain_by_name(&dom)?
        .id();

    cluster.stop_agent(i);
    let host_id = v.host_id.clone();
    cluster.wait_host_state(&host_id, HostState::Down).await?;
    // Nothing new lands on a down host, and its VPS are not touched.
    let mut spec = cluster.spec("elsewhere");
    spec.vcpus = 1;
    let other = c.create_vps(cluster.create(spec)).await?.into_inner();
    assert_ne!(other.host_id, host_id);
    let still = c
        .get_vps(GetVpsRequest {
            id: v.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // Not deleted, not moved: shown as UNKNOWN while its host is silent.
    assert_eq!(state_of(&still), VpsState::Unknown);
    assert_eq!(still.host_id, host_id);

    // The agent restarts: it adopts the running guest without restarting it.
    cluster.start_agent(i).await?;
    cluster.wait_host_state(&host_id, HostState::Up).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = cluster.hosts[i]
        .libvirt
        .as_ref()
        .expect("a test-driver host")
        .conn()?
        .lookup_domain_by_name(&dom)?
        .id();
    assert_eq!(before, after, "the guest was restarted");
    assert!(before.is_some());
    assert_eq!(cluster.domains(i), vec![dom]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_restarting_mid_way_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let c = cluster.vps_client().await?;
    let mut ids = Vec::new();
    for i in 0..4 {
        let v = c
            .clone()
            .create_vps(cluster.create(cluster.spec(&format!("r{i}"))))
            .await?;
        ids.push(v.into_inner().id);
    }
    // Restart before the reconciler has necessarily finished.
    cluster.restart_controller().await?;
    let c = cluster.vps_client().await?;
    for id in &ids {
        wait_state(&c, id, VpsState::Running, T).await?;
    }
    assert_eq!(cluster.domains(0).len() + cluster.domains(1).len(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_removed_behind_betangs_back_is_recreated() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let c = cluster.vps_client().await?;
    let v = c
        .clone()
        .create_vps(cluster.create(cluster.spec("heal")))
        .await?
        .into_inner();
    let v = wait_state(&c, &v.id, VpsState::Running, T).await?;
    let i = cluster
        .hosts
        .iter()
        .position(|h| h.host_id == v.host_id)
        .unwrap();
    let dom = format!("betang-{}", v.id);
    cluster.hosts[i].hv.undefine(&dom)?;
    let hv = cluster.hosts[i].hv.clone();
    eventually(T, "domain recreated and running", || {
        let hv = hv.clone();
        let dom = dom.clone();
        async move {
            let d = hv.lookup(&dom).ok()??;
            (d.power == betang_agent::hypervisor::Power::Running).then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_build_goes_to_error_and_releases_everything() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let c = cluster.vps_client().await?;
    // The image disappears from the hosts after they announced it.
    let image_dir = &cluster.hosts[0].cfg.image_dir;
    std::fs::remove_file(image_dir.join("tiny.qcow2"))?;
    let v = c
        .clone()
        .create_vps(cluster.create(cluster.spec("doomed")))
        .await?
        .into_inner();
    let v = wait_state(&c, &v.id, VpsState::Error, T).await?;
    assert!(v.state_reason.contains("tiny"), "{}", v.state_reason);
    // The claim is released once the agent has confirmed nothing is left.
    let id = v.id.clone();
    eventually(T, "claim released", || {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            let v = fetch(&mut c, id).await?;
            v.host_id.is_empty().then_some(())
        }
    })
    .await?;
    for i in 0..2 {
        assert!(cluster.domains(i).is_empty());
        let dir = &cluster.hosts[i].cfg.vm_dir;
        assert!(betang_tests::vm_dir_entries(dir)?.is_empty(), "{dir:?}");
    }
    // Start is refused in ERROR; delete works and needs no host.
    let err = c
        .clone()
        .start_vps(StartVpsRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let d = c
        .clone()
        .delete_vps(DeleteVpsRequest { id })
        .await?
        .into_inner();
    assert_eq!(state_of(&d), VpsState::Deleted);
    Ok(())
}

/// Standard gRPC tools work against both daemons without the .proto files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_answer_on_controller_and_agent() -> anyhow::Result<()> {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let agent_addr = cluster.hosts[0].agent.as_ref().unwrap().addr;
    let agent_channel = betang_tests::mtls_channel(
        &format!("https://{agent_addr}"),
        &cluster.pki,
        betang_controller::pki::CONTROLLER_NAME,
        &cluster.hosts[0].host_id,
    )
    .await?;
    let user_channel = tonic::transport::Endpoint::from_shared(cluster.endpoint.clone())?
        .connect()
        .await?;
    for (ch, service, not_here) in [
        (
            user_channel,
            "betang.v1.VpsService",
            ["betang.v1.AgentService", "betang.v1.RegistryService"],
        ),
        (
            agent_channel,
            "betang.v1.AgentService",
            ["betang.v1.VpsService", "betang.v1.RegistryService"],
        ),
    ] {
        let status = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service} is not SERVING");
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter([req]))
            .await?
            .into_inner();
        let resp = stream.next().await.unwrap()?;
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("no service list");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == service), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
        // Only what this port serves.
        for other in not_here {
            assert!(!names.iter().any(|n| n == other), "{other} in {names:?}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_vps_is_resized_within_quota_and_host() -> anyhow::Result<()> {
    use betang_proto::v1::{GetInstitutionRequest, Quota, ResizeVpsRequest, SetQuotaRequest};
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let c = op.vps.clone();
    let v = c
        .clone()
        .create_vps(cluster.create(cluster.spec("grow")))
        .await?
        .into_inner();
    let v = wait_state(&c, &v.id, VpsState::Running, T).await?;
    let resize = |vcpus: u32, memory_mib: u64, disk_gib: u64| ResizeVpsRequest {
        id: v.id.clone(),
        vcpus,
        memory_mib,
        disk_gib,
    };
    let err = c.clone().resize_vps(resize(2, 0, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    c.clone()
        .stop_vps(StopVpsRequest {
            id: v.id.clone(),
            timeout_seconds: 1,
            force: true,
        })
        .await?;
    wait_state(&c, &v.id, VpsState::Stopped, T).await?;
    let err = c.clone().resize_vps(resize(0, 0, 1)).await.unwrap_err();
    assert!(
        err.message().starts_with("disk_gib: disks only grow"),
        "{}",
        err.message()
    );
    let err = c.clone().resize_vps(resize(40, 0, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().starts_with("no host fits 40 vCPU"),
        "{}",
        err.message()
    );

    let r = c
        .clone()
        .resize_vps(resize(2, 1024, 10))
        .await?
        .into_inner();
    assert_eq!(r.spec.unwrap().vcpus, 2);
    let i = cluster
        .hosts
        .iter()
        .position(|h| h.host_id == v.host_id)
        .unwrap();
    let hv = cluster.hosts[i].hv.clone();
    let dom = format!("betang-{}", v.id);
    eventually(T, "the domain to take the new size", || {
        let (hv, dom) = (hv.clone(), dom.clone());
        async move {
            let d = hv.lookup(&dom).ok()??;
            (d.vcpus == 2 && d.memory_kib == 1024 * 1024).then_some(())
        }
    })
    .await?;
    let disk = cluster.hosts[i].cfg.vm_dir.join(&v.id).join("root.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()?;
    let text = String::from_utf8(info.stdout)?;
    assert!(text.contains("\"virtual-size\": 10737418240"), "{text}");

    // Growth beyond the institution's quota is refused, saying by how much.
    let inst = op
        .identity
        .clone()
        .get_institution(GetInstitutionRequest {
            id: cluster.people.inst_a.clone(),
        })
        .await?
        .into_inner();
    let used = inst.used.unwrap();
    op.identity
        .clone()
        .set_quota(SetQuotaRequest {
            institution_id: cluster.people.inst_a.clone(),
            quota: Some(Quota {
                vcpus: used.vcpus,
                ..ClusterOptions::default().quota
            }),
            change: None,
        })
        .await?;
    let err = c.clone().resize_vps(resize(4, 0, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("vcpus of institution") && err.message().contains("2 over"),
        "{}",
        err.message()
    );
    // Shrinking is always allowed.
    c.clone().resize_vps(resize(1, 0, 0)).await?;
    c.clone()
        .start_vps(StartVpsRequest { id: v.id.clone() })
        .await?;
    wait_state(&c, &v.id, VpsState::Running, T).await?;
    let d = hv.lookup(&dom)?.unwrap();
    assert_eq!(d.vcpus, 1);
    Ok(())
}

fn with_placement(
    mut req: CreateVpsRequest,
    zone: &str,
    labels: &[(&str, &str)],
    group: &str,
) -> CreateVpsRequest {
    req.placement = Some(betang_proto::v1::PlacementRequest {
        zone: zone.into(),
        host_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        anti_affinity_group: group.into(),
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zones_labels_and_anti_affinity_steer_placement() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut c = cluster.vps_client().await?;
    // Host 0 is in zone a with rack r0, host 1 in zone b with rack r1.
    for _ in 0..3 {
        let v = c
            .create_vps(with_placement(
                cluster.create(cluster.spec("zb")),
                "b",
                &[],
                "",
            ))
            .await?
            .into_inner();
        assert_eq!(v.host_id, cluster.hosts[1].host_id);
    }
    let v = c
        .create_vps(with_placement(
            cluster.create(cluster.spec("r0")),
            "",
            &[("rack", "r0")],
            "",
        ))
        .await?
        .into_inner();
    assert_eq!(v.host_id, cluster.hosts[0].host_id);
    let err = c
        .create_vps(with_placement(
            cluster.create(cluster.spec("zc")),
            "c",
            &[],
            "",
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().ends_with(": 2 in another zone"),
        "{}",
        err.message()
    );
    // Two of one group land on different hosts; a third has nowhere to go.
    let mut hosts = std::collections::BTreeSet::new();
    for n in ["g1", "g2"] {
        let v = c
            .create_vps(with_placement(
                cluster.create(cluster.spec(n)),
                "",
                &[],
                "web",
            ))
            .await?
            .into_inner();
        hosts.insert(v.host_id);
    }
    assert_eq!(hosts.len(), 2);
    let err = c
        .create_vps(with_placement(
            cluster.create(cluster.spec("g3")),
            "",
            &[],
            "web",
        ))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .ends_with(": 2 already hold its anti-affinity group"),
        "{}",
        err.message()
    );
    // Another institution's group of the same name is unrelated.
    let mut other = with_placement(cluster.create(cluster.spec("g4")), "", &[], "web");
    other.institution_id = cluster.people.inst_b.clone();
    c.create_vps(other).await?;
    let err = c
        .create_vps(with_placement(
            cluster.create(cluster.spec("bad")),
            "<x>",
            &[],
            "",
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("placement.zone:"),
        "{}",
        err.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cordon_drain_and_uncordon() -> anyhow::Result<()> {
    use betang_proto::v1::{CordonHostRequest, ListAuditRequest, UncordonHostRequest};
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let mut c = op.vps.clone();
    let h0 = cluster.hosts[0].host_id.clone();
    let mut on_h0 = Vec::new();
    for i in 0..4 {
        let v = c
            .create_vps(cluster.create(cluster.spec(&format!("d{i}"))))
            .await?
            .into_inner();
        if v.host_id == h0 {
            on_h0.push(v.id);
        }
    }
    assert_eq!(on_h0.len(), 2, "spread puts two on each host");
    let h = op
        .hosts
        .clone()
        .cordon_host(CordonHostRequest { id: h0.clone() })
        .await?
        .into_inner();
    assert!(h.cordoned);
    for i in 0..3 {
        let v = c
            .create_vps(cluster.create(cluster.spec(&format!("n{i}"))))
            .await?
            .into_inner();
        assert_ne!(v.host_id, h0, "placed on a cordoned host");
    }
    // Draining lists what is on the host; those VPS keep running.
    let listed = c
        .list_vps(ListVpsRequest {
            host_id: h0.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ids: Vec<_> = listed.vps.iter().map(|v| v.id.clone()).collect();
    ids.sort();
    on_h0.sort();
    assert_eq!(ids, on_h0);
    for id in &on_h0 {
        wait_state(&c, id, VpsState::Running, T).await?;
    }
    // Pinning to a cordoned host is refused too, with the reason.
    let mut pinned = cluster.create(cluster.spec("pin"));
    pinned.host_id = h0.clone();
    let err = c.create_vps(pinned.clone()).await.unwrap_err();
    assert!(err.message().ends_with(": 1 cordoned"), "{}", err.message());
    op.hosts
        .clone()
        .uncordon_host(UncordonHostRequest { id: h0.clone() })
        .await?;
    let v = c.create_vps(pinned).await?.into_inner();
    assert_eq!(v.host_id, h0);
    let audit = op
        .audit
        .clone()
        .list_audit(ListAuditRequest {
            target: h0.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let actions: Vec<_> = audit.records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["host.cordon", "host.uncordon"]);
    // Members may not.
    let member = cluster.clients(&cluster.people.member_a).await?;
    let err = member
        .hosts
        .clone()
        .cordon_host(CordonHostRequest { id: h0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vps_on_a_silent_host_show_unknown_until_it_returns() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let c = cluster.vps_client().await?;
    let v = c
        .clone()
        .create_vps(cluster.create(cluster.spec("unk")))
        .await?
        .into_inner();
    let v = wait_state(&c, &v.id, VpsState::Running, T).await?;
    let i = cluster
        .hosts
        .iter()
        .position(|h| h.host_id == v.host_id)
        .unwrap();
    cluster.stop_agent(i);
    let unknown = wait_state(&c, &v.id, VpsState::Unknown, T).await?;
    assert!(
        unknown.state_reason.contains("last known state RUNNING"),
        "{}",
        unknown.state_reason
    );
    let listed = c
        .clone()
        .list_vps(ListVpsRequest::default())
        .await?
        .into_inner();
    assert_eq!(state_of(&listed.vps[0]), VpsState::Unknown);
    // Betang records the host going down (on its next reconcile pass).
    let audit = cluster.as_operator().await?.audit;
    let host_id = v.host_id.clone();
    eventually(T, "host.down in the audit trail", || {
        let (mut audit, target) = (audit.clone(), host_id.clone());
        async move {
            let r = audit
                .list_audit(betang_proto::v1::ListAuditRequest {
                    target,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            r.records
                .iter()
                .any(|a| a.action == "host.down")
                .then_some(())
        }
    })
    .await?;
    cluster.start_agent(i).await?;
    wait_state(&c, &v.id, VpsState::Running, T).await?;
    // Down and back are each recorded once in the audit trail.
    let audit = audit
        .clone()
        .list_audit(betang_proto::v1::ListAuditRequest {
            target: v.host_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let actions: Vec<_> = audit.records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["host.down", "host.up"]);
    assert_eq!(audit.records[0].actor_username, "betang");
    Ok(())
}

/// 500 placements at once onto hosts that can hold exactly 500: every host
/// ends exactly full and none over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_placements_fill_hosts_exactly() -> anyhow::Result<()> {
    let cap = CapacityConfig {
        vcpus: 50,
        memory_mib: 1 << 20,
        disk_gib: 1 << 20,
    };
    let mut cluster = Cluster::start(ClusterOptions {
        hosts: vec![cap; 10],
        heartbeat_ms: 500,
        down_after_ms: 30_000,
        ..Default::default()
    })
    .await?;
    cluster.controller_cfg.overcommit.cpu = 1.0;
    cluster.restart_controller().await?;
    let c = cluster.vps_client().await?;
    let results = futures::future::join_all((0..520).map(|i| {
        let mut c = c.clone();
        let mut spec = cluster.spec(&format!("f{i}"));
        spec.memory_mib = 64;
        spec.disk_gib = 1;
        let req = cluster.create(spec);
        async move { c.create_vps(req).await }
    }))
    .await;
    let placed = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(placed, 500);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Code::ResourceExhausted, "{}", r.message());
    }
    let hosts = cluster
        .host_client()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 10);
    for h in hosts {
        assert_eq!(h.allocated.unwrap().vcpus, 50, "{}", h.id);
        assert_eq!(h.vps_count, 50, "{}", h.id);
    }
    Ok(())
}
