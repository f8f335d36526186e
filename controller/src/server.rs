//! Wiring: store, reconciler, and the gRPC server with health and reflection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use betang_proto::v1::{
    host_service_server::HostServiceServer, registry_service_server::RegistryServiceServer,
    vps_service_server::VpsServiceServer,
};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::{
    agents::AgentClients,
    api::{Ctx, hosts::HostApi, registry::RegistryApi, vps::VpsApi},
    auth,
    config::ControllerConfig,
    reconciler::Reconciler,
    store::Store,
};

pub struct RunningController {
    pub addr: SocketAddr,
    pub store: Store,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningController {
    pub fn shutdown(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub async fn start(
    cfg: ControllerConfig,
    listener: TcpListener,
) -> anyhow::Result<RunningController> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let db = cfg.data_dir.join("betang.db");
    let store = Store::open(&db)?;
    let addr = listener.local_addr()?;
    info!(%addr, db = %db.display(), "controller starting");
    let wake = Arc::new(Notify::new());
    let agents = Arc::new(AgentClients::default());
    let ctx = Ctx {
        store: store.clone(),
        wake: wake.clone(),
        agents: agents.clone(),
        cfg: Arc::new(cfg.clone()),
    };
    let reconciler = Arc::new(Reconciler::new(
        store.clone(),
        agents,
        wake,
        Duration::from_millis(cfg.reconcile_interval_ms),
        Duration::from_secs(cfg.build_timeout_seconds),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<VpsServiceServer<VpsApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(betang_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(VpsServiceServer::with_interceptor(
            VpsApi { ctx: ctx.clone() },
            auth::authenticate,
        ))
        .add_service(HostServiceServer::with_interceptor(
            HostApi { ctx: ctx.clone() },
            auth::authenticate,
        ))
        .add_service(RegistryServiceServer::new(RegistryApi { ctx }))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let tasks = vec![
        tokio::spawn(async move {
            if let Err(e) = server.await {
                warn!(error = %e, "controller gRPC server stopped");
            }
        }),
        tokio::spawn(reconciler.run()),
    ];
    Ok(RunningController { addr, store, tasks })
}
