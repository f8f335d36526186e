//! The dispatcher's side of the store: which VPS need an agent's call, and
//! what the agents answered (recorded against the generation they applied)
//! or why they failed.

use betang_proto::v1::{PowerState, VmStatus};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{VpsRecord, check_transition, corrupt, get_any, transition};
use crate::{error::ApiError, ids::VpsId, lifecycle::VpsState, store::hosts};

/// What the dispatcher must do for one VPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Ensure,
    Delete,
    /// Remove the VM a failed provisioning may have left, then release the claim.
    Cleanup,
}

/// The VPS that differ from what they should be, most overdue first. Its
/// condition is the partial index `vps_work` (migrations/0005), word for
/// word, so that SQLite reads only these rows.
pub const WORK_ITEMS_SQL: &str = "SELECT id FROM vps
         WHERE next_attempt_ms <= ?1 AND host_id IS NOT NULL AND (
             state IN ('SCHEDULED', 'PROVISIONING', 'DELETING')
             OR (state IN ('RUNNING', 'STOPPED') AND (
                    applied_generation < generation
                    OR observed_power = 'absent'
                    OR (desired_power = 'stopped' AND observed_power = 'running')))
             OR (state = 'ERROR' AND cleanup_pending = 1))
         ORDER BY next_attempt_ms, seq LIMIT 500";

/// What the dispatcher must do, leaving out the VPS it is already busy with
/// (so a pass costs little while a long queue is being worked through).
pub fn work_items(
    c: &Connection,
    now_ms: i64,
    busy: &std::collections::HashSet<VpsId>,
) -> Result<Vec<(Work, VpsRecord)>, ApiError> {
    let ids: Vec<String> = {
        let mut q = c.prepare_cached(WORK_ITEMS_SQL)?;
        q.query_map([now_ms], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for id in ids {
        let Ok(id) = VpsId::parse(&id) else { continue };
        if busy.contains(&id) {
            continue;
        }
        let v = get_any(c, &id)?;
        let w = match v.state {
            VpsState::Deleting => Work::Delete,
            VpsState::Error => Work::Cleanup,
            _ => Work::Ensure,
        };
        out.push((w, v));
    }
    Ok(out)
}

/// SCHEDULED -> PROVISIONING, just before the first ensure is sent; one
/// transaction for every VPS a reconcile pass is about to build.
pub fn begin_provisioning(c: &mut Connection, ids: &[VpsId], now_ms: i64) -> Result<(), ApiError> {
    let tx = c.savepoint()?;
    {
        let mut q = tx.prepare_cached(
            "UPDATE vps SET state = 'PROVISIONING', updated_at_ms = ?2
             WHERE id = ?1 AND state = 'SCHEDULED'",
        )?;
        for id in ids {
            q.execute(params![id.to_string(), now_ms])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// What an agent answered to an ensure sent with `generation`.
#[derive(Debug, Clone)]
pub struct Ensured {
    pub id: VpsId,
    pub generation: u64,
    pub status: VmStatus,
}

/// Records successful ensures, each unless its VPS changed meanwhile; one
/// transaction for a whole burst of answers.
pub fn ensure_succeeded(c: &mut Connection, done: &[Ensured], now_ms: i64) -> Result<(), ApiError> {
    let tx = c.savepoint()?;
    for e in done {
        match record_ensured(&tx, e, now_ms) {
            Ok(()) => {}
            Err(ApiError::Store(err)) => return Err(ApiError::Store(err)),
            Err(err) => tracing::warn!(vps_id = %e.id, error = %err, "ensure answer not recorded"),
        }
    }
    tx.commit()?;
    Ok(())
}

fn record_ensured(c: &Connection, e: &Ensured, now_ms: i64) -> Result<(), ApiError> {
    // Only what decides whether the answer still applies: the whole row is
    // not needed here, and every VPS built comes through.
    let (state, generation) = c
        .prepare_cached("SELECT state, generation FROM vps WHERE id = ?1")?
        .query_row([e.id.to_string()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?
        .ok_or_else(|| ApiError::VpsNotFound(e.id.to_string()))?;
    let state = VpsState::parse(&state).ok_or_else(|| ApiError::from(corrupt("state", &state)))?;
    if generation as u64 != e.generation
        || !matches!(
            state,
            VpsState::Provisioning | VpsState::Running | VpsState::Stopped
        )
    {
        return Ok(());
    }
    let power = PowerState::try_from(e.status.power).unwrap_or(PowerState::Unspecified);
    let next = if power == PowerState::Running {
        VpsState::Running
    } else {
        VpsState::Stopped
    };
    check_transition(&e.id, state, next, "record")?;
    c.prepare_cached(
        "UPDATE vps SET state = ?2, applied_generation = ?3, observed_power = ?4, attempts = 0,
             next_attempt_ms = 0, state_reason = '', updated_at_ms = ?5 WHERE id = ?1",
    )?
    .execute(params![
        e.id.to_string(),
        next.as_str(),
        e.generation as i64,
        hosts::power_name(power),
        now_ms
    ])?;
    Ok(())
}

/// Why an agent call failed, as the dispatcher tells the store.
#[derive(Debug, Clone)]
pub struct CallFailure {
    /// Worth trying again (the agent or libvirt did not answer, was busy).
    pub transient: bool,
    /// What a person reads: plain words, never a transport error.
    pub reason: String,
    /// The agent kept a disk it would not use (it does not match what the
    /// VPS was built on): nothing may be cleaned up on the host.
    pub disk_kept: bool,
}

/// Records a failed agent call. Transient failures are retried with backoff;
/// a permanent one (or a build that has taken too long) puts the VPS in ERROR.
/// The build clock counts from placement and stands still while the host is
/// down (`hosts::record_back` pushes it back), so waiting for a host is never
/// a failed build.
pub fn call_failed(
    c: &mut Connection,
    id: &VpsId,
    failure: &CallFailure,
    now_ms: i64,
    build_timeout_ms: i64,
) -> Result<(), ApiError> {
    let tx = c.savepoint()?;
    let v = get_any(&tx, id)?;
    let building = matches!(v.state, VpsState::Scheduled | VpsState::Provisioning);
    let host_down = match &v.host_id {
        Some(h) => hosts::is_down(&tx, h)?,
        None => false,
    };
    let since = if v.build_since_ms > 0 {
        v.build_since_ms
    } else {
        v.created_at_ms
    };
    let timed_out = building && !host_down && now_ms - since > build_timeout_ms;
    let message = &failure.reason;
    if (failure.transient && !timed_out)
        || v.state == VpsState::Deleting
        || v.state == VpsState::Error
    {
        let backoff = 500i64 << v.attempts.min(7);
        let reason = match (&v.host_id, host_down) {
            // Its reason already says why it failed and that cleanup waits.
            _ if v.state == VpsState::Error => v.state_reason.clone(),
            (Some(h), true) => format!("waiting for host {h}, which is not reporting: {message}"),
            _ => message.clone(),
        };
        tx.prepare_cached(
            "UPDATE vps SET attempts = attempts + 1, next_attempt_ms = ?2, state_reason = ?3
             WHERE id = ?1",
        )?
        .execute(params![
            id.to_string(),
            now_ms + backoff.min(60_000),
            reason
        ])?;
    } else {
        let reason = if timed_out {
            format!(
                "provisioning took longer than {} s: {message}",
                build_timeout_ms / 1000
            )
        } else {
            message.to_owned()
        };
        let cleanup = building && !failure.disk_kept;
        let reason = match (&v.host_id, cleanup) {
            (Some(h), true) => format!("{reason}{CLEANUP_PENDING}{h}"),
            _ => reason,
        };
        transition(&v, VpsState::Error, "fail")?;
        tx.prepare_cached(
            "UPDATE vps SET state = 'ERROR', state_reason = ?2, cleanup_pending = ?3,
                 attempts = 0, next_attempt_ms = 0, updated_at_ms = ?4 WHERE id = ?1",
        )?
        .execute(params![id.to_string(), reason, cleanup, now_ms])?;
    }
    tx.commit()?;
    Ok(())
}

/// The agent confirmed the VM is gone: the VPS is deleted and its claim released.
/// Its address goes back to its network: nothing on the host refers to it
/// any more.
pub fn deleted(c: &Connection, id: &VpsId, now_ms: i64) -> Result<(), ApiError> {
    let n = c
        .prepare_cached(
            "UPDATE vps SET state = 'DELETED', observed_power = 'absent', updated_at_ms = ?2
             WHERE id = ?1 AND state = 'DELETING'",
        )?
        .execute(params![id.to_string(), now_ms])?;
    if n == 1 {
        crate::store::networks::release(c, id)?;
    }
    Ok(())
}

/// What an ERROR VPS's reason says, followed by the host, until the agent
/// confirms that what the failed build left is gone.
const CLEANUP_PENDING: &str = "; cleanup pending on host ";

/// A failed VPS's leftovers are gone: release its claim on the host.
pub fn cleaned_up(c: &Connection, id: &VpsId, now_ms: i64) -> Result<(), ApiError> {
    c.prepare_cached(
        "UPDATE vps SET cleanup_pending = 0, host_id = NULL, observed_power = 'absent',
             state_reason = replace(state_reason, ?3 || host_id, ''), updated_at_ms = ?2
         WHERE id = ?1 AND state = 'ERROR'",
    )?
    .execute(params![id.to_string(), now_ms, CLEANUP_PENDING])?;
    Ok(())
}
