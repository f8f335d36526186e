//! Wiring: store, reconciler, and two gRPC servers with health and
//! reflection: the user API, and the agents' API under mutual TLS.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use betang_proto::v1::{
    audit_service_server::AuditServiceServer, host_service_server::HostServiceServer,
    identity_service_server::IdentityServiceServer, network_service_server::NetworkServiceServer,
    registry_service_server::RegistryServiceServer, vps_service_server::VpsServiceServer,
};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tonic::{server::NamedService, transport::Server};
use tracing::{info, warn};

use crate::{
    agents::AgentClients,
    api::{
        Ctx, audit::AuditApi, hosts::HostApi, identity::IdentityApi, networks::NetworkApi,
        registry::RegistryApi, vps::VpsApi,
    },
    config::ControllerConfig,
    metrics::{ControllerMetrics, RpcLayer},
    reconciler::Reconciler,
    store::{Store, history},
    tls::Tls,
};

/// Drops usage points past their keeping time, every ten minutes.
async fn prune_history(store: Store) {
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        every.tick().await;
        let now = crate::now_ms();
        match store.run(move |c| history::prune(c, now)).await {
            Ok(n) if n > 0 => info!(points = n, "old usage points pruned"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prune usage points"),
        }
    }
}

pub struct RunningController {
    pub addr: SocketAddr,
    pub agent_addr: SocketAddr,
    /// Where `/metrics` is served, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the portal is served, when `portal_listen` is set.
    pub portal_addr: Option<SocketAddr>,
    pub store: Store,
    /// Tells both gRPC servers to stop taking calls.
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningController {
    pub fn shutdown(&mut self) {
        for t in self.servers.drain(..).chain(self.tasks.drain(..)) {
            t.abort();
        }
    }

    /// Stops taking calls, lets those under way finish (for at most
    /// `within`), then stops the rest. What they committed is on disk: the
    /// store acknowledges a write only once it is.
    pub async fn drain(mut self, within: Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + within;
        for server in std::mem::take(&mut self.servers) {
            if tokio::time::timeout_at(deadline, server).await.is_err() {
                warn!(?within, "calls still under way; stopping anyway");
                break;
            }
        }
        self.shutdown();
    }
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Health checks and reflection for one port; reflection lists only the
/// `services` that port serves (and health).
fn health_and_reflection(
    services: &[&str],
) -> anyhow::Result<(
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(betang_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for s in services {
        reflection = reflection.with_service_name(*s);
    }
    Ok((reporter, health, reflection.build_v1()?))
}

/// A server that ends calls past their time, bounds the calls one
/// connection may have open, and closes connections whose client stopped
/// answering.
fn bounded(b: Server, limits: &crate::limits::LimitsConfig) -> Server {
    b.timeout(limits.request_timeout())
        .max_concurrent_streams(limits.streams_per_connection)
        .concurrency_limit_per_connection(limits.streams_per_connection as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
}

/// Opens the store in `cfg.data_dir` (creating it) without serving anything;
/// used by the bootstrap command.
pub fn open_store(cfg: &ControllerConfig) -> anyhow::Result<Store> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&cfg.data_dir)?;
    // The store and its journal: the controller's alone.
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(Store::open(&cfg.data_dir.join("betang.db"))?)
}

pub async fn start(
    cfg: ControllerConfig,
    listener: TcpListener,
    agent_listener: TcpListener,
) -> anyhow::Result<RunningController> {
    cfg.validate()?;
    let store = open_store(&cfg)?;
    let unfinished = store.run_sync(|c| crate::store::moves::all(c))?.len();
    if unfinished > 0 {
        info!(
            unfinished,
            "moves left unfinished by the last run are picked up again"
        );
    }
    let addr = listener.local_addr()?;
    let agent_addr = agent_listener.local_addr()?;
    let tls = cfg.tls.as_ref().map(Tls::load).transpose()?;
    if tls.is_none() {
        warn!("no [tls] configured: agents are neither authenticated nor encrypted");
    }
    info!(%addr, %agent_addr, mutual_tls = tls.is_some(), data_dir = %cfg.data_dir.display(), "controller starting");
    let wake = Arc::new(Notify::new());
    let agents = Arc::new(AgentClients::new(tls.clone()));
    let move_wake = Arc::new(Notify::new());
    let ctx = Ctx {
        store: store.clone(),
        wake: wake.clone(),
        agents: agents.clone(),
        cfg: Arc::new(cfg.clone()),
        moves: move_wake.clone(),
        rebooting: Arc::default(),
        limits: Arc::new(crate::limits::RateLimits::new(&cfg.limits)),
        certs: Arc::new(crate::certs::CertWatch::new(cfg.tls.as_ref())?),
        consoles: Arc::default(),
    };
    let budgets = ctx.limits.clone();
    let mover = Arc::new(crate::moves::Mover::new(
        store.clone(),
        agents.clone(),
        wake.clone(),
        move_wake,
        crate::moves::MoveSettings {
            stall: Duration::from_secs(cfg.move_stall_seconds),
            give_up_after: Duration::from_secs(cfg.move_give_up_seconds),
        },
    ));
    let reconciler = Arc::new(Reconciler::new(
        store.clone(),
        agents,
        wake,
        Duration::from_millis(cfg.reconcile_interval_ms),
        Duration::from_secs(cfg.build_timeout_seconds),
        Duration::from_millis(cfg.host_down_after_ms),
    ));

    let metrics = Arc::new(ControllerMetrics::new(
        store.clone(),
        cfg.overcommit,
        cfg.placement,
        cfg.host_down_after_ms as i64,
        ctx.certs.clone(),
    ));
    let (reporter, health, reflection) = health_and_reflection(&[
        <VpsServiceServer<VpsApi> as NamedService>::NAME,
        <HostServiceServer<HostApi> as NamedService>::NAME,
        <IdentityServiceServer<IdentityApi> as NamedService>::NAME,
        <AuditServiceServer<AuditApi> as NamedService>::NAME,
        <NetworkServiceServer<NetworkApi> as NamedService>::NAME,
    ])?;
    reporter.set_serving::<VpsServiceServer<VpsApi>>().await;
    let limits = cfg.limits;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut user = bounded(Server::builder(), &limits);
    if let Some(t) = tls.as_ref().filter(|t| t.user_api) {
        user = user.tls_config(t.user_server())?;
    }
    let most = limits.max_request_bytes;
    let user_server = user
        .layer(RpcLayer(metrics.rpc.clone()))
        .add_service(health)
        .add_service(reflection)
        .add_service(
            VpsServiceServer::new(VpsApi { ctx: ctx.clone() }).max_decoding_message_size(most),
        )
        .add_service(
            HostServiceServer::new(HostApi { ctx: ctx.clone() }).max_decoding_message_size(most),
        )
        .add_service(
            IdentityServiceServer::new(IdentityApi { ctx: ctx.clone() })
                .max_decoding_message_size(most),
        )
        .add_service(
            AuditServiceServer::new(AuditApi { ctx: ctx.clone() }).max_decoding_message_size(most),
        )
        .add_service(
            NetworkServiceServer::new(NetworkApi { ctx: ctx.clone() })
                .max_decoding_message_size(most),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );

    let (agent_reporter, agent_health, agent_reflection) =
        health_and_reflection(&[<RegistryServiceServer<RegistryApi> as NamedService>::NAME])?;
    agent_reporter
        .set_serving::<RegistryServiceServer<RegistryApi>>()
        .await;
    let mut agent = bounded(Server::builder(), &limits);
    if let Some(t) = &tls {
        agent = agent.tls_config(t.agent_server())?;
    }
    let agent_server = agent
        .layer(RpcLayer(metrics.rpc.clone()))
        .add_service(agent_health)
        .add_service(agent_reflection)
        .add_service(RegistryServiceServer::new(RegistryApi {
            ctx: ctx.clone(),
            mutual_tls: tls.is_some(),
        }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(agent_listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );

    let mut metrics_addr = None;
    let mut tasks = Vec::new();
    if let Some(at) = cfg.metrics_listen {
        let listener = betang_exposition::bind("metrics_listen", at).await?;
        metrics_addr = Some(listener.local_addr()?);
        info!(addr = %listener.local_addr()?, "serving /metrics");
        let render: betang_exposition::Render = Arc::new(move || {
            let m = metrics.clone();
            Box::pin(async move { m.render().await })
        });
        let token = cfg
            .metrics_token_file
            .as_deref()
            .map(betang_exposition::read_token)
            .transpose()?;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = betang_exposition::serve(listener, render, token).await {
                warn!(error = %e, "metrics endpoint stopped");
            }
        }));
    }
    let mut portal_addr = None;
    let mut portal_server = None;
    if let Some(at) = cfg.portal_listen {
        let listener = betang_exposition::bind("portal_listen", at).await?;
        portal_addr = Some(listener.local_addr()?);
        info!(addr = %listener.local_addr()?, "serving the portal");
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        portal_server = Some(tokio::spawn(async move {
            if let Err(e) = crate::portal::serve(listener, ctx, stopped(stop)).await {
                warn!(error = %e, "portal stopped");
            }
        }));
    }
    let mut servers = vec![
        tokio::spawn(async move {
            if let Err(e) = user_server.await {
                warn!(error = %e, "user API server stopped");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = agent_server.await {
                warn!(error = %e, "agent API server stopped");
            }
        }),
    ];
    tasks.extend([
        tokio::spawn(reconciler.run()),
        tokio::spawn(mover.run()),
        tokio::spawn(prune_history(store.clone())),
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                budgets.forget_idle();
            }
        }),
    ]);
    servers.extend(portal_server);
    Ok(RunningController {
        addr,
        agent_addr,
        metrics_addr,
        portal_addr,
        store,
        stop,
        servers,
        tasks,
    })
}
