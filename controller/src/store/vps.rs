//! VPS rows: requests, approval, creation with an atomic quota check and
//! placement claim, desired-state changes, and the outcomes the dispatcher
//! records. Every change made for a caller writes its audit record in the
//! same transaction.

use betang_proto::v1::{
    Application, PlacementRequest, PowerState, VmStatus, VmUsage, Vps, VpsSpec,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{
    auth::{Caller, Scope},
    error::{ApiError, StoreError},
    ids::{HostId, VpsId},
    lifecycle::{DesiredPower, VpsState},
    scheduler::{self, Demand, HostView, Policy, Ratios, Resources},
    store::{Db, host_index::HostIndex, hosts, identity},
    validation,
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
}

const COLS: &str = "seq, id, request_id, name, vcpus, memory_mib, disk_gib, image, ssh_public_key,
    user_data, state, state_reason, desired_power, host_id, generation, applied_generation,
    observed_power, stop_timeout_s, force_stop, cleanup_pending, attempts, created_at_ms,
    updated_at_ms, cpu_rate, cpu_time_ns, mem_max_bytes, mem_used_bytes, disk_read_bytes,
    disk_write_bytes, net_rx_bytes, net_tx_bytes, usage_at_ms, mem_rss_bytes,
    institution_id, app_name, app_kind, app_purpose, app_domain, resp_name, resp_nip,
    resp_email, resp_phone, requested_by, decided_by, zone, host_labels, anti_affinity_group,
    image_digest, move_target, build_since_ms";

fn corrupt(what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(StoreError::Corrupt(format!("{what}: {v}"))))
}

fn host_column(h: Option<String>) -> rusqlite::Result<Option<HostId>> {
    h.map(|h| HostId::parse(&h).map_err(|_| corrupt("host id", &h)))
        .transpose()
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<VpsRecord> {
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
            move_target: self
                .move_target
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_default(),
        }
    }

    pub(super) fn institution(&self) -> &str {
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
    c.prepare_cached(&format!("SELECT {COLS} FROM vps WHERE id = ?1"))?
        .query_row([id.to_string()], from_row)
        .optional()?
        .ok_or_else(|| ApiError::VpsNotFound(id.to_string()))
}

fn by_request(c: &Connection, request_id: &str) -> Result<Option<VpsRecord>, ApiError> {
    Ok(
        c.prepare_cached(&format!("SELECT {COLS} FROM vps WHERE request_id = ?1"))?
            .query_row([request_id], from_row)
            .optional()?,
    )
}

pub struct Placement {
    pub ratios: Ratios,
    pub policy: Policy,
    pub down_after_ms: i64,
}

fn demand(spec: &VpsSpec, wish: &PlacementRequest, institution: &str, digest: &str) -> Demand {
    Demand {
        need: need(spec),
        image: spec.image.clone(),
        image_version: if digest.is_empty() {
            String::new()
        } else {
            scheduler::image_key(&spec.image, digest)
        },
        zone: wish.zone.clone(),
        labels: wish.host_labels.clone().into_iter().collect(),
        // Groups belong to an institution: two institutions' "web" are unrelated.
        anti_affinity_group: if wish.anti_affinity_group.is_empty() {
            String::new()
        } else {
            format!("{institution}/{}", wish.anti_affinity_group)
        },
    }
}

fn no_such_image(name: &str) -> ApiError {
    ApiError::invalid(
        "image",
        format!("no image named {name:?} in the catalogue; see `betangctl image list`"),
    )
}

/// Picks a host for `spec` (or checks the pinned one) inside the caller's
/// transaction; the caller's UPDATE or INSERT of the VPS with that host is
/// the claim. The choice comes from the in-memory host index; unless the
/// index is known to agree with the rows, the chosen host is then judged
/// again from its rows in this transaction, so a stale index can cost a
/// retry but never a double booking. `digest`, when not empty, asks for a
/// host holding that version of the image (a VPS that already has a disk).
#[allow(clippy::too_many_arguments)]
pub(super) fn place(
    c: &Connection,
    index: &mut HostIndex,
    spec: &VpsSpec,
    wish: &PlacementRequest,
    institution: &str,
    digest: &str,
    target: Target<'_>,
    placement: &Placement,
    now_ms: i64,
) -> Result<HostId, ApiError> {
    let image =
        hosts::catalogue_image(c, &spec.image)?.ok_or_else(|| no_such_image(&spec.image))?;
    if spec.disk_gib < image.min_disk_gib {
        return Err(ApiError::invalid(
            "disk_gib",
            format!(
                "image {} needs a disk of at least {} GiB, {} GiB was asked",
                image.name, image.min_disk_gib, spec.disk_gib
            ),
        ));
    }
    let demand = demand(spec, wish, institution, digest);
    let (r, p, down) = (
        &placement.ratios,
        &placement.policy,
        placement.down_after_ms,
    );
    let judge = |views: &[HostView]| match target {
        Target::Elsewhere(away) => {
            let others: Vec<HostView> = views.iter().filter(|h| &h.id != away).cloned().collect();
            scheduler::place(&others, &demand, r, p)
        }
        _ => scheduler::place(views, &demand, r, p),
    };
    if let Target::Pinned(pin) = target {
        let Some(view) = hosts::view(c, pin, now_ms, down)? else {
            return Err(ApiError::invalid("host_id", format!("no host {pin}")));
        };
        return judge(&[view]).map_err(ApiError::NoHostFits);
    }
    let (views, in_step) = index.hosts_in_step(c, now_ms, down)?;
    let chosen = judge(views).map_err(ApiError::NoHostFits)?;
    // Judging the host again from its rows is needed only when the index may
    // be behind them; reading them is a tenth of the store's work per placement.
    if in_step || confirm(c, &chosen, &judge, placement, now_ms)? {
        return Ok(chosen);
    }
    tracing::warn!(host_id = %chosen, "host index was out of step with the store; reloading it");
    index.reload(c)?;
    judge(index.hosts(c, now_ms, down)?).map_err(ApiError::NoHostFits)
}

/// Where `place` may put a VPS.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Anywhere,
    /// Only on this host (an operator's choice).
    Pinned(&'a HostId),
    /// Anywhere but this host (a VPS moving off it).
    Elsewhere(&'a HostId),
}

impl<'a> Target<'a> {
    fn pinned(pin: Option<&'a HostId>) -> Self {
        pin.map_or(Target::Anywhere, Target::Pinned)
    }
}

/// The chosen host judged again from its own rows, inside the transaction
/// that will claim it.
fn confirm(
    c: &Connection,
    chosen: &HostId,
    judge: &dyn Fn(&[HostView]) -> Result<HostId, String>,
    placement: &Placement,
    now_ms: i64,
) -> Result<bool, ApiError> {
    Ok(hosts::view(c, chosen, now_ms, placement.down_after_ms)?
        .is_some_and(|v| judge(std::slice::from_ref(&v)).is_ok()))
}

fn need(spec: &VpsSpec) -> Resources {
    Resources {
        vcpus: spec.vcpus.into(),
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
    }
}

pub struct NewVps {
    pub request_id: String,
    pub spec: VpsSpec,
    pub application: Application,
    /// Required from operators; members always use their own.
    pub institution_id: String,
    pub pin: Option<HostId>,
    pub placement: PlacementRequest,
}

/// A member's request waits for approval; an operator's VPS is placed at
/// once, within its institution's quota. The same `request_id` again (from
/// the same institution) returns the first VPS.
pub fn create(
    db: &mut Db,
    actor: &Caller,
    n: &NewVps,
    placement: &Placement,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let staff = actor.is_staff();
    let institution = if staff {
        if n.institution_id.is_empty() {
            return Err(ApiError::invalid(
                "institution_id",
                "operators create a VPS for an institution: name it",
            ));
        }
        n.institution_id.clone()
    } else {
        if !n.institution_id.is_empty() && n.institution_id != actor.institution_id {
            return Err(ApiError::NotFound {
                what: "institution",
                id: n.institution_id.clone(),
            });
        }
        if n.pin.is_some() {
            return Err(ApiError::PermissionDenied(
                "only operators choose hosts".into(),
            ));
        }
        actor.institution_id.clone()
    };
    // Operators' institutions are looked up by the quota check.
    if !staff && !identity::institution_exists(&db.conn, &institution)? {
        return Err(ApiError::NotFound {
            what: "institution",
            id: institution.clone(),
        });
    }
    let tx = db.conn.savepoint()?;
    let scoped_request = format!("{institution}/{}", n.request_id);
    if let Some(existing) = by_request(&tx, &scoped_request)? {
        if existing.spec != n.spec || existing.application != n.application {
            return Err(ApiError::invalid(
                "request_id",
                format!(
                    "{:?} was already used for a different request (VPS {})",
                    n.request_id, existing.id
                ),
            ));
        }
        return Ok(existing);
    }
    let (state, host) = if staff {
        identity::check_quota(&tx, &institution, need(&n.spec), 1)?;
        let host = place(
            &tx,
            &mut db.hosts,
            &n.spec,
            &n.placement,
            &institution,
            "",
            Target::pinned(n.pin.as_ref()),
            placement,
            now_ms,
        )?;
        (VpsState::Scheduled, Some(host))
    } else {
        // Checked now so the member hears of a bad image at once, not after approval.
        if hosts::catalogue_image(&tx, &n.spec.image)?.is_none() {
            return Err(no_such_image(&n.spec.image));
        }
        (VpsState::PendingApproval, None)
    };
    let digest = match &host {
        Some(h) => hosts::image_digest(&tx, h, &n.spec.image)?,
        None => String::new(),
    };
    let id = VpsId::new();
    let a = &n.application;
    let decided_by = if staff { actor.username.as_str() } else { "" };
    // RETURNING gives the row as stored (its defaults included) without a
    // second look-up; no trigger on the insert changes the vps row itself.
    let rec = tx
        .prepare_cached(&format!(
            "INSERT INTO vps (id, request_id, name, vcpus, memory_mib, disk_gib, image, ssh_public_key,
                          user_data, state, desired_power, host_id, created_at_ms, updated_at_ms,
                          institution_id, app_name, app_kind, app_purpose, app_domain, resp_name,
                          resp_nip, resp_email, resp_phone, requested_by, decided_by, pinned_host,
                          zone, host_labels, anti_affinity_group, image_digest, build_since_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'running', ?11, ?12, ?12, ?13, ?14, ?15,
                 ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28,
                 CASE WHEN ?11 IS NULL THEN 0 ELSE ?12 END)
         RETURNING {COLS}"
        ))?
        .query_row(params![
        id.to_string(),
        scoped_request,
        n.spec.name,
        n.spec.vcpus,
        n.spec.memory_mib as i64,
        n.spec.disk_gib as i64,
        n.spec.image,
        n.spec.ssh_public_key,
        n.spec.user_data,
        state.as_str(),
        host.as_ref().map(|h| h.as_str().to_owned()),
        now_ms,
        institution,
        a.name,
        a.kind,
        a.purpose,
        a.domain,
        a.responsible_name,
        a.responsible_nip,
        a.responsible_email,
        a.responsible_phone,
        actor.username,
        decided_by,
        n.pin.as_ref().map(|h| h.as_str().to_owned()),
        n.placement.zone,
        serde_json::to_string(
            &n.placement
                .host_labels
                .iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        )
        .unwrap_or_else(|_| "{}".into()),
        n.placement.anti_affinity_group,
        digest,
    ], from_row)?;
    let (action, result) = match &host {
        Some(h) => ("vps.create", format!("SCHEDULED on {h}")),
        None => ("vps.request", "PENDING_APPROVAL".to_owned()),
    };
    identity::audit(
        &tx,
        actor,
        &institution,
        action,
        &id.to_string(),
        &result,
        now_ms,
    )?;
    tx.commit()?;
    Ok(rec)
}

pub struct Approval {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub pin: Option<HostId>,
}

impl Approval {
    /// `spec` with each size that was given (non-zero) replaced.
    fn applied_to(&self, spec: &VpsSpec) -> VpsSpec {
        let mut s = spec.clone();
        if self.vcpus > 0 {
            s.vcpus = self.vcpus;
        }
        if self.memory_mib > 0 {
            s.memory_mib = self.memory_mib;
        }
        if self.disk_gib > 0 {
            s.disk_gib = self.disk_gib;
        }
        s
    }
}

/// An operator approves a request, optionally resizing it or pinning a host:
/// quota check, placement and claim in one transaction.
pub fn approve(
    db: &mut Db,
    actor: &Caller,
    id: &VpsId,
    a: &Approval,
    placement: &Placement,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = db.conn.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    transition(&v, VpsState::Scheduled, "approve")?;
    let spec = a.applied_to(&v.spec);
    validation::spec(&spec)?;
    identity::check_quota(&tx, v.institution(), need(&spec), 1)?;
    let pin = a.pin.clone().or_else(|| {
        tx.prepare_cached("SELECT pinned_host FROM vps WHERE id = ?1")
            .ok()?
            .query_row([id.to_string()], |r| r.get::<_, Option<String>>(0))
            .ok()
            .flatten()
            .and_then(|h| HostId::parse(&h).ok())
    });
    let host = place(
        &tx,
        &mut db.hosts,
        &spec,
        &v.placement,
        v.institution(),
        "",
        Target::pinned(pin.as_ref()),
        placement,
        now_ms,
    )?;
    let digest = hosts::image_digest(&tx, &host, &spec.image)?;
    tx.prepare_cached(
        "UPDATE vps SET state = 'SCHEDULED', vcpus = ?2, memory_mib = ?3, disk_gib = ?4,
             host_id = ?5, decided_by = ?6, generation = generation + 1, updated_at_ms = ?7,
             state_reason = '', image_digest = ?8, build_since_ms = ?7
         WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        spec.vcpus,
        spec.memory_mib as i64,
        spec.disk_gib as i64,
        host.as_str(),
        actor.username,
        now_ms,
        digest
    ])?;
    let result = format!(
        "SCHEDULED on {host}: {} vCPU, {} MiB, {} GiB",
        spec.vcpus, spec.memory_mib, spec.disk_gib
    );
    identity::audit(
        &tx,
        actor,
        v.institution(),
        "vps.approve",
        &id.to_string(),
        &result,
        now_ms,
    )?;
    let rec = get_any(&tx, id)?;
    tx.commit()?;
    Ok(rec)
}

/// An operator rejects a request (with a reason the member sees), or its
/// member cancels it.
pub fn decide_against(
    c: &mut Connection,
    actor: &Caller,
    id: &VpsId,
    next: VpsState,
    reason: &str,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    let action = if next == VpsState::Rejected {
        "reject"
    } else {
        "cancel"
    };
    transition(&v, next, action)?;
    tx.prepare_cached(
        "UPDATE vps SET state = ?2, state_reason = ?3, decided_by = ?4, updated_at_ms = ?5
         WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        next.as_str(),
        reason,
        actor.username,
        now_ms
    ])?;
    identity::audit(
        &tx,
        actor,
        v.institution(),
        &format!("vps.{action}"),
        &id.to_string(),
        if reason.is_empty() {
            next.as_str()
        } else {
            reason
        },
        now_ms,
    )?;
    let rec = get_any(&tx, id)?;
    tx.commit()?;
    Ok(rec)
}

/// An operator resizes a stopped VPS: the growth must fit the institution's
/// quota and the VPS's own host, checked and claimed in one transaction.
pub fn resize(
    c: &mut Connection,
    actor: &Caller,
    id: &VpsId,
    size: &Approval,
    placement: &Placement,
    now_ms: i64,
) -> Result<VpsRecord, ApiError> {
    let tx = c.savepoint()?;
    let v = get(&tx, id, &actor.scope())?;
    if v.state != VpsState::Stopped {
        return Err(ApiError::WrongState {
            id: v.id.to_string(),
            state: v.state.as_str(),
            action: "resize (stop it first)",
        });
    }
    let spec = size.applied_to(&v.spec);
    if spec.disk_gib < v.spec.disk_gib {
        return Err(ApiError::invalid(
            "disk_gib",
            format!(
                "disks only grow: {} GiB is less than the {} GiB it has",
                spec.disk_gib, v.spec.disk_gib
            ),
        ));
    }
    validation::spec(&spec)?;
    let (old, new) = (need(&v.spec), need(&spec));
    let growth = Resources {
        vcpus: new.vcpus.saturating_sub(old.vcpus),
        memory_mib: new.memory_mib.saturating_sub(old.memory_mib),
        disk_gib: new.disk_gib.saturating_sub(old.disk_gib),
    };
    identity::check_quota(&tx, v.institution(), growth, 0)?;
    let host = v.host_id.clone().ok_or_else(|| ApiError::WrongState {
        id: v.id.to_string(),
        state: v.state.as_str(),
        action: "resize",
    })?;
    let mut views: Vec<HostView> = hosts::view(&tx, &host, now_ms, placement.down_after_ms)?
        .into_iter()
        .collect();
    for h in &mut views {
        // The VPS's own share is already counted; judge the new size alone.
        h.allocated.vcpus = h.allocated.vcpus.saturating_sub(old.vcpus);
        h.allocated.memory_mib = h.allocated.memory_mib.saturating_sub(old.memory_mib);
        h.allocated.disk_gib = h.allocated.disk_gib.saturating_sub(old.disk_gib);
        // Whether the host is up matters to the reconciler, not to the claim.
        h.up = true;
    }
    // The VPS stays where it is: only its size is judged.
    let demand = Demand {
        need: new,
        image: spec.image.clone(),
        ..Demand::default()
    };
    scheduler::place(&views, &demand, &placement.ratios, &placement.policy)
        .map_err(ApiError::NoHostFits)?;
    tx.prepare_cached(
        "UPDATE vps SET vcpus = ?2, memory_mib = ?3, disk_gib = ?4, generation = generation + 1,
             attempts = 0, next_attempt_ms = 0, updated_at_ms = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id.to_string(),
        spec.vcpus,
        spec.memory_mib as i64,
        spec.disk_gib as i64,
        now_ms
    ])?;
    let result = format!(
        "{} vCPU, {} MiB, {} GiB",
        spec.vcpus, spec.memory_mib, spec.disk_gib
    );
    identity::audit(
        &tx,
        actor,
        v.institution(),
        "vps.resize",
        &id.to_string(),
        &result,
        now_ms,
    )?;
    let rec = get_any(&tx, id)?;
    tx.commit()?;
    Ok(rec)
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
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn transition(
    v: &VpsRecord,
    next: VpsState,
    action: &'static str,
) -> Result<(), ApiError> {
    check_transition(&v.id, v.state, next, action)
}

fn check_transition(
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
    transition(&v, VpsState::Deleting, "delete")?;
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
pub fn deleted(c: &Connection, id: &VpsId, now_ms: i64) -> Result<(), ApiError> {
    c.prepare_cached(
        "UPDATE vps SET state = 'DELETED', observed_power = 'absent', updated_at_ms = ?2
         WHERE id = ?1 AND state = 'DELETING'",
    )?
    .execute(params![id.to_string(), now_ms])?;
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
