//! The VPS row as the store keeps it: reading it (by id, by request,
//! paged lists) and the check every change of state goes through.

use betang_proto::v1::{Application, NetworkAttachment, PlacementRequest, VmUsage, Vps, VpsSpec};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{
    auth::Scope,
    error::{ApiError, StoreError},
    ids::{HostId, VpsId},
    lifecycle::{DesiredPower, VpsState},
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
    pub institution_id: Option<String>,
    pub application: Application,
    pub requested_by: String,
    pub decided_by: String,
    pub placement: PlacementRequest,
    /// SHA-256 of the base image its disk was built on ("" before digests
    /// were kept): a move goes only to a host holding the same content.
    pub image_digest: String,
    /// While MIGRATING: the host it moves to, whose capacity it also holds.
    pub move_target: Option<HostId>,
    /// When its build clock started (placement), pushed back by the time its
    /// host was down.
    pub build_since_ms: i64,
    /// Since when its guest has not answered its host (0: it answers).
    pub unresponsive_since_ms: i64,
    /// Its address on a Betang network, once placed.
    pub attachment: Option<NetworkAttachment>,
}

pub(super) const COLS: &str =
    "seq, id, request_id, name, vcpus, memory_mib, disk_gib, image, ssh_public_key,
    user_data, state, state_reason, desired_power, host_id, generation, applied_generation,
    observed_power, stop_timeout_s, force_stop, cleanup_pending, attempts, created_at_ms,
    updated_at_ms, cpu_rate, cpu_time_ns, mem_max_bytes, mem_used_bytes, disk_read_bytes,
    disk_write_bytes, net_rx_bytes, net_tx_bytes, usage_at_ms, mem_rss_bytes,
    institution_id, app_name, app_kind, app_purpose, app_domain, resp_name, resp_nip,
    resp_email, resp_phone, requested_by, decided_by, zone, host_labels, anti_affinity_group,
    image_digest, move_target, build_since_ms, unresponsive_since_ms, network";

pub(super) fn corrupt(what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(StoreError::Corrupt(format!("{what}: {v}"))))
}

fn host_column(h: Option<String>) -> rusqlite::Result<Option<HostId>> {
    h.map(|h| HostId::parse(&h).map_err(|_| corrupt("host id", &h)))
        .transpose()
}

pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<VpsRecord> {
    let id: String = r.get(1)?;
    let state: String = r.get(10)?;
    let desired: String = r.get(12)?;
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
            network: r.get(51)?,
        },
        state: VpsState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        state_reason: r.get(11)?,
        desired: DesiredPower::parse(&desired).ok_or_else(|| corrupt("desired", &desired))?,
        host_id: host_column(r.get(13)?)?,
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
            // Packet and request counters go to Prometheus, not the store.
            ..VmUsage::default()
        },
        institution_id: r.get(33)?,
        application: Application {
            name: r.get(34)?,
            kind: r.get(35)?,
            purpose: r.get(36)?,
            domain: r.get(37)?,
            responsible_name: r.get(38)?,
            responsible_nip: r.get(39)?,
            responsible_email: r.get(40)?,
            responsible_phone: r.get(41)?,
        },
        requested_by: r.get(42)?,
        decided_by: r.get(43)?,
        placement: PlacementRequest {
            zone: r.get(44)?,
            host_labels: serde_json::from_str(&r.get::<_, String>(45)?).unwrap_or_default(),
            anti_affinity_group: r.get(46)?,
        },
        image_digest: r.get("image_digest")?,
        move_target: host_column(r.get("move_target")?)?,
        build_since_ms: r.get("build_since_ms")?,
        unresponsive_since_ms: r.get(50)?,
        attachment: None,
    })
}

impl VpsRecord {
    pub fn to_proto(&self) -> Vps {
        Vps {
            id: self.id.to_string(),
            spec: Some(self.spec.clone()),
            state: self.state.to_proto() as i32,
            state_reason: self.state_reason.clone(),
            history: Vec::new(),
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
            // Stored as "<institution>/<request id>" so that institutions
            // cannot collide with (or detect) each other's request ids.
            request_id: self
                .request_id
                .split_once('/')
                .map_or(self.request_id.as_str(), |(_, r)| r)
                .to_owned(),
            institution_id: self.institution_id.clone().unwrap_or_default(),
            application: Some(self.application.clone()),
            requested_by: self.requested_by.clone(),
            decided_by: self.decided_by.clone(),
            placement: Some(self.placement.clone()),
            image_digest: self.image_digest.clone(),
            power_change: match (self.state, self.desired) {
                (VpsState::Running, DesiredPower::Stopped) => "stopping".into(),
                (VpsState::Stopped, DesiredPower::Running) => "starting".into(),
                _ => String::new(),
            },
            move_target: self
                .move_target
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_default(),
            // Only a guest that should be running can be hung.
            unresponsive_since_ms: if self.state == VpsState::Running {
                self.unresponsive_since_ms
            } else {
                0
            },
            attachment: self.attachment.clone(),
        }
    }

    pub(in crate::store) fn institution(&self) -> &str {
        self.institution_id.as_deref().unwrap_or("")
    }
}

/// A VPS the caller may see; any other is simply not found.
pub fn get(c: &Connection, id: &VpsId, scope: &Scope) -> Result<VpsRecord, ApiError> {
    let v = get_any(c, id)?;
    if scope.sees(v.institution_id.as_deref()) {
        Ok(v)
    } else {
        Err(ApiError::VpsNotFound(id.to_string()))
    }
}

/// For the dispatcher, which acts for no caller.
pub fn get_any(c: &Connection, id: &VpsId) -> Result<VpsRecord, ApiError> {
    let mut v = c
        .prepare_cached(&format!("SELECT {COLS} FROM vps WHERE id = ?1"))?
        .query_row([id.to_string()], from_row)
        .optional()?
        .ok_or_else(|| ApiError::VpsNotFound(id.to_string()))?;
    v.attachment = crate::store::networks::attachment(c, &v.id)?;
    Ok(v)
}

pub(super) fn by_request(c: &Connection, request_id: &str) -> Result<Option<VpsRecord>, ApiError> {
    Ok(
        c.prepare_cached(&format!("SELECT {COLS} FROM vps WHERE request_id = ?1"))?
            .query_row([request_id], from_row)
            .optional()?,
    )
}

pub struct ListFilter {
    pub host_id: String,
    pub after_seq: i64,
    pub limit: u32,
    pub include_deleted: bool,
    pub institution_id: String,
    pub state: Option<VpsState>,
}

pub fn list(c: &Connection, scope: &Scope, f: &ListFilter) -> Result<Vec<VpsRecord>, ApiError> {
    let institution = match scope {
        Scope::All => f.institution_id.as_str(),
        Scope::Institution(mine) => mine.as_str(),
    };
    let sql = format!(
        "SELECT {COLS} FROM vps WHERE seq > ?1
             AND (?2 OR state NOT IN ('DELETED', 'REJECTED', 'CANCELLED'))
             AND (?3 = '' OR institution_id = ?3)
             AND (?4 = '' OR state = ?4)
             AND (?6 = '' OR host_id = ?6)
         ORDER BY seq LIMIT ?5"
    );
    let mut q = c.prepare_cached(&sql)?;
    let state = f.state.map(VpsState::as_str).unwrap_or("");
    let rows = q.query_map(
        params![
            f.after_seq,
            f.include_deleted || f.state.is_some(),
            institution,
            state,
            f.limit,
            f.host_id
        ],
        from_row,
    )?;
    let mut out: Vec<VpsRecord> = rows.collect::<Result<_, _>>()?;
    for v in &mut out {
        v.attachment = crate::store::networks::attachment(c, &v.id)?;
    }
    Ok(out)
}

pub(in crate::store) fn transition(
    v: &VpsRecord,
    next: VpsState,
    action: &'static str,
) -> Result<(), ApiError> {
    check_transition(&v.id, v.state, next, action)
}

pub(super) fn check_transition(
    id: &VpsId,
    state: VpsState,
    next: VpsState,
    action: &'static str,
) -> Result<(), ApiError> {
    if state != next && !state.can_become(next) {
        return Err(ApiError::WrongState {
            id: id.to_string(),
            state: state.as_str(),
            action,
        });
    }
    Ok(())
}
