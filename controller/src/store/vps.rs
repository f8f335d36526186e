//! VPS rows: creation with an atomic placement claim, desired-state changes,
//! and the outcomes the dispatcher records.

use betang_proto::v1::{PowerState, VmStatus, VmUsage, Vps, VpsSpec};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::{
    error::{ApiError, StoreError},
    ids::{HostId, VpsId},
    lifecycle::{DesiredPower, VpsState},
    scheduler::{self, Demand, Ratios, Resources},
    store::hosts,
};

#[derive(Debug, Clone)]
pub struct VpsRecord {
    pub seq: i64,
    pub id: VpsId,
    pub request_id: String,
    pub spec: VpsSpec,
    pub state: VpsState,
    pub state_reason: String,
    pub desired: DesiredPower,
    pub host_id: Option<HostId>,
    pub generation: u64,
    pub applied_generation: u64,
    pub observed_power: String,
    pub stop_timeout_s: u32,
    pub force_stop: bool,
    pub cleanup_pending: bool,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub usage: VmUsage,
}

const COLS: &str = "seq, id, request_id, name, vcpus, memory_mib, disk_gib, image, ssh_public_key,
    user_data, state, state_reason, desired_power, host_id, generation, applied_generation,
    observed_power, stop_timeout_s, force_stop, cleanup_pending, attempts, created_at_ms,
    updated_at_ms, cpu_rate, cpu_time_ns, mem_max_bytes, mem_used_bytes, disk_read_bytes,
    disk_write_bytes, net_rx_bytes, net_tx_bytes, usage_at_ms, mem_rss_bytes";

fn corrupt(what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(StoreError::Corrupt(format!("{what}: {v}"))))
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<VpsRecord> {
    let id: String = r.get(1)?;
    let state: String = r.get(10)?;
    let desired: String = r.get(12)?;
    let host: Option<String> = r.get(13)?;
    Ok(VpsRecord {
        seq: r.get(0)?,
        id: VpsId::parse(&id).map_err(|_| corrupt("vps id", &id))?,
        request_id: r.get(2)?,
        spec: VpsSpec {
            name: r.get(3)?,
            vcpus: r.get::<_, i64>(4)? as u32,
            memory_mib: r.get::<_, i64>(5)? as u64,
            disk_gib: r.get::<_, i64>(6)? as u64,
            image: r.get(7)?,
            ssh_public_key: r.get(8)?,
            user_data: r.get(9)?,
        },
        state: VpsState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        state_reason: r.get(11)?,
        desired: DesiredPower::parse(&desired).ok_or_else(|| corrupt("desired", &desired))?,
        host_id: match host {
            Some(h) => Some(HostId::parse(&h).map_err(|_| corrupt("host id", &h))?),
            None => None,
        },
        generation: r.get::<_, i64>(14)? as u64,
        applied_generation: r.get::<_, i64>(15)? as u64,
        observed_power: r.get(16)?,
        stop_timeout_s: r.get::<_, i64>(17)? as u32,
        force_stop: r.get(18)?,
        cleanup_pending: r.get(19)?,
        attempts: r.get::<_, i64>(20)? as u32,
        created_at_ms: r.get(21)?,
        updated_at_ms: r.get(22)?,
        usage: VmUsage {
            cpu_rate: r.get(23)?,
            cpu_time_ns: r.get::<_, i64>(24)? as u64,
            memory_max_bytes: r.get::<_, i64>(25)? as u64,
            memory_used_bytes: r.get::<_, i64>(26)? as u64,
            disk_read_bytes: r.get::<_, i64>(27)? as u64,
            disk_write_bytes: r.get::<_, i64>(28)? as u64,
            net_rx_bytes: r.get::<_, i64>(29)? as u64,
            net_tx_bytes: r.get::<_, i64>(30)? as u64,
            sampled_at_ms: r.get(31)?,
            memory_rss_bytes: r.get::<_, i64>(32)? as u64,
        },
    })
}

impl VpsRecord {
    pub fn to_proto(&self) -> Vps {
        Vps {
            id: self.id.to_string(),
            spec: Some(self.spec.clone()),
            state: self.state.to_proto() as i32,
            state_reason: self.state_reason.clone(),
            desired_power: self.desired.to_proto() as i32,
            host_id: self
                .host_id
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_default(),
            usage: (self.usage.sampled_at_ms > 0).then_some(self.usage),
            generation: self.generation,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            request_id: self.request_id.clone(),
        }
    }
}

pub fn get(c: &Connection, id: &VpsId) -> Result<VpsRecord, ApiError> {
    c.query_row(
        &format!("SELECT {COLS} FROM vps WHERE id = ?1"),
        [id.to_string()],
        from_row,
    )
    .optional()?
    .ok_or_else(|| ApiError::VpsNotFound(id.to_string()))
}

fn by_request(c: &Connection, request_id: &str) -> Result<Option<VpsRecord>, ApiError> {
    Ok(c.query_row(
        &format!("SELECT {COLS} FROM vps WHERE request_id = ?1"),
        [request_id],
        from_row,
    )
    .optional()?)
}

pub struct Placement {
    pub ratios: Ratios,
    pub down_after_ms: i64,
}

/// Creates a VPS and claims capacity on a host in one transaction. The same
/// `request_id` again returns the first VPS.
pub fn create(
    c: &mut Connection,
    request_id: &str,
    spec: &VpsSpec,
    placement: &Placement,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(existing) = by_request(&tx, request_id)? {
        if &existing.spec != spec {
            return Err(ApiError::invalid(
                "request_id",
                format!(
                    "{request_id:?} was already used for a different request (VPS {})",
                    existing.id
                ),
            ));
        }
        return Ok(existing);
    }
    let views = hosts::views(&tx, now_ms, placement.down_after_ms)?;
    let demand = Demand {
        need: Resources {
            vcpus: spec.vcpus.into(),
            memory_mib: spec.memory_mib,
            disk_gib: spec.disk_gib,
        },
        image: spec.image.clone(),
    };
    let Some(image) = hosts::catalogue(&tx)?
        .into_iter()
        .find(|i| i.name == spec.image)
    else {
        return Err(ApiError::invalid(
            "image",
            format!(
                "no image named {:?} in the catalogue; see `betangctl image list`",
                spec.image
            ),
        ));
    };
    if spec.disk_gib < image.min_disk_gib {
        return Err(ApiError::invalid(
            "disk_gib",
            format!(
                "image {} needs a disk of at least {} GiB, {} GiB was asked",
                image.name, image.min_disk_gib, spec.disk_gib
            ),
        ));
    }
    let host =
        scheduler::place(&views, &demand, &placement.ratios).map_err(ApiError::NoHostFits)?;
    debug_assert!(VpsState::Pending.can_become(VpsState::Scheduled));
    let id = VpsId::new();
    tx.execute(
        "INSERT INTO vps (id, request_id, name, vcpus, memory_mib, disk_gib, image, ssh_public_key,
                          user_data, state, desired_power, host_id, created_at_ms, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'SCHEDULED', 'running', ?10, ?11, ?11)",
        params![
            id.to_string(),
            request_id,
            spec.name,
            spec.vcpus,
            spec.memory_mib as i64,
            spec.disk_gib as i64,
            spec.image,
            spec.ssh_public_key,
            spec.user_data,
            host.as_str(),
            now_ms
        ],
    )?;
    let rec = get(&tx, &id)?;
    tx.commit()?;
    Ok(rec)
}

pub fn list(
    c: &Connection,
    after_seq: i64,
    limit: u32,
    include_deleted: bool,
) -> Result<Vec<VpsRecord>, ApiError> {
    let sql = format!(
        "SELECT {COLS} FROM vps WHERE seq > ?1 AND (?2 OR state <> 'DELETED') ORDER BY seq LIMIT ?3"
    );
    let mut q = c.prepare_cached(&sql)?;
    let rows = q.query_map(params![after_seq, include_deleted, limit], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn transition(
    c: &Connection,
    v: &VpsRecord,
    next: VpsState,
    action: &'static str,
) -> Result<(), ApiError> {
    if v.state != next && !v.state.can_become(next) {
        return Err(ApiError::WrongState {
            id: v.id.to_string(),
            state: v.state.as_str(),
            action,
        });
    }
    let _ = c;
    Ok(())
}

/// Start or stop: records the new desired power and bumps the generation.
pub fn set_desired(
    c: &mut Connection,
    id: &VpsId,
    desired: DesiredPower,
    stop_timeout_s: u32,
    force_stop: bool,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let v = get(&tx, id)?;
    let action = match desired {
        DesiredPower::Running => "start",
        DesiredPower::Stopped => "stop",
    };
    if matches!(
        v.state,
        VpsState::Deleting | VpsState::Deleted | VpsState::Error
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
    tx.execute(
        "UPDATE vps SET desired_power = ?2, stop_timeout_s = ?3, force_stop = ?4,
             generation = generation + 1, attempts = 0, next_attempt_ms = 0,
             state_reason = '', updated_at_ms = ?5 WHERE id = ?1",
        params![
            id.to_string(),
            desired.as_str(),
            stop_timeout_s,
            force_stop,
            now_ms
        ],
    )?;
    let v = get(&tx, id)?;
    tx.commit()?;
    Ok(v)
}

/// Marks a VPS for deletion; one that never reached a host is deleted at once.
pub fn mark_deleting(c: &mut Connection, id: &VpsId, now_ms: i64) -> Result<VpsRecord, ApiError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let v = get(&tx, id)?;
    if matches!(v.state, VpsState::Deleting | VpsState::Deleted) {
        return Ok(v);
    }
    transition(&tx, &v, VpsState::Deleting, "delete")?;
    // Nothing on any host (never placed, or a failure already cleaned up):
    // DELETING has nothing to wait for.
    let next = if v.host_id.is_none() {
        VpsState::Deleted
    } else {
        VpsState::Deleting
    };
    tx.execute(
        "UPDATE vps SET state = ?3, generation = generation + 1, attempts = 0,
             next_attempt_ms = 0, updated_at_ms = ?2 WHERE id = ?1",
        params![id.to_string(), now_ms, next.as_str()],
    )?;
    let v = get(&tx, id)?;
    tx.commit()?;
    Ok(v)
}

/// What the dispatcher must do for one VPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Ensure,
    Delete,
    /// Remove the VM a failed provisioning may have left, then release the claim.
    Cleanup,
}

/// VPS whose recorded state differs from what they should be, and are due.
pub fn work_items(c: &Connection, now_ms: i64) -> Result<Vec<(Work, VpsRecord)>, ApiError> {
    let sql = format!(
        "SELECT {COLS} FROM vps WHERE next_attempt_ms <= ?1 AND host_id IS NOT NULL AND (
             state IN ('SCHEDULED', 'PROVISIONING', 'DELETING')
             OR (state IN ('RUNNING', 'STOPPED') AND (
                    applied_generation < generation
                    OR observed_power = 'absent'
                    OR (desired_power = 'stopped' AND observed_power = 'running')))
             OR (state = 'ERROR' AND cleanup_pending = 1))
         ORDER BY next_attempt_ms, seq LIMIT 500"
    );
    let mut q = c.prepare_cached(&sql)?;
    let rows = q.query_map([now_ms], from_row)?;
    let mut out = Vec::new();
    for r in rows {
        let v = r?;
        let w = match v.state {
            VpsState::Deleting => Work::Delete,
            VpsState::Error => Work::Cleanup,
            _ => Work::Ensure,
        };
        out.push((w, v));
    }
    Ok(out)
}

/// SCHEDULED -> PROVISIONING, just before the first ensure is sent.
pub fn begin_provisioning(c: &Connection, id: &VpsId, now_ms: i64) -> Result<(), ApiError> {
    c.execute(
        "UPDATE vps SET state = 'PROVISIONING', updated_at_ms = ?2
         WHERE id = ?1 AND state = 'SCHEDULED'",
        params![id.to_string(), now_ms],
    )?;
    Ok(())
}

/// Records a successful ensure, unless the VPS changed meanwhile.
pub fn ensure_succeeded(
    c: &mut Connection,
    id: &VpsId,
    sent_generation: u64,
    status: &VmStatus,
    now_ms: i64,
) -> Result<(), ApiError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let v = get(&tx, id)?;
    if v.generation != sent_generation
        || !matches!(
            v.state,
            VpsState::Provisioning | VpsState::Running | VpsState::Stopped
        )
    {
        return Ok(());
    }
    let power = PowerState::try_from(status.power).unwrap_or(PowerState::Unspecified);
    let next = if power == PowerState::Running {
        VpsState::Running
    } else {
        VpsState::Stopped
    };
    transition(&tx, &v, next, "record")?;
    tx.execute(
        "UPDATE vps SET state = ?2, applied_generation = ?3, observed_power = ?4, attempts = 0,
             next_attempt_ms = 0, state_reason = '', updated_at_ms = ?5 WHERE id = ?1",
        params![
            id.to_string(),
            next.as_str(),
            sent_generation as i64,
            hosts::power_name(power),
            now_ms
        ],
    )?;
    tx.commit()?;
    Ok(())
}

/// Records a failed agent call. Transient failures are retried with backoff;
/// a permanent one (or a build that has taken too long) puts the VPS in ERROR.
pub fn call_failed(
    c: &mut Connection,
    id: &VpsId,
    transient: bool,
    message: &str,
    now_ms: i64,
    build_timeout_ms: i64,
) -> Result<(), ApiError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let v = get(&tx, id)?;
    let building = matches!(v.state, VpsState::Scheduled | VpsState::Provisioning);
    let timed_out = building && now_ms - v.created_at_ms > build_timeout_ms;
    if (transient && !timed_out) || v.state == VpsState::Deleting || v.state == VpsState::Error {
        let backoff = 500i64 << v.attempts.min(7);
        tx.execute(
            "UPDATE vps SET attempts = attempts + 1, next_attempt_ms = ?2, state_reason = ?3
             WHERE id = ?1",
            params![id.to_string(), now_ms + backoff.min(60_000), message],
        )?;
    } else {
        let reason = if timed_out {
            format!(
                "provisioning took longer than {} s: {message}",
                build_timeout_ms / 1000
            )
        } else {
            message.to_owned()
        };
        transition(&tx, &v, VpsState::Error, "fail")?;
        tx.execute(
            "UPDATE vps SET state = 'ERROR', state_reason = ?2, cleanup_pending = ?3,
                 attempts = 0, next_attempt_ms = 0, updated_at_ms = ?4 WHERE id = ?1",
            params![id.to_string(), reason, building, now_ms],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The agent confirmed the VM is gone: the VPS is deleted and its claim released.
pub fn deleted(c: &Connection, id: &VpsId, now_ms: i64) -> Result<(), ApiError> {
    c.execute(
        "UPDATE vps SET state = 'DELETED', observed_power = 'absent', updated_at_ms = ?2
         WHERE id = ?1 AND state = 'DELETING'",
        params![id.to_string(), now_ms],
    )?;
    Ok(())
}

/// A failed VPS's leftovers are gone: release its claim on the host.
pub fn cleaned_up(c: &Connection, id: &VpsId, now_ms: i64) -> Result<(), ApiError> {
    c.execute(
        "UPDATE vps SET cleanup_pending = 0, host_id = NULL, observed_power = 'absent',
             updated_at_ms = ?2 WHERE id = ?1 AND state = 'ERROR'",
        params![id.to_string(), now_ms],
    )?;
    Ok(())
}
