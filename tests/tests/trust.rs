//! Trust between controller and agents, with real TLS on loopback: an agent
//! must prove its host id with a certificate from the installation's CA, and
//! an agent accepts calls only from the controller's certificate.

use std::{sync::Arc, time::Duration};

use betang_agent::{
    config::{AgentConfig, CapacityConfig, DomainTypeSetting, NetworkConfig},
    hypervisor::{Hypervisor, LibvirtHypervisor},
};
use betang_controller::pki::{CONTROLLER_NAME, PkiDir};
use betang_proto::v1::{
    HeartbeatRequest, HostInfoRequest, HostInfoResponse, HostState, RegisterHostRequest,
    agent_service_client::AgentServiceClient, registry_service_client::RegistryServiceClient,
};
use betang_tests::{
    Cluster, ClusterOptions, agent_tls, http_get, make_image_dir, mtls_channel, sample,
};
use tonic::Code;

/// A refused peer may get an error or no answer at all; either way the call
/// must not succeed, and the test must not wait forever to find out.
const REFUSAL: Duration = Duration::from_secs(5);

fn info(host_id: &str) -> HostInfoResponse {
    HostInfoResponse {
        host_id: host_id.into(),
        hostname: "x".into(),
        capacity: Some(betang_proto::v1::HostCapacity {
            vcpus: 64,
            memory_mib: 1 << 20,
            disk_gib: 1 << 14,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_may_speak_only_for_the_host_its_certificate_names() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        hosts: vec![],
        ..Default::default()
    })
    .await?;
    let pki = &cluster.pki;
    pki.issue("host-honest", &[])?;
    let ch = mtls_channel(
        &cluster.agent_endpoint,
        pki,
        "host-honest",
        betang_controller::pki::CONTROLLER_NAME,
    )
    .await?;
    let mut registry = RegistryServiceClient::new(ch);
    // Its own host id: accepted.
    registry
        .register_host(RegisterHostRequest {
            info: Some(info("host-honest")),
            agent_endpoint: "https://127.0.0.1:1".into(),
        })
        .await?;
    // An endpoint the controller would speak to in clear: refused.
    let err = registry
        .register_host(RegisterHostRequest {
            info: Some(info("host-honest")),
            agent_endpoint: "http://127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().starts_with("agent_endpoint: ") && err.message().contains("https://"),
        "{}",
        err.message()
    );
    // Another host's id, with a valid certificate of the same CA: refused.
    let err = registry
        .register_host(RegisterHostRequest {
            info: Some(info("host-victim")),
            agent_endpoint: "https://127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("host-honest"), "{}", err.message());
    let err = registry
        .heartbeat(HeartbeatRequest {
            host_id: "host-victim".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A certificate from another CA: the TLS handshake itself fails.
    let rogue_dir = tempfile::tempdir()?;
    let rogue = PkiDir(rogue_dir.path().to_path_buf());
    rogue.init()?;
    rogue.issue("host-victim", &[])?;
    let files = rogue.files("host-victim");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
            pki.ca_cert(),
        )?))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&files.cert)?,
            std::fs::read(&files.key)?,
        ))
        .domain_name(betang_controller::pki::CONTROLLER_NAME);
    let refused = async {
        let ch = tonic::transport::Endpoint::from_shared(cluster.agent_endpoint.clone())?
            .connect_timeout(REFUSAL)
            .timeout(REFUSAL)
            .tls_config(tls)?
            .connect()
            .await?;
        RegistryServiceClient::new(ch)
            .register_host(RegisterHostRequest {
                info: Some(info("host-victim")),
                agent_endpoint: "https://127.0.0.1:1".into(),
            })
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(refused.is_err(), "a foreign CA's certificate was accepted");

    // No certificate at all, or plaintext: refused too.
    let plain = async {
        let ch = tonic::transport::Endpoint::from_shared(
            cluster.agent_endpoint.replace("https://", "http://"),
        )?
        .connect_timeout(REFUSAL)
        .timeout(REFUSAL)
        .connect()
        .await?;
        RegistryServiceClient::new(ch)
            .register_host(RegisterHostRequest {
                info: Some(info("host-victim")),
                agent_endpoint: "https://127.0.0.1:1".into(),
            })
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(plain.is_err(), "a plaintext agent was accepted");

    let hosts = cluster
        .as_operator()
        .await?
        .hosts
        .list_hosts(betang_proto::v1::ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    let ids: Vec<_> = hosts.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["host-honest"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_accepts_calls_only_from_the_controller() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let agent = format!("https://{}", cluster.hosts[0].agent.as_ref().unwrap().addr);
    let host = cluster.hosts[0].host_id.clone();
    // The controller's certificate: served.
    let ch = mtls_channel(
        &agent,
        &cluster.pki,
        betang_controller::pki::CONTROLLER_NAME,
        &host,
    )
    .await?;
    let info = AgentServiceClient::new(ch)
        .host_info(HostInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.host_id, host);
    // Another host's certificate from the same CA: refused.
    let other = cluster.hosts[1].host_id.clone();
    let ch = mtls_channel(&agent, &cluster.pki, &other, &host).await?;
    let err = AgentServiceClient::new(ch)
        .host_info(HostInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    // Plaintext: refused.
    let plain = async {
        let ch = tonic::transport::Endpoint::from_shared(agent.replace("https://", "http://"))?
            .connect_timeout(REFUSAL)
            .timeout(REFUSAL)
            .connect()
            .await?;
        AgentServiceClient::new(ch)
            .host_info(HostInfoRequest {})
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(plain.is_err());
    Ok(())
}

/// An agent started with another host's certificate never registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_with_a_wrong_certificate_never_registers() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        hosts: vec![],
        ..Default::default()
    })
    .await?;
    cluster.pki.issue("host-real", &[])?;
    let node = cluster.dir.path().join("node.xml");
    std::fs::write(&node, "<node/>")?;
    let uri = format!("test://{}", node.display());
    let image_dir = cluster.dir.path().join("img");
    make_image_dir(&image_dir, "64M")?;
    let cfg = AgentConfig {
        metrics_listen: None,
        metrics_token_file: None,
        stats_interval_ms: 1000,
        guest_unresponsive_after_ms: 10_000,
        libvirt_unresponsive_after_ms: 5_000,
        host_id: "host-impostor".into(),
        listen: "127.0.0.1:0".parse()?,
        advertise_endpoint: None,
        controller_endpoint: cluster.agent_endpoint.clone(),
        libvirt_uri: uri.clone(),
        hypervisor: betang_agent::config::HypervisorSetting::Libvirt,
        simulated_persist: false,
        domain_type: DomainTypeSetting::Qemu,
        image_dir,
        vm_dir: cluster.dir.path().join("vms"),
        heartbeat_interval_ms: 100,
        reconcile_interval_seconds: 1,
        libvirt_call_timeout_seconds: 5,
        capacity: Some(CapacityConfig {
            vcpus: 4,
            memory_mib: 4096,
            disk_gib: 100,
        }),
        network: NetworkConfig::None,
        zone: String::new(),
        labels: Default::default(),
        tls: Some(agent_tls(&cluster.pki, "host-real")),
    };
    let hv: Arc<dyn Hypervisor> = Arc::new(LibvirtHypervisor::new(&uri)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let _agent = betang_agent::server::start_with(cfg, listener, hv).await?;
    // Give it many heartbeat intervals to try.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hosts = cluster
        .as_operator()
        .await?
        .hosts
        .list_hosts(betang_proto::v1::ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    assert!(hosts.is_empty(), "{hosts:?}");
    Ok(())
}

/// With `[tls] user_api = true` people reach the API over TLS only, and
/// still authenticate with their tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_user_api_can_be_served_over_tls() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        hosts: vec![],
        ..Default::default()
    })
    .await?;
    cluster
        .controller_cfg
        .tls
        .as_mut()
        .expect("the harness uses TLS")
        .user_api = true;
    cluster.restart_controller().await?;
    let https = cluster.endpoint.replace("http://", "https://");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
            cluster.pki.ca_cert(),
        )?))
        .domain_name(betang_controller::pki::CONTROLLER_NAME);
    let ch = tonic::transport::Endpoint::from_shared(https)?
        .tls_config(tls)?
        .connect()
        .await?;
    let token: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", cluster.people.member_a).parse()?;
    let mut identity =
        betang_proto::v1::identity_service_client::IdentityServiceClient::with_interceptor(
            ch,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", token.clone());
                Ok(req)
            },
        );
    let me = identity
        .who_am_i(betang_proto::v1::WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(me.institution_id, cluster.people.inst_a);
    // Plaintext no longer gets an answer.
    let plain = cluster.clients(&cluster.people.member_a).await;
    let refused = match plain {
        Err(_) => true,
        Ok(c) => c
            .identity
            .clone()
            .who_am_i(betang_proto::v1::WhoAmIRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "plaintext still answered");
    Ok(())
}

/// A revoked certificate stops working at the next heartbeat and a new one
/// is taken at once: `betangctl pki revoke` on a host's certificate makes
/// the controller refuse that host (it goes DOWN); on the controller's own,
/// the agents, told by the controller, refuse calls made with it. The
/// controller shows when each certificate it knows expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_certificate_is_refused_and_a_new_one_is_taken() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let host = cluster.hosts[0].host_id.clone();
    cluster.wait_host_state(&host, HostState::Up).await?;
    let metrics = cluster
        .controller
        .as_ref()
        .and_then(|c| c.metrics_addr)
        .expect("metrics_listen is set");
    let body = http_get(metrics, "/metrics").await?;
    let now_s = betang_controller::now_ms() as f64 / 1000.0;
    for (name, role) in [(host.as_str(), "host"), (CONTROLLER_NAME, "controller")] {
        let at = sample(
            &body,
            "betang_certificate_expires_timestamp_seconds",
            &[("name", name), ("role", role)],
        )
        .unwrap_or_else(|| panic!("{name}'s expiry in {body}"));
        let days = (at - now_s) / 86_400.0;
        assert!((395.0..=397.0).contains(&days), "{name}: {days} days");
    }

    // The host's certificate, revoked: refused, and the host goes DOWN.
    let now = betang_controller::now_ms();
    cluster.pki.revoke(&host, now)?;
    cluster.wait_host_state(&host, HostState::Down).await?;
    // Its own heartbeat says why.
    let ch = mtls_channel(
        &cluster.agent_endpoint,
        &cluster.pki,
        &host,
        CONTROLLER_NAME,
    )
    .await?;
    let err = RegistryServiceClient::new(ch)
        .heartbeat(HeartbeatRequest {
            host_id: host.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("has been revoked"),
        "{}",
        err.message()
    );
    // A new certificate: the agent restarted with it is back.
    cluster.pki.issue(&host, &["127.0.0.1".into()])?;
    cluster.stop_agent(0);
    cluster.start_agent(0).await?;
    cluster.wait_host_state(&host, HostState::Up).await?;

    // The controller's certificate, revoked: the other agent refuses it
    // once told (with its next heartbeat), and takes the new one.
    let other = cluster.hosts[1].host_id.clone();
    let agent = format!("https://{}", cluster.hosts[1].agent.as_ref().unwrap().addr);
    cluster.pki.revoke(CONTROLLER_NAME, now)?;
    betang_tests::eventually(Duration::from_secs(30), "the agent refuses it", || async {
        let ch = mtls_channel(&agent, &cluster.pki, CONTROLLER_NAME, &other)
            .await
            .ok()?;
        let err = AgentServiceClient::new(ch)
            .host_info(HostInfoRequest {})
            .await
            .err()?;
        (err.code() == Code::PermissionDenied && err.message().contains("revoked")).then_some(())
    })
    .await?;
    cluster.pki.issue(CONTROLLER_NAME, &["127.0.0.1".into()])?;
    let ch = mtls_channel(&agent, &cluster.pki, CONTROLLER_NAME, &other).await?;
    AgentServiceClient::new(ch)
        .host_info(HostInfoRequest {})
        .await?;
    Ok(())
}
