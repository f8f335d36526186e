//! Wiring: the hypervisor, the VM manager, the gRPC server with health and
//! reflection, the registration loop and the reconcile timer.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use betang_proto::v1::agent_service_server::AgentServiceServer;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::{Endpoint, Server};
use tracing::{info, warn};

use crate::{
    config::{AgentConfig, DomainTypeSetting, HypervisorSetting},
    domain_xml::DomainType,
    host::HostReporter,
    hypervisor::{
        Blocking, Hypervisor, LibvirtHypervisor, NodeFacts, SimulatedHypervisor, Watchdog,
        probe_domain_type,
    },
    metrics::{self, AgentMetrics, Collector},
    registration::Registration,
    service::AgentApi,
    tls::Tls,
    vms::VmManager,
};

/// A running agent. Dropping it stops its tasks.
pub struct RunningAgent {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub vms: Arc<VmManager>,
    pub host: Arc<HostReporter>,
    /// Tells the gRPC server to stop taking calls.
    stop: tokio::sync::watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    pub fn shutdown(&mut self) {
        for t in self.server.take().into_iter().chain(self.tasks.drain(..)) {
            t.abort();
        }
    }

    /// Stops taking calls and lets those under way (a VM being built, a
    /// disk being received) finish for at most `within`; work cut short is
    /// undone or picked up again, as after a crash. Guests keep running.
    pub async fn drain(mut self, within: Duration) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take()
            && tokio::time::timeout(within, server).await.is_err()
        {
            warn!(?within, "calls still under way; stopping anyway");
        }
        self.shutdown();
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A simulated host with the configured capacity as its hardware.
pub fn simulated_for(cfg: &AgentConfig) -> anyhow::Result<SimulatedHypervisor> {
    let c = cfg
        .capacity
        .context("capacity: a simulated host needs [capacity]")?;
    let node = NodeFacts {
        cpus: c.vcpus,
        memory_kib: c.memory_mib.saturating_mul(1024),
    };
    if cfg.simulated_persist {
        std::fs::create_dir_all(&cfg.vm_dir)?;
        return Ok(SimulatedHypervisor::persistent(
            node,
            cfg.vm_dir.join(crate::hypervisor::SIMULATED_STATE_FILE),
        )?);
    }
    Ok(SimulatedHypervisor::new(node))
}

/// Resolves `auto` into the domain type that works on this host.
pub async fn domain_type_for(cfg: &AgentConfig) -> DomainType {
    if cfg.hypervisor == HypervisorSetting::Simulated {
        return DomainType::Qemu;
    }
    match cfg.domain_type {
        DomainTypeSetting::Kvm => DomainType::Kvm,
        DomainTypeSetting::Qemu => DomainType::Qemu,
        DomainTypeSetting::Auto => {
            let uri = cfg.libvirt_uri.clone();
            let dir = cfg.vm_dir.clone();
            tokio::task::spawn_blocking(move || probe_domain_type(&uri, &dir))
                .await
                .unwrap_or(DomainType::Qemu)
        }
    }
}

/// Starts the agent on an already bound listener (tests bind port 0).
pub async fn start(cfg: AgentConfig, listener: TcpListener) -> anyhow::Result<RunningAgent> {
    if cfg.hypervisor == HypervisorSetting::Simulated {
        let hv = Arc::new(simulated_for(&cfg)?);
        return start_with(cfg, listener, hv).await;
    }
    let uri = cfg.libvirt_uri.clone();
    let hv: Arc<dyn Hypervisor> = Arc::new(
        tokio::task::spawn_blocking(move || LibvirtHypervisor::new(&uri))
            .await?
            .with_context(|| format!("connecting to {}", cfg.libvirt_uri))?,
    );
    start_with(cfg, listener, hv).await
}

/// Starts the agent on a given hypervisor. Tests use it to restart an agent
/// on the same libvirt test-driver state, as a real restart would find it.
pub async fn start_with(
    cfg: AgentConfig,
    listener: TcpListener,
    hv: Arc<dyn Hypervisor>,
) -> anyhow::Result<RunningAgent> {
    cfg.validate()?;
    let addr = listener.local_addr()?;
    let domain_type = domain_type_for(&cfg).await;
    info!(host_id = %cfg.host_id, uri = %cfg.libvirt_uri, domain_type = domain_type.as_str(), %addr, "agent starting");
    let watchdog = Watchdog::new(Duration::from_millis(
        cfg.libvirt_unresponsive_after_ms.max(100),
    ));
    let blocking = Blocking::new(
        hv.clone(),
        Duration::from_secs(cfg.libvirt_call_timeout_seconds),
        watchdog.clone(),
    );
    let vms = Arc::new(VmManager::new(
        blocking.clone(),
        cfg.image_dir.clone(),
        cfg.vm_dir.clone(),
        domain_type,
        cfg.network.clone(),
    )?);
    let adopted = vms.reconcile().await?;
    let sampler = Arc::new(crate::usage::HostSampler::default());
    let collector = Collector::new(
        blocking,
        vms.stats.clone(),
        sampler,
        cfg.vm_dir.clone(),
        Duration::from_millis(cfg.stats_interval_ms.max(100)),
        Duration::from_millis(cfg.guest_unresponsive_after_ms.max(100)),
    );
    // The first snapshot before anyone asks, so the first heartbeat has usage.
    collector.pass_once().await;
    info!(adopted, "adopted existing guests");
    let host = Arc::new(HostReporter::new(
        cfg.host_id.clone(),
        cfg.capacity,
        cfg.zone.clone(),
        cfg.labels.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<AgentApi>>()
        .await;
    // Reflection lists only what this port serves.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(betang_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name(<AgentServiceServer<AgentApi> as tonic::server::NamedService>::NAME)
        .build_v1()?;
    let api = AgentApi {
        vms: vms.clone(),
        host: host.clone(),
        consoles: Arc::default(),
    };
    let tls = cfg.tls.as_ref().map(Tls::load).transpose()?;
    // No time limit on a call: a disk stream lasts as long as the disk is
    // large. A controller that vanished is noticed by its missing pings.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if let Some(t) = &tls {
        builder = builder.tls_config(t.server())?;
    } else {
        warn!("no [tls] configured: anyone who reaches this port can drive the guests");
    }
    let revoked = Arc::new(crate::tls::Revoked::default());
    let check = {
        let (revoked, mutual_tls) = (revoked.clone(), tls.is_some());
        move |req| {
            if mutual_tls {
                crate::tls::only_controller(&revoked, req)
            } else {
                Ok(req)
            }
        }
    };
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServiceServer::with_interceptor(api, check))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        );
    let server = Some(tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "agent gRPC server stopped");
        }
    }));
    let mut tasks = vec![tokio::spawn(collector.run())];
    let mut metrics_addr = None;
    if let Some(at) = cfg.metrics_listen {
        let listener = betang_exposition::bind("metrics_listen", at).await?;
        metrics_addr = Some(listener.local_addr()?);
        let registry = metrics::registry_for(AgentMetrics {
            cache: vms.stats.clone(),
            host_id: cfg.host_id.clone(),
            watchdog: watchdog.clone(),
        });
        info!(addr = %listener.local_addr()?, "serving /metrics");
        let token = cfg
            .metrics_token_file
            .as_deref()
            .map(betang_exposition::read_token)
            .transpose()?;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, registry, token).await {
                warn!(error = %e, "metrics endpoint stopped");
            }
        }));
    }

    let mut controller = Endpoint::from_shared(cfg.controller_endpoint.clone())
        .context("controller_endpoint")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if let Some(t) = &tls {
        controller = controller.tls_config(t.client())?;
    }
    let controller = controller.connect_lazy();
    let registration_host = host.clone();
    let registration = Registration {
        controller,
        advertise: cfg.advertise_endpoint.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{addr}")
        }),
        host,
        vms: vms.clone(),
        interval: Duration::from_millis(cfg.heartbeat_interval_ms),
        revoked,
    };
    tasks.push(tokio::spawn(registration.run()));

    let reconcile_vms = vms.clone();
    let every = Duration::from_secs(cfg.reconcile_interval_seconds.max(1));
    tasks.push(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(e) = reconcile_vms.reload_catalog() {
                warn!(error = %e, "cannot reload the image catalogue");
            }
            if let Err(e) = reconcile_vms.reconcile().await {
                warn!(error = %e, "reconcile failed");
            }
        }
    }));
    Ok(RunningAgent {
        addr,
        metrics_addr,
        vms,
        host: registration_host,
        stop,
        server,
        tasks,
    })
}
