//! Requests and their decisions: a member's request or an operator's VPS
//! (quota check, placement and claim in one transaction), approval,
//! rejection or cancellation, and resizing a stopped VPS.

use betang_proto::v1::{Application, PlacementRequest, VpsSpec};
use rusqlite::{Connection, params};

use super::{
    placement::{Placement, Target, check_image_needs, need, place},
    rows::{COLS, VpsRecord, by_request, from_row, get, get_any, transition},
};
use crate::{
    auth::Caller,
    error::ApiError,
    ids::{HostId, VpsId},
    lifecycle::VpsState,
    scheduler::{self, Demand, HostView, Resources},
    store::{Db, hosts, identity, networks},
    validation,
};

pub struct NewVps {
    pub request_id: String,
    pub spec: VpsSpec,
    pub application: Application,
    /// Required from operators; members always use their own.
    pub institution_id: String,
    pub pin: Option<HostId>,
    pub placement: PlacementRequest,
    /// Operators only: this free address on the VPS's network.
    pub ip_address: String,
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
        // Named by id or by code.
        identity::institution_id_of(&db.conn, &n.institution_id).map_err(|_| {
            ApiError::invalid(
                "institution_id",
                format!("no institution {:?}", n.institution_id),
            )
        })?
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
    // Chosen (and checked) before the host, so its zone can steer the
    // placement; the address is taken once the row exists.
    let network = networks::choose(&tx, &institution, &n.spec.network)?;
    if !n.ip_address.is_empty() && (!staff || network.is_none()) {
        return Err(ApiError::invalid(
            "ip_address",
            "only operators choose an address, on a VPS with a network",
        ));
    }
    let (state, host) = if staff {
        identity::check_quota(&tx, &institution, need(&n.spec), 1)?;
        let wish = networks::steer(&n.placement, network.as_ref())?;
        let host = place(
            &tx,
            &mut db.hosts,
            &n.spec,
            &wish,
            &institution,
            "",
            Target::pinned(n.pin.as_ref()),
            placement,
            now_ms,
        )?;
        (VpsState::Scheduled, Some(host))
    } else {
        // Checked now so the member hears of a bad image at once, not after approval.
        check_image_needs(&tx, &n.spec)?;
        // Requests hold no quota: without a cap one member could fill the
        // store and the operators' queue.
        let waiting: u32 = tx
            .prepare_cached(
                "SELECT count(*) FROM vps WHERE institution_id = ?1 AND state = 'PENDING_APPROVAL'",
            )?
            .query_row([&institution], |r| r.get(0))?;
        if waiting >= placement.max_pending {
            return Err(ApiError::TooManyPending {
                institution: identity::get_institution(&tx, &institution)?.code,
                limit: placement.max_pending,
            });
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
                          zone, host_labels, anti_affinity_group, image_digest, build_since_ms,
                          network)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'running', ?11, ?12, ?12, ?13, ?14, ?15,
                 ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28,
                 CASE WHEN ?11 IS NULL THEN 0 ELSE ?12 END, ?29)
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
        n.spec.network,
    ], from_row)?;
    let rec = match (&host, &network) {
        (Some(_), Some(net)) => {
            networks::allocate(&tx, net, &id, &n.ip_address, now_ms)?;
            get_any(&tx, &id)?
        }
        _ => rec,
    };
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
    /// This free address on the VPS's network.
    pub ip_address: String,
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
    let network = networks::choose(&tx, v.institution(), &spec.network)?;
    if !a.ip_address.is_empty() && network.is_none() {
        return Err(ApiError::invalid(
            "ip_address",
            "this VPS has no network to take an address on",
        ));
    }
    let wish = networks::steer(&v.placement, network.as_ref())?;
    let host = place(
        &tx,
        &mut db.hosts,
        &spec,
        &wish,
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
    let address = match &network {
        Some(net) => {
            let held = networks::allocate(&tx, net, id, &a.ip_address, now_ms)?;
            format!(", {} on {}", held.ip_address, held.network)
        }
        None => String::new(),
    };
    let result = format!(
        "SCHEDULED on {host}: {} vCPU, {} MiB, {} GiB{address}",
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
