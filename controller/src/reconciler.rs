//! The dispatcher/reconciler. Level-triggered: on a wake-up or a timer it
//! reads from the store which VPS differ from what they should be and calls
//! their agents; it never acts on an event's payload alone. Each VPS has at
//! most one call in flight, and calls for different VPS run concurrently.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use betang_proto::v1::{DeleteVmRequest, EnsureVmRequest};
use tokio::sync::Notify;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    agents::AgentClients,
    error::ApiError,
    ids::{HostId, VpsId},
    now_ms,
    store::{
        Store, hosts,
        vps::{self, VpsRecord, Work},
    },
};

pub struct Reconciler {
    pub store: Store,
    pub agents: Arc<AgentClients>,
    pub wake: Arc<Notify>,
    pub interval: Duration,
    pub build_timeout: Duration,
    pub down_after: Duration,
    in_flight: Mutex<HashSet<VpsId>>,
}

fn transient(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | DeadlineExceeded | Unknown | Cancelled | Aborted | ResourceExhausted
    )
}

impl Reconciler {
    pub fn new(
        store: Store,
        agents: Arc<AgentClients>,
        wake: Arc<Notify>,
        interval: Duration,
        build_timeout: Duration,
        down_after: Duration,
    ) -> Self {
        Reconciler {
            store,
            agents,
            wake,
            interval,
            build_timeout,
            down_after,
            in_flight: Mutex::new(HashSet::new()),
        }
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(e) = self.pass().await {
                warn!(error = %e, "reconcile pass failed");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn pass(self: &Arc<Self>) -> Result<(), ApiError> {
        let now = now_ms();
        let down_after = self.down_after.as_millis() as i64;
        self.store
            .run(move |c| hosts::mark_down(c, now, down_after))
            .await?;
        let items = self.store.run(move |c| vps::work_items(c, now)).await?;
        for (work, v) in items {
            if !self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(v.id)
            {
                continue;
            }
            let this = self.clone();
            let span = info_span!("dispatch", vps_id = %v.id,
                host_id = %v.host_id.as_ref().map(|h| h.as_str()).unwrap_or(""), ?work);
            tokio::spawn(
                async move {
                    let id = v.id;
                    if let Err(e) = this.handle(work, v).await {
                        warn!(error = %e, "dispatch failed");
                    }
                    this.in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    async fn handle(&self, work: Work, v: VpsRecord) -> Result<(), ApiError> {
        let Some(host) = v.host_id.clone() else {
            return Ok(());
        };
        let h = host.clone();
        let endpoint = self.store.run(move |c| hosts::endpoint(c, &h)).await?;
        let mut client = self.agents.client(&host, &endpoint)?;
        match work {
            Work::Ensure => self.ensure(&mut client, &host, v).await,
            Work::Delete | Work::Cleanup => {
                let mut req = tonic::Request::new(DeleteVmRequest {
                    vps_id: v.id.to_string(),
                });
                req.set_timeout(Duration::from_secs(120));
                let id = v.id;
                match client.delete_vm(req).await {
                    Ok(_) => {
                        let now = now_ms();
                        if work == Work::Delete {
                            info!("VM deleted; VPS is DELETED");
                            self.store.run(move |c| vps::deleted(c, &id, now)).await
                        } else {
                            info!("leftovers of a failed VPS removed; claim released");
                            self.store.run(move |c| vps::cleaned_up(c, &id, now)).await
                        }
                    }
                    Err(s) => {
                        self.failed(id, true, format!("delete: {}", s.message()))
                            .await
                    }
                }
            }
        }
    }

    async fn ensure(
        &self,
        client: &mut betang_proto::v1::agent_service_client::AgentServiceClient<
            tonic::transport::Channel,
        >,
        host: &HostId,
        v: VpsRecord,
    ) -> Result<(), ApiError> {
        let id = v.id;
        let now = now_ms();
        self.store
            .run(move |c| vps::begin_provisioning(c, &id, now))
            .await?;
        let mut req = tonic::Request::new(EnsureVmRequest {
            vps_id: v.id.to_string(),
            spec: Some(v.spec.clone()),
            desired_power: v.desired.to_proto() as i32,
            generation: v.generation,
            stop_timeout_seconds: v.stop_timeout_s,
            force_stop: v.force_stop,
        });
        let stop_wait = match v.stop_timeout_s {
            0 => 60,
            s => u64::from(s),
        };
        req.set_timeout(Duration::from_secs(stop_wait + 120));
        match client.ensure_vm(req).await {
            Ok(resp) => {
                let status = resp.into_inner();
                info!(host_id = %host, power = status.power, generation = v.generation, "ensured");
                let generation = v.generation;
                let now = now_ms();
                self.store
                    .run(move |c| vps::ensure_succeeded(c, &id, generation, &status, now))
                    .await
            }
            Err(s) => {
                self.failed(id, transient(s.code()), s.message().to_owned())
                    .await
            }
        }
    }

    async fn failed(&self, id: VpsId, transient: bool, message: String) -> Result<(), ApiError> {
        warn!(vps_id = %id, transient, %message, "agent call failed");
        let now = now_ms();
        let timeout = self.build_timeout.as_millis() as i64;
        self.store
            .run(move |c| vps::call_failed(c, &id, transient, &message, now, timeout))
            .await?;
        // A permanent failure leaves cleanup work; do it now, not at the next tick.
        self.wake.notify_one();
        Ok(())
    }
}
