//! Moving a VPS to another host (cold migration). The controller relays the
//! stopped VM's disk from the source agent to the target agent, since agents
//! accept calls from the controller only; then it moves the claim, removes
//! the old copy and lets the dispatcher define the VM on the target. A
//! running VPS is moved only when the operator asks for a restart: it is
//! stopped, moved and started again.

use std::time::Duration;

use betang_proto::v1::{DeleteVmRequest, ExportDiskRequest, ImportDiskRequest};
use futures::StreamExt;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    api::Ctx,
    auth::Caller,
    error::ApiError,
    ids::{HostId, VpsId},
    lifecycle::{DesiredPower, VpsState},
    now_ms,
    store::{
        hosts, moves,
        vps::{self, VpsRecord},
    },
};

/// How long a guest may take to stop after the stop timeout it was given.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Whether a VPS is, or is about to be, running: such a VPS moves only with
/// a restart.
pub fn wants_to_run(v: &VpsRecord) -> bool {
    v.desired == DesiredPower::Running || v.state == VpsState::Running
}

/// Moves one VPS; answers with where it ended up.
pub async fn move_vps(
    ctx: &Ctx,
    caller: &Caller,
    id: VpsId,
    restart: bool,
) -> Result<VpsRecord, ApiError> {
    let scope = caller.scope();
    let v = ctx.store.run(move |c| vps::get(c, &id, &scope)).await?;
    let span = info_span!("move", vps_id = %id, host_id = tracing::field::Empty);
    if let Some(h) = &v.host_id {
        span.record("host_id", h.as_str());
    }
    let running = wants_to_run(&v);
    if running {
        if !restart {
            return Err(ApiError::WrongState {
                id: id.to_string(),
                state: v.state.as_str(),
                action: "move without a restart (stop it first, or ask for a restart)",
            });
        }
        set_power(ctx, caller, id, DesiredPower::Stopped).await?;
        wait_stopped(
            ctx,
            id,
            Duration::from_secs(v.stop_timeout_s.into()) + STOP_GRACE,
        )
        .await?;
    }
    let moved = cold_move(ctx, caller, id).instrument(span).await;
    if running {
        // Started again wherever it is now, moved or not.
        set_power(ctx, caller, id, DesiredPower::Running).await?;
    }
    moved
}

async fn set_power(
    ctx: &Ctx,
    caller: &Caller,
    id: VpsId,
    desired: DesiredPower,
) -> Result<(), ApiError> {
    let (caller, now) = (caller.clone(), now_ms());
    ctx.store
        .run(move |c| vps::set_desired(c, &caller, &id, desired, 0, false, now))
        .await?;
    ctx.wake.notify_one();
    Ok(())
}

async fn wait_stopped(ctx: &Ctx, id: VpsId, within: Duration) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = ctx.store.run(move |c| vps::get_any(c, &id)).await?;
        if v.state == VpsState::Stopped && v.applied_generation == v.generation {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::WrongState {
                id: id.to_string(),
                state: v.state.as_str(),
                action: "move (it did not stop in time)",
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn cold_move(ctx: &Ctx, caller: &Caller, id: VpsId) -> Result<VpsRecord, ApiError> {
    let (actor, place, now) = (caller.clone(), ctx.placement(), now_ms());
    let (v, target) = ctx
        .store
        .run(move |c| moves::begin(c, &actor, &id, &place, now))
        .await?;
    let source = v.host_id.clone().ok_or_else(|| ApiError::WrongState {
        id: id.to_string(),
        state: v.state.as_str(),
        action: "move (it has no host)",
    })?;
    info!(%target, "moving");
    // The target cleans up a transfer that fails; only a disk it accepted
    // has to be removed by us when the claim cannot follow it.
    let result = match copy_disk(ctx, &v, &source, &target).await {
        Ok(bytes) => {
            let (actor, place, t, now) =
                (caller.clone(), ctx.placement(), target.clone(), now_ms());
            let done = ctx
                .store
                .run(move |c| moves::finish(c, &actor, &id, &t, &place, now))
                .await;
            match &done {
                Ok(_) => info!(%target, bytes, "disk copied; VPS now belongs to the target"),
                Err(_) => {
                    let _ = delete_on(ctx, &target, id).await;
                }
            }
            done
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(moved) => {
            // The VM and files left on the source; a failure here leaves a
            // stopped orphan that nothing points at, never a second owner.
            if let Err(e) = delete_on(ctx, &source, id).await {
                warn!(error = %e, "the old copy could not be removed from the source host");
            }
            ctx.wake.notify_one();
            Ok(moved)
        }
        Err(e) => {
            warn!(error = %e, %target, "move failed; the VPS stays on its host");
            let (reason, now) = (format!("moving to {target} failed: {e}"), now_ms());
            ctx.store
                .run(move |c| moves::abandon(c, &id, &reason, now))
                .await?;
            Err(e)
        }
    }
}

fn agent_error(host: &HostId, s: &tonic::Status) -> ApiError {
    ApiError::Agent {
        host: host.to_string(),
        message: s.message().to_owned(),
    }
}

async fn client(
    ctx: &Ctx,
    host: &HostId,
) -> Result<
    betang_proto::v1::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    ApiError,
> {
    let h = host.clone();
    let endpoint = ctx.store.run(move |c| hosts::endpoint(c, &h)).await?;
    ctx.agents.client(host, &endpoint)
}

/// Streams the disk from the source agent into the target agent, chunk by
/// chunk, holding one chunk at a time.
async fn copy_disk(
    ctx: &Ctx,
    v: &VpsRecord,
    source: &HostId,
    target: &HostId,
) -> Result<u64, ApiError> {
    let mut from = client(ctx, source).await?;
    let mut to = client(ctx, target).await?;
    let mut export = from
        .export_disk(ExportDiskRequest {
            vps_id: v.id.to_string(),
        })
        .await
        .map_err(|s| agent_error(source, &s))?
        .into_inner();
    let header = export
        .message()
        .await
        .map_err(|s| agent_error(source, &s))?
        .ok_or_else(|| ApiError::Agent {
            host: source.to_string(),
            message: "the disk export ended before it began".into(),
        })?;
    let first = ImportDiskRequest {
        vps_id: v.id.to_string(),
        image: v.spec.image.clone(),
        data: header.data,
        total_bytes: header.total_bytes,
    };
    // A source that fails half-way ends the stream early; the target then
    // counts fewer bytes than announced and refuses the disk.
    let rest = export
        .take_while(|c| std::future::ready(c.is_ok()))
        .filter_map(|c| std::future::ready(c.ok()))
        .map(|c| ImportDiskRequest {
            data: c.data,
            ..Default::default()
        });
    let outgoing = futures::stream::once(async move { first }).chain(rest);
    let answer = to
        .import_disk(outgoing)
        .await
        .map_err(|s| agent_error(target, &s))?;
    Ok(answer.into_inner().bytes)
}

async fn delete_on(ctx: &Ctx, host: &HostId, id: VpsId) -> Result<(), ApiError> {
    let mut c = client(ctx, host).await?;
    let mut req = tonic::Request::new(DeleteVmRequest {
        vps_id: id.to_string(),
    });
    req.set_timeout(Duration::from_secs(120));
    c.delete_vm(req).await.map_err(|s| agent_error(host, &s))?;
    Ok(())
}
