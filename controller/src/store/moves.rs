//! The store's side of moving a stopped VPS to another host. `begin` marks it
//! MIGRATING and chooses the target; `finish` moves its claim there in one
//! transaction, after the disk has arrived; `abandon` leaves it where it was.
//! Until `finish` commits, the VPS and its claim stay on the source host, so a
//! controller that dies half-way loses nothing: `abandon_all` at start-up
//! returns every unfinished move to STOPPED on its source.

use rusqlite::{Connection, params};

use super::vps::{Placement, Target, VpsRecord, get, get_any, place, transition};
use crate::{
    auth::Caller,
    error::ApiError,
    ids::{HostId, VpsId},
    lifecycle::VpsState,
    store::{Db, identity},
};

/// STOPPED -> MIGRATING, with the host it is to go to.
pub fn begin(
    db: &mut Db,
    actor: &Caller,
    id: &VpsId,
    placement: &Placement,
    now_ms: i64,
) -> Result<(VpsRecord, HostId), ApiError> {
    let tx = db.conn.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    if v.state == VpsState::Migrating {
        return Err(ApiError::WrongState {
            id: id.to_string(),
            state: v.state.as_str(),
            action: "move (it is already moving)",
        });
    }
    transition(&v, VpsState::Migrating, "move (only a stopped VPS moves)")?;
    let source = v.host_id.clone().ok_or_else(|| ApiError::WrongState {
        id: id.to_string(),
        state: v.state.as_str(),
        action: "move (it has no host)",
    })?;
    let target = place(
        &tx,
        &mut db.hosts,
        &v.spec,
        &v.placement,
        v.institution(),
        Target::Elsewhere(&source),
        placement,
        now_ms,
    )?;
    tx.prepare_cached(
        "UPDATE vps SET state = 'MIGRATING', state_reason = ?2, updated_at_ms = ?3 WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        format!("moving from {source} to {target}"),
        now_ms
    ])?;
    identity::audit(
        &tx,
        actor,
        v.institution(),
        "vps.move",
        &id.to_string(),
        &format!("MIGRATING from {source} to {target}"),
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok((v, target))
}

/// The disk is on `target`: the claim moves there (judged again, since the
/// target was not held during the copy) and the VPS is STOPPED again, with a
/// new generation so that the dispatcher defines its VM on the target.
pub fn finish(
    db: &mut Db,
    actor: &Caller,
    id: &VpsId,
    target: &HostId,
    placement: &Placement,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = db.conn.savepoint()?;
    let v = get_any(&tx, id)?;
    transition(&v, VpsState::Stopped, "finish moving")?;
    if v.state != VpsState::Migrating {
        return Err(ApiError::WrongState {
            id: id.to_string(),
            state: v.state.as_str(),
            action: "finish moving",
        });
    }
    place(
        &tx,
        &mut db.hosts,
        &v.spec,
        &v.placement,
        v.institution(),
        Target::Pinned(target),
        placement,
        now_ms,
    )?;
    tx.prepare_cached(
        "UPDATE vps SET state = 'STOPPED', host_id = ?2, generation = generation + 1,
             observed_power = 'absent', attempts = 0, next_attempt_ms = 0, state_reason = '',
             updated_at_ms = ?3
         WHERE id = ?1",
    )?
    .execute(params![id.to_string(), target.as_str(), now_ms])?;
    let from = v.host_id.as_ref().map(HostId::as_str).unwrap_or("");
    identity::audit(
        &tx,
        actor,
        v.institution(),
        "vps.move",
        &id.to_string(),
        &format!("moved from {from} to {target}"),
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok(v)
}

/// The move failed: the VPS stays STOPPED on its source host, saying why.
pub fn abandon(c: &Connection, id: &VpsId, reason: &str, now_ms: i64) -> Result<(), ApiError> {
    c.prepare_cached(
        "UPDATE vps SET state = 'STOPPED', state_reason = ?2, updated_at_ms = ?3
         WHERE id = ?1 AND state = 'MIGRATING'",
    )?
    .execute(params![id.to_string(), reason, now_ms])?;
    Ok(())
}

/// At start-up: moves the last controller did not finish are undone.
pub fn abandon_all(c: &Connection, now_ms: i64) -> Result<usize, ApiError> {
    Ok(c.execute(
        "UPDATE vps SET state = 'STOPPED', updated_at_ms = ?1,
             state_reason = 'the controller restarted during a move; it stayed on its host'
         WHERE state = 'MIGRATING'",
        [now_ms],
    )?)
}
