//! The dispatcher/reconciler. Level-triggered: on a wake-up or a timer it
//! reads from the store which VPS differ from what they should be and calls
//! their agents; it never acts on an event's payload alone. Each VPS has at
//! most one call in flight, and calls for different VPS run concurrently.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use betang_proto::v1::{DISK_KEPT_METADATA, DeleteVmRequest, EnsureVmRequest};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    agents::AgentClients,
    error::ApiError,
    ids::{HostId, VpsId},
    now_ms,
    store::{
        Store, hosts,
        vps::{self, Ensured, VpsRecord, Work},
    },
};

const WAKE_GATHER: Duration = Duration::from_millis(5);

/// Silent hosts are looked for at most this often. Passes come a hundred
/// times a second under load, and each look reads every host row; a host is
/// DOWN after seconds of silence, so a tenth of a second late is nothing.
const DOWN_CHECK_EVERY_MS: i64 = 100;

pub struct Reconciler {
    pub store: Store,
    pub agents: Arc<AgentClients>,
    pub wake: Arc<Notify>,
    pub interval: Duration,
    pub build_timeout: Duration,
    pub down_after: Duration,
    in_flight: Mutex<HashSet<VpsId>>,
    /// When silent hosts were last looked for (Unix ms).
    down_checked_ms: std::sync::atomic::AtomicI64,
    /// Agents' answers wait here to be recorded together (group commit).
    answers: mpsc::UnboundedSender<Answer>,
    answers_rx: Mutex<Option<mpsc::UnboundedReceiver<Answer>>>,
}

/// An agent's answer, and who waits for it to be recorded.
type Answer = (Ensured, oneshot::Sender<()>);

/// At most this many answers go into one transaction.
const ANSWERS_PER_COMMIT: usize = 512;

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
        let (answers, answers_rx) = mpsc::unbounded_channel();
        Reconciler {
            answers,
            answers_rx: Mutex::new(Some(answers_rx)),
            store,
            agents,
            wake,
            interval,
            build_timeout,
            down_after,
            in_flight: Mutex::new(HashSet::new()),
            down_checked_ms: Default::default(),
        }
    }

    pub async fn run(self: Arc<Self>) {
        let rx = self
            .answers_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            tokio::spawn(record_answers(self.store.clone(), rx));
        }
        loop {
            if let Err(e) = self.pass().await {
                warn!(error = %e, "reconcile pass failed");
            }
            tokio::select! {
                // Wake-ups that come in a burst (hundreds of requests a
                // second) are served by one pass, a few milliseconds later.
                _ = self.wake.notified() => tokio::time::sleep(WAKE_GATHER).await,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn pass(self: &Arc<Self>) -> Result<(), ApiError> {
        let now = now_ms();
        let down_after = self.down_after.as_millis() as i64;
        let checked = &self.down_checked_ms;
        if now - checked.load(std::sync::atomic::Ordering::Relaxed) >= DOWN_CHECK_EVERY_MS {
            checked.store(now, std::sync::atomic::Ordering::Relaxed);
            self.store
                .run(move |c| hosts::mark_down(c, now, down_after))
                .await?;
        }
        let busy = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let items = self
            .store
            .run(move |c| vps::work_items(c, now, &busy))
            .await?;
        let building: Vec<VpsId> = items
            .iter()
            .filter(|(w, v)| *w == Work::Ensure && v.state == crate::lifecycle::VpsState::Scheduled)
            .map(|(_, v)| v.id)
            .collect();
        if !building.is_empty() {
            let now = now_ms();
            // Lost in a power cut, they are simply built again.
            self.store
                .run_relaxed(move |c| vps::begin_provisioning(c, &building, now))
                .await?;
        }
        // Each host's endpoint once per pass, not once per VPS.
        let hosts: std::collections::BTreeSet<HostId> = items
            .iter()
            .filter_map(|(_, v)| v.host_id.clone())
            .collect();
        let endpoints = self
            .store
            .run(move |c| {
                // A host that is gone fails only its own VPS, in `handle`.
                Ok(hosts
                    .into_iter()
                    .filter_map(|h| Some((h.clone(), hosts::endpoint(c, &h).ok()?)))
                    .collect::<std::collections::HashMap<_, _>>())
            })
            .await?;
        for (work, v) in items {
            let endpoint = v
                .host_id
                .as_ref()
                .and_then(|h| endpoints.get(h).cloned())
                .unwrap_or_default();
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
                    if let Err(e) = this.handle(work, v, endpoint).await {
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

    async fn handle(&self, work: Work, v: VpsRecord, endpoint: String) -> Result<(), ApiError> {
        let Some(host) = v.host_id.clone() else {
            return Ok(());
        };
        if endpoint.is_empty() {
            return Err(ApiError::HostNotFound(host.to_string()));
        }
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
                        let failure = vps::CallFailure {
                            transient: true,
                            reason: crate::agents::plain_reason(&host, &s),
                            disk_kept: false,
                        };
                        self.failed(id, failure).await
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
        let mut req = tonic::Request::new(ensure_request(&v, v.desired.to_proto()));
        let stop_wait = match v.stop_timeout_s {
            0 => 60,
            s => u64::from(s),
        };
        req.set_timeout(Duration::from_secs(stop_wait + 120));
        match client.ensure_vm(req).await {
            Ok(resp) => {
                let status = resp.into_inner();
                info!(host_id = %host, power = status.power, generation = v.generation, "ensured");
                let (done, recorded) = oneshot::channel();
                let answer = Ensured {
                    id,
                    generation: v.generation,
                    status,
                };
                if self.answers.send((answer, done)).is_ok() {
                    // Held in flight until recorded, so no pass sends it again meanwhile.
                    let _ = recorded.await;
                }
                Ok(())
            }
            Err(s) => {
                let failure = vps::CallFailure {
                    transient: transient(s.code()),
                    reason: crate::agents::plain_reason(host, &s),
                    disk_kept: s.metadata().contains_key(DISK_KEPT_METADATA),
                };
                self.failed(id, failure).await
            }
        }
    }

    async fn failed(&self, id: VpsId, failure: vps::CallFailure) -> Result<(), ApiError> {
        warn!(vps_id = %id, transient = failure.transient, reason = %failure.reason,
            disk_kept = failure.disk_kept, "agent call failed");
        let now = now_ms();
        let timeout = self.build_timeout.as_millis() as i64;
        self.store
            .run(move |c| vps::call_failed(c, &id, &failure, now, timeout))
            .await?;
        // A permanent failure leaves cleanup work; do it now, not at the next tick.
        self.wake.notify_one();
        Ok(())
    }
}

/// What an agent is asked to make of a VPS: its spec, this power state, at
/// its generation.
pub fn ensure_request(v: &VpsRecord, desired: betang_proto::v1::PowerState) -> EnsureVmRequest {
    EnsureVmRequest {
        vps_id: v.id.to_string(),
        spec: Some(v.spec.clone()),
        desired_power: desired as i32,
        generation: v.generation,
        stop_timeout_seconds: v.stop_timeout_s,
        force_stop: v.force_stop,
        institution_id: v.institution_id.clone().unwrap_or_default(),
        image_digest: v.image_digest.clone(),
        attachment: v.attachment.clone(),
    }
}

/// Records agents' answers as they come, all that are waiting in one
/// transaction, and tells each sender when its answer is in the store.
async fn record_answers(store: Store, mut rx: mpsc::UnboundedReceiver<Answer>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, ANSWERS_PER_COMMIT).await > 0 {
        let (answers, waiters): (Vec<Ensured>, Vec<oneshot::Sender<()>>) =
            std::mem::take(&mut batch).into_iter().unzip();
        let now = now_ms();
        // Lost in a power cut, an answer is asked for again.
        if let Err(e) = store
            .run_relaxed(move |c| vps::ensure_succeeded(c, &answers, now))
            .await
        {
            // Not recorded: the next pass sees the VPS unchanged and asks again.
            warn!(error = %e, "recording agents' answers failed");
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}
