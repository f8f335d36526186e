//! The store's side of moving a VPS to another host. A move is a row in
//! `moves` whose step the controller's mover (`crate::moves`) drives and
//! resumes after a restart:
//!
//! - `request` chooses the target and claims it, marks the VPS MIGRATING
//!   (holding capacity on both hosts and its quota once) and records step
//!   `copy`;
//! - `switch`, once the disk is on the target, hands the VPS to the target
//!   in one transaction (its claim on the source goes) and leaves step
//!   `cleanup` for the source's old files;
//! - `give_up` returns the VPS to its source (STOPPED, or started again when
//!   it should run) and leaves step `undo` for whatever the copy left on the
//!   target;
//! - `done` ends the move once the host concerned confirmed the removal.
//!
//! Until `switch` commits, the VPS and its data belong to the source, so a
//! controller that dies half-way loses nothing, and no second move of the VPS
//! begins while a step of the last one is unfinished.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::vps::{Placement, Target, VpsRecord, get, get_any, place, transition};
use crate::{
    auth::Caller,
    error::ApiError,
    ids::{HostId, VpsId},
    lifecycle::{DesiredPower, VpsState},
    store::{Db, identity},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Copy,
    Cleanup,
    Undo,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Copy => "copy",
            Step::Cleanup => "cleanup",
            Step::Undo => "undo",
        }
    }

    fn parse(s: &str) -> Option<Step> {
        [Step::Copy, Step::Cleanup, Step::Undo]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct MoveRecord {
    pub vps_id: VpsId,
    pub source: HostId,
    pub target: HostId,
    /// The VPS was running and is to be stopped first (and run again after).
    pub restart: bool,
    pub step: Step,
    pub started_ms: i64,
    pub attempts: u32,
}

const MOVE_COLS: &str = "vps_id, source, target, restart, step, started_ms, attempts";

fn move_row(r: &Row<'_>) -> rusqlite::Result<MoveRecord> {
    let bad = |what: &str, v: String| {
        rusqlite::Error::ToSqlConversionFailure(Box::new(crate::error::StoreError::Corrupt(
            format!("move {what}: {v}"),
        )))
    };
    let id: String = r.get("vps_id")?;
    let host = |col: &str| -> rusqlite::Result<HostId> {
        let h: String = r.get(col)?;
        HostId::parse(&h).map_err(|_| bad("host", h))
    };
    let step: String = r.get("step")?;
    Ok(MoveRecord {
        vps_id: VpsId::parse(&id).map_err(|_| bad("vps id", id.clone()))?,
        source: host("source")?,
        target: host("target")?,
        restart: r.get("restart")?,
        step: Step::parse(&step).ok_or_else(|| bad("step", step.clone()))?,
        started_ms: r.get("started_ms")?,
        attempts: r.get::<_, i64>("attempts")? as u32,
    })
}

pub fn get_move(c: &Connection, id: &VpsId) -> Result<Option<MoveRecord>, ApiError> {
    Ok(
        c.prepare_cached(&format!("SELECT {MOVE_COLS} FROM moves WHERE vps_id = ?1"))?
            .query_row([id.to_string()], move_row)
            .optional()?,
    )
}

/// The moves whose next step is due.
pub fn due(c: &Connection, now_ms: i64) -> Result<Vec<MoveRecord>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT {MOVE_COLS} FROM moves WHERE next_try_ms <= ?1 ORDER BY started_ms"
    ))?;
    let rows = q.query_map([now_ms], move_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every move not yet ended, for operators and tests.
pub fn all(c: &Connection) -> Result<Vec<MoveRecord>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT {MOVE_COLS} FROM moves ORDER BY started_ms"
    ))?;
    let rows = q.query_map([], move_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn refuse(v: &VpsRecord, action: &'static str) -> ApiError {
    ApiError::WrongState {
        id: v.id.to_string(),
        state: v.state.as_str(),
        action,
    }
}

/// Whether a VPS is, or is about to be, running: such a VPS moves only with
/// a restart.
pub fn wants_to_run(v: &VpsRecord) -> bool {
    v.desired == DesiredPower::Running || v.state == VpsState::Running
}

/// Records a move of `id` to the host the scheduler picks (never its own),
/// claiming that host now. A running VPS moves only with `restart`; nothing
/// moves while its last change is still being applied.
pub fn request(
    db: &mut Db,
    actor: &Caller,
    id: &VpsId,
    restart: bool,
    placement: &Placement,
    now_ms: i64,
) -> Result<(VpsRecord, HostId), ApiError> {
    let tx = db.conn.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    if v.state == VpsState::Migrating {
        return Err(refuse(&v, "move (it is already moving)"));
    }
    if let Some(m) = get_move(&tx, id)? {
        return Err(refuse(&v, pending_refusal(&m)));
    }
    let running = wants_to_run(&v);
    if running && !restart {
        return Err(refuse(
            &v,
            "move without a restart (stop it first, or ask for a restart)",
        ));
    }
    if !matches!(v.state, VpsState::Running | VpsState::Stopped) {
        return Err(refuse(&v, "move (only a stopped or running VPS moves)"));
    }
    // A start or stop still on its way is waited out (the VM must be still
    // while its disk is read); a change of size is applied on the target.
    if (v.state == VpsState::Running) != (v.desired == DesiredPower::Running) {
        return Err(refuse(
            &v,
            "move yet (its last change is still being applied; try again when it is done)",
        ));
    }
    transition(&v, VpsState::Migrating, "move")?;
    let source = v
        .host_id
        .clone()
        .ok_or_else(|| refuse(&v, "move (it has no host)"))?;
    // A VPS with an address stays where its network is attached.
    let wish = super::networks::steer(&v.placement, super::networks::of_vps(&tx, id)?.as_ref())?;
    let target = place(
        &tx,
        &mut db.hosts,
        &v.spec,
        &wish,
        v.institution(),
        &v.image_digest,
        Target::Elsewhere(&source),
        placement,
        now_ms,
    )?;
    tx.prepare_cached(
        "UPDATE vps SET state = 'MIGRATING', move_target = ?2, state_reason = ?3,
             updated_at_ms = ?4 WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        target.as_str(),
        format!("moving from {source} to {target}"),
        now_ms
    ])?;
    tx.prepare_cached(
        "INSERT INTO moves (vps_id, source, target, restart, step, started_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, 'copy', ?5, ?5)",
    )?
    .execute(params![
        id.to_string(),
        source.as_str(),
        target.as_str(),
        running,
        now_ms
    ])?;
    identity::audit(
        &tx,
        actor,
        v.institution(),
        "vps.move",
        &id.to_string(),
        &format!(
            "MIGRATING from {source} to {target}{}",
            if running { " (restarting)" } else { "" }
        ),
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok((v, target))
}

/// Why a VPS whose last move has a step left cannot move again yet.
fn pending_refusal(m: &MoveRecord) -> &'static str {
    match m.step {
        Step::Copy => "move (it is already moving)",
        Step::Cleanup => {
            "move yet (its last move is still removing the old copy from its previous host)"
        }
        Step::Undo => {
            "move yet (its last move is still removing what it left on the host it failed to reach)"
        }
    }
}

/// The disk is on the target: the VPS now lives there, STOPPED with a new
/// generation so the dispatcher defines its VM there (and starts it when it
/// should run). Its claim on the source goes in the same transaction.
pub fn switch(c: &mut Connection, id: &VpsId, now_ms: i64) -> Result<VpsRecord, ApiError> {
    let tx = c.savepoint()?;
    let v = get_any(&tx, id)?;
    let m = get_move(&tx, id)?.filter(|m| m.step == Step::Copy);
    let (Some(m), VpsState::Migrating) = (m, v.state) else {
        return Err(refuse(&v, "finish moving (no move is copying it)"));
    };
    transition(&v, VpsState::Stopped, "finish moving")?;
    tx.prepare_cached(
        "UPDATE vps SET state = 'STOPPED', host_id = move_target, move_target = NULL,
             generation = generation + 1, observed_power = 'absent', attempts = 0,
             next_attempt_ms = 0, state_reason = '', updated_at_ms = ?2
         WHERE id = ?1",
    )?
    .execute(params![id.to_string(), now_ms])?;
    tx.prepare_cached(
        "UPDATE moves SET step = 'cleanup', attempts = 0, next_try_ms = 0, reason = '',
             updated_ms = ?2 WHERE vps_id = ?1",
    )?
    .execute(params![id.to_string(), now_ms])?;
    identity::audit(
        &tx,
        &Caller::system(),
        v.institution(),
        "vps.move",
        &id.to_string(),
        &format!("moved from {} to {}", m.source, m.target),
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok(v)
}

/// The move cannot go on: the VPS stays on its source, saying why, and is
/// started again there if it should run (a new generation makes the
/// dispatcher converge it). What the copy left on the target is removed next.
pub fn give_up(
    c: &mut Connection,
    id: &VpsId,
    reason: &str,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.savepoint()?;
    let v = get_any(&tx, id)?;
    let m = get_move(&tx, id)?.filter(|m| m.step == Step::Copy);
    let (Some(m), VpsState::Migrating) = (m, v.state) else {
        return Err(refuse(&v, "give up moving (no move is copying it)"));
    };
    transition(&v, VpsState::Stopped, "give up moving")?;
    let said = format!(
        "moving to {} failed; it stayed on {}: {reason}",
        m.target, m.source
    );
    tx.prepare_cached(
        "UPDATE vps SET state = 'STOPPED', move_target = NULL, generation = generation + 1,
             observed_power = 'absent', attempts = 0, next_attempt_ms = 0, state_reason = ?2,
             updated_at_ms = ?3
         WHERE id = ?1",
    )?
    .execute(params![id.to_string(), said, now_ms])?;
    tx.prepare_cached(
        "UPDATE moves SET step = 'undo', attempts = 0, next_try_ms = 0, reason = ?2,
             updated_ms = ?3 WHERE vps_id = ?1",
    )?
    .execute(params![id.to_string(), reason, now_ms])?;
    identity::audit(
        &tx,
        &Caller::system(),
        v.institution(),
        "vps.move",
        &id.to_string(),
        &said,
        now_ms,
    )?;
    let v = get_any(&tx, id)?;
    tx.commit()?;
    Ok(v)
}

/// A step failed for now: tried again later. The reason is kept with the
/// move and, while the VPS is still MIGRATING, shown as its state reason.
pub fn retry_later(c: &Connection, id: &VpsId, reason: &str, now_ms: i64) -> Result<(), ApiError> {
    c.prepare_cached(
        "UPDATE moves SET attempts = attempts + 1,
             next_try_ms = ?2 + MIN(60000, 1000 << MIN(attempts, 6)), reason = ?3, updated_ms = ?2
         WHERE vps_id = ?1",
    )?
    .execute(params![id.to_string(), now_ms, reason])?;
    c.prepare_cached("UPDATE vps SET state_reason = ?2 WHERE id = ?1 AND state = 'MIGRATING'")?
        .execute(params![id.to_string(), reason])?;
    Ok(())
}

/// The last step's host confirmed the removal: the move is over.
pub fn done(c: &Connection, id: &VpsId) -> Result<(), ApiError> {
    c.prepare_cached("DELETE FROM moves WHERE vps_id = ?1 AND step IN ('cleanup', 'undo')")?
        .execute([id.to_string()])?;
    Ok(())
}
