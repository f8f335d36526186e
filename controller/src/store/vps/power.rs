//! What an owner or operator wants of a placed VPS: its power, or its end.

use rusqlite::{Connection, params};

use super::rows::{VpsRecord, get, get_any, transition};
use crate::{
    auth::Caller,
    error::ApiError,
    ids::VpsId,
    lifecycle::{DesiredPower, VpsState},
    store::identity,
};

/// Start or stop: records the new desired power and bumps the generation.
#[allow(clippy::too_many_arguments)]
pub fn set_desired(
    c: &mut Connection,
    actor: &Caller,
    id: &VpsId,
    desired: DesiredPower,
    stop_timeout_s: u32,
    force_stop: bool,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    let action = match desired {
        DesiredPower::Running => "start",
        DesiredPower::Stopped => "stop",
    };
    if !matches!(
        v.state,
        VpsState::Scheduled | VpsState::Provisioning | VpsState::Running | VpsState::Stopped
    ) {
        return Err(ApiError::WrongState {
            id: v.id.to_string(),
            state: v.state.as_str(),
            action,
        });
    }
    if v.desired == desired && v.stop_timeout_s == stop_timeout_s && v.force_stop == force_stop {
        return Ok(v);
    }
    tx.prepare_cached(
        "UPDATE vps SET desired_power = ?2, stop_timeout_s = ?3, force_stop = ?4,
             generation = generation + 1, attempts = 0, next_attempt_ms = 0,
             state_reason = '', updated_at_ms = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        desired.as_str(),
        stop_timeout_s,
        force_stop,
        now_ms
    ])?;
    let result = if force_stop {
        "forced"
    } else {
        desired.as_str()
    };
    identity::audit(
        &tx,
        actor,
        v.institution(),
        &format!("vps.{action}"),
        &id.to_string(),
        result,
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok(v)
}

/// Marks a VPS for deletion; one that never reached a host is deleted at once.
pub fn mark_deleting(
    c: &mut Connection,
    actor: &Caller,
    id: &VpsId,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    if matches!(v.state, VpsState::Deleting | VpsState::Deleted) {
        return Ok(v);
    }
    let action = if v.state == VpsState::PendingApproval {
        "delete (a request still waiting for approval is withdrawn with `betangctl vps cancel`)"
    } else {
        "delete"
    };
    transition(&v, VpsState::Deleting, action)?;
    // Nothing on any host (never placed, or a failure already cleaned up):
    // DELETING has nothing to wait for.
    let next = if v.host_id.is_none() {
        VpsState::Deleted
    } else {
        VpsState::Deleting
    };
    tx.prepare_cached(
        "UPDATE vps SET state = ?3, generation = generation + 1, attempts = 0,
             next_attempt_ms = 0, updated_at_ms = ?2 WHERE id = ?1",
    )?
    .execute(params![id.to_string(), now_ms, next.as_str()])?;
    identity::audit(
        &tx,
        actor,
        v.institution(),
        "vps.delete",
        &id.to_string(),
        next.as_str(),
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok(v)
}
