//! Moving VPS between hosts (cold migration), in the background. A move is
//! recorded by the API (`store::moves::request`) and driven here from the
//! store, step by step, so that neither a client that goes away nor a
//! controller that restarts leaves it half-done: each unfinished move is
//! picked up again from its persisted step.
//!
//! The controller relays the stopped VM's disk from the source agent to the
//! target agent (agents accept calls from the controller only). Before each
//! copy the target is cleared of what an earlier attempt of the same move may
//! have left: until the switch, the only copy that counts is the source's.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use betang_proto::v1::{
    DeleteVmRequest, ExportDiskRequest, ImportDiskRequest, PowerState,
    agent_service_client::AgentServiceClient,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    agents::AgentClients,
    error::ApiError,
    ids::{HostId, VpsId},
    now_ms,
    store::{
        Store, hosts,
        moves::{self, MoveRecord, Step},
        vps::{self, VpsRecord},
    },
};

/// A copy is given up after this many failed tries.
const MAX_COPY_ATTEMPTS: u32 = 5;
/// How long a guest may take to stop beyond the stop timeout it was given.
const STOP_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct MoveSettings {
    /// A copy that moves no byte for this long is cut off.
    pub stall: Duration,
    /// A move still not copied after this long is given up.
    pub give_up_after: Duration,
}

pub struct Mover {
    store: Store,
    agents: Arc<AgentClients>,
    /// The dispatcher, woken when a VPS changed hands or came back.
    dispatcher: Arc<Notify>,
    /// Woken by the API when a move is recorded.
    pub wake: Arc<Notify>,
    settings: MoveSettings,
    in_flight: Mutex<HashSet<VpsId>>,
}

/// Why a step did not succeed; `permanent` ones are not tried again.
struct StepFailure {
    permanent: bool,
    reason: String,
}

impl StepFailure {
    fn from_status(host: &HostId, s: &tonic::Status) -> Self {
        use tonic::Code::*;
        StepFailure {
            permanent: matches!(
                s.code(),
                InvalidArgument | FailedPrecondition | NotFound | AlreadyExists
            ),
            reason: crate::agents::plain_reason(host, s),
        }
    }

    fn transient(reason: impl Into<String>) -> Self {
        StepFailure {
            permanent: false,
            reason: reason.into(),
        }
    }
}

impl From<ApiError> for StepFailure {
    fn from(e: ApiError) -> Self {
        StepFailure::transient(e.to_string())
    }
}

impl Mover {
    pub fn new(
        store: Store,
        agents: Arc<AgentClients>,
        dispatcher: Arc<Notify>,
        wake: Arc<Notify>,
        settings: MoveSettings,
    ) -> Self {
        Mover {
            store,
            agents,
            dispatcher,
            wake,
            settings,
            in_flight: Mutex::default(),
        }
    }

    /// Runs until dropped; the steps in flight are owned by this future, so
    /// stopping the controller stops them too (their progress is in the
    /// store, and the next run picks them up).
    pub async fn run(self: Arc<Self>) {
        let mut steps = tokio::task::JoinSet::new();
        loop {
            if let Err(e) = self.pass(&mut steps).await {
                warn!(error = %e, "move pass failed");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                Some(_) = steps.join_next() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn pass(self: &Arc<Self>, steps: &mut tokio::task::JoinSet<()>) -> Result<(), ApiError> {
        let now = now_ms();
        let due = self.store.run(move |c| moves::due(c, now)).await?;
        let mut copying_from: HashSet<HostId> = {
            let busy = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            due.iter()
                .filter(|m| m.step == Step::Copy && busy.contains(&m.vps_id))
                .map(|m| m.source.clone())
                .collect()
        };
        for m in due {
            if self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&m.vps_id)
            {
                continue;
            }
            // One copy at a time from a host: its disks and link are shared.
            if m.step == Step::Copy && !copying_from.insert(m.source.clone()) {
                continue;
            }
            if !self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(m.vps_id)
            {
                continue;
            }
            let this = self.clone();
            let span = info_span!("move", vps_id = %m.vps_id, host_id = %m.source,
                target = %m.target, step = ?m.step);
            steps.spawn(
                async move {
                    let id = m.vps_id;
                    if let Err(e) = this.drive(m).await {
                        warn!(error = %e, "move step not recorded");
                    }
                    this.in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    // The next step (or the next move from that host) at once.
                    this.wake.notify_one();
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    async fn drive(&self, m: MoveRecord) -> Result<(), ApiError> {
        let id = m.vps_id;
        match m.step {
            Step::Copy => match self.copy(&m).await {
                Ok(bytes) => {
                    let now = now_ms();
                    self.store.run(move |c| moves::switch(c, &id, now)).await?;
                    info!(bytes, "disk copied; the VPS now lives on the target");
                    self.dispatcher.notify_one();
                }
                Err(f) => {
                    let now = now_ms();
                    let too_long =
                        now - m.started_ms > self.settings.give_up_after.as_millis() as i64;
                    if f.permanent || too_long || m.attempts + 1 >= MAX_COPY_ATTEMPTS {
                        warn!(reason = %f.reason, "move given up; the VPS stays on its host");
                        let reason = f.reason;
                        self.store
                            .run(move |c| moves::give_up(c, &id, &reason, now))
                            .await?;
                        self.dispatcher.notify_one();
                    } else {
                        warn!(reason = %f.reason, "move copy failed; trying again");
                        let reason = format!("copy failed, trying again: {}", f.reason);
                        self.store
                            .run(move |c| moves::retry_later(c, &id, &reason, now))
                            .await?;
                    }
                }
            },
            Step::Cleanup | Step::Undo => {
                let host = if m.step == Step::Cleanup {
                    &m.source
                } else {
                    &m.target
                };
                match self.delete_on(host, id).await {
                    Ok(()) => {
                        info!(%host, "move's leftovers removed");
                        self.store.run(move |c| moves::done(c, &id)).await?;
                    }
                    Err(f) => {
                        let (now, reason) = (
                            now_ms(),
                            format!("cleanup pending on host {host}: {}", f.reason),
                        );
                        self.store
                            .run(move |c| moves::retry_later(c, &id, &reason, now))
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops the guest when the move restarts it, clears the target, and
    /// relays the disk.
    async fn copy(&self, m: &MoveRecord) -> Result<u64, StepFailure> {
        let id = m.vps_id;
        let v = self.store.run(move |c| vps::get_any(c, &id)).await?;
        if m.restart {
            self.stop_on_source(&v, &m.source).await?;
        }
        self.delete_on(&m.target, id).await?;
        self.relay(&v, &m.source, &m.target).await
    }

    async fn client(&self, host: &HostId) -> Result<AgentServiceClient<Channel>, StepFailure> {
        let h = host.clone();
        let endpoint = self.store.run(move |c| hosts::endpoint(c, &h)).await?;
        Ok(self.agents.client(host, &endpoint)?)
    }

    async fn stop_on_source(&self, v: &VpsRecord, source: &HostId) -> Result<(), StepFailure> {
        let mut c = self.client(source).await?;
        let timeout = match v.stop_timeout_s {
            0 => 60,
            s => u64::from(s),
        };
        let mut req =
            tonic::Request::new(crate::reconciler::ensure_request(v, PowerState::Stopped));
        req.set_timeout(Duration::from_secs(timeout) + STOP_GRACE);
        let status = c
            .ensure_vm(req)
            .await
            .map_err(|s| StepFailure::from_status(source, &s))?
            .into_inner();
        if status.power != PowerState::Stopped as i32 {
            return Err(StepFailure::transient("the guest did not stop"));
        }
        info!("stopped for the move");
        Ok(())
    }

    async fn delete_on(&self, host: &HostId, id: VpsId) -> Result<(), StepFailure> {
        let mut c = self.client(host).await?;
        let mut req = tonic::Request::new(DeleteVmRequest {
            vps_id: id.to_string(),
        });
        req.set_timeout(Duration::from_secs(120));
        c.delete_vm(req)
            .await
            .map_err(|s| StepFailure::from_status(host, &s))?;
        Ok(())
    }

    /// Streams the disk from the source agent into the target agent, one
    /// chunk at a time, and cuts it off when no chunk passes for `stall`.
    async fn relay(
        &self,
        v: &VpsRecord,
        source: &HostId,
        target: &HostId,
    ) -> Result<u64, StepFailure> {
        let mut from = self.client(source).await?;
        let mut to = self.client(target).await?;
        let stall = self.settings.stall;
        let mut export = tokio::time::timeout(
            stall,
            from.export_disk(ExportDiskRequest {
                vps_id: v.id.to_string(),
            }),
        )
        .await
        .map_err(|_| StepFailure::transient(format!("host {source} did not start the copy")))?
        .map_err(|s| StepFailure::from_status(source, &s))?
        .into_inner();
        let header = tokio::time::timeout(stall, export.message())
            .await
            .map_err(|_| StepFailure::transient(format!("host {source} sent nothing")))?
            .map_err(|s| StepFailure::from_status(source, &s))?
            .ok_or_else(|| StepFailure::transient("the disk export ended before it began"))?;
        let first = ImportDiskRequest {
            vps_id: v.id.to_string(),
            image: v.spec.image.clone(),
            data: header.data,
            total_bytes: header.total_bytes,
            image_digest: v.image_digest.clone(),
        };
        let progress = Arc::new(AtomicI64::new(now_ms()));
        let seen = progress.clone();
        // A source that fails half-way ends the stream early; the target then
        // counts fewer bytes than announced and refuses the disk.
        let rest = export
            .take_while(|c| std::future::ready(c.is_ok()))
            .filter_map(|c| std::future::ready(c.ok()))
            .map(move |c| {
                seen.store(now_ms(), Ordering::Relaxed);
                ImportDiskRequest {
                    data: c.data,
                    ..Default::default()
                }
            });
        let outgoing = futures::stream::once(async move { first }).chain(rest);
        let import = to.import_disk(outgoing);
        tokio::pin!(import);
        let stall_ms = stall.as_millis() as i64;
        loop {
            tokio::select! {
                answer = &mut import => {
                    return answer
                        .map(|a| a.into_inner().bytes)
                        .map_err(|s| StepFailure::from_status(target, &s));
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if now_ms() - progress.load(Ordering::Relaxed) > stall_ms {
                        return Err(StepFailure::transient(format!(
                            "the copy made no progress for {} s",
                            stall.as_secs()
                        )));
                    }
                }
            }
        }
    }
}
