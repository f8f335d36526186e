//! Institutions, users, tokens, quotas and the audit trail.

use betang_proto::v1::{AuditRecord, Institution, Quota, QuotaChange, Token, User};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{
    auth::{self, Caller, Role},
    error::ApiError,
    scheduler::Resources,
};

fn new_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

/// Writes one audit record. Called inside the transaction of the change it
/// records, so a change and its record land together or not at all.
pub fn audit(
    c: &Connection,
    actor: &Caller,
    institution_id: &str,
    action: &str,
    target: &str,
    result: &str,
    now_ms: i64,
) -> Result<(), ApiError> {
    c.prepare_cached("INSERT INTO audit (at_ms, actor_user_id, actor_username, institution_id, action, target, result)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?.execute(params![now_ms, actor.user_id, actor.username, institution_id, action, target, result],)?;
    Ok(())
}

#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub institution_id: String,
    pub actor_user_id: String,
    pub action: String,
    pub target: String,
    pub since_ms: i64,
    pub until_ms: i64,
    pub after_id: i64,
    pub limit: u32,
}

/// Records matching every filter given. The actor is a user id or a
/// username; an action is matched whole (`vps.stop`), or as a family: a
/// first word alone or anything ending in a dot (`vps`, `vps.` and
/// `vps.console.` match every action that begins so).
pub fn list_audit(c: &Connection, f: &AuditFilter) -> Result<Vec<AuditRecord>, ApiError> {
    let family = f.action.trim_end_matches('.');
    let action_prefix = f.action.ends_with('.') || !family.contains('.');
    let action = if action_prefix {
        format!("{family}.")
    } else {
        f.action.clone()
    };
    let mut q = c.prepare_cached(
        "SELECT id, at_ms, actor_user_id, actor_username, institution_id, action, target, result
         FROM audit
         WHERE id > ?1
           AND (?2 = '' OR institution_id = ?2)
           AND (?3 = '' OR actor_user_id = ?3 OR actor_username = ?3)
           AND (?4 = '' OR (?5 AND substr(action, 1, length(?4)) = ?4) OR (NOT ?5 AND action = ?4))
           AND (?6 = '' OR target = ?6)
           AND (?7 = 0 OR at_ms >= ?7)
           AND (?8 = 0 OR at_ms < ?8)
         ORDER BY id LIMIT ?9",
    )?;
    let rows = q.query_map(
        params![
            f.after_id,
            f.institution_id,
            f.actor_user_id,
            if f.action.is_empty() {
                ""
            } else {
                action.as_str()
            },
            action_prefix,
            f.target,
            f.since_ms,
            f.until_ms,
            f.limit
        ],
        |r| {
            Ok(AuditRecord {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                actor_user_id: r.get(2)?,
                actor_username: r.get(3)?,
                institution_id: r.get(4)?,
                action: r.get(5)?,
                target: r.get(6)?,
                result: r.get(7)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The caller behind a token secret, if the token is known, unexpired and not revoked.
pub fn caller_for_secret(c: &Connection, secret: &str, now_ms: i64) -> Result<Caller, ApiError> {
    caller_for_hash(c, &auth::hash_secret(secret), now_ms).map(|(caller, _)| caller)
}

/// The caller and when their token expires (0: never).
pub fn caller_for_hash(c: &Connection, hash: &str, now_ms: i64) -> Result<(Caller, i64), ApiError> {
    let row = c
        .prepare_cached(
            "SELECT u.id, u.username, u.institution_id, u.role, t.expires_at_ms, t.revoked_at_ms,
                    u.disabled_at_ms + COALESCE(i.disabled_at_ms, 0)
             FROM tokens t JOIN users u ON u.id = t.user_id
                  LEFT JOIN institutions i ON i.id = u.institution_id
             WHERE t.secret_sha256 = ?1",
        )?
        .query_row([hash], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .optional()?;
    let denied = || ApiError::Unauthenticated("the token is unknown, expired or revoked".into());
    let (user_id, username, institution_id, role, expires, revoked, disabled) =
        row.ok_or_else(denied)?;
    if revoked != 0 || (expires != 0 && expires <= now_ms) {
        return Err(denied());
    }
    if disabled != 0 {
        return Err(ApiError::Unauthenticated(
            "this account is disabled; ask the data center".into(),
        ));
    }
    let caller = Caller {
        user_id,
        username,
        institution_id,
        role: Role::parse(&role).ok_or_else(denied)?,
    };
    Ok((caller, expires))
}

fn check_text(field: &'static str, v: &str, max: usize, required: bool) -> Result<(), ApiError> {
    if required && v.trim().is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    if v.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_slug(field: &'static str, v: &str, first_letter: bool) -> Result<(), ApiError> {
    let ok = (2..=32).contains(&v.len())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
        && v.starts_with(|c: char| c.is_ascii_lowercase() || (!first_letter && c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "{v:?} must be 2 to 32 characters of a-z, 0-9, '-', '.', '_', starting with a letter"
            ),
        ))
    }
}

fn institution_row(r: &Row<'_>) -> rusqlite::Result<Institution> {
    Ok(Institution {
        id: r.get(0)?,
        code: r.get(1)?,
        name: r.get(2)?,
        contact_name: r.get(3)?,
        contact_email: r.get(4)?,
        contact_phone: r.get(5)?,
        quota: Some(Quota {
            vcpus: r.get::<_, i64>(6)? as u32,
            memory_mib: r.get::<_, i64>(7)? as u64,
            disk_gib: r.get::<_, i64>(8)? as u64,
            vps_count: r.get::<_, i64>(9)? as u32,
        }),
        used: None,
        created_at_ms: r.get(10)?,
        disabled_at_ms: r.get(11)?,
    })
}

const INSTITUTION_COLS: &str = "id, code, name, contact_name, contact_email, contact_phone,
    quota_vcpus, quota_memory_mib, quota_disk_gib, quota_vps, created_at_ms, disabled_at_ms";

/// vCPUs, memory, disk and VPS count, in that order.
fn usage_row(r: &Row<'_>) -> rusqlite::Result<Quota> {
    quota_at(r, 0)
}

/// The same four, from column `first` on.
fn quota_at(r: &Row<'_>, first: usize) -> rusqlite::Result<Quota> {
    let n = |i: usize| r.get::<_, i64>(first + i);
    Ok(Quota {
        vcpus: n(0)? as u32,
        memory_mib: n(1)? as u64,
        disk_gib: n(2)? as u64,
        vps_count: n(3)? as u32,
    })
}

pub fn used(c: &Connection, institution_id: &str) -> Result<Quota, ApiError> {
    // Kept by triggers (store/totals.rs) over the states that hold quota.
    Ok(c.prepare_cached(
        "SELECT vcpus, memory_mib, disk_gib, vps_count FROM institution_usage
             WHERE institution_id = ?1",
    )?
    .query_row([institution_id], usage_row)
    .optional()?
    .unwrap_or_default())
}

/// The same figures summed from every VPS: what the triggers must agree with.
#[cfg(test)]
pub fn used_by_sum(c: &Connection, institution_id: &str) -> Result<Quota, ApiError> {
    let quota_states = super::totals::states_where(crate::lifecycle::VpsState::holds_quota);
    Ok(c.prepare_cached(&format!(
        "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0),
                    COALESCE(SUM(disk_gib), 0), COUNT(*)
             FROM vps WHERE institution_id = ?1 AND state IN {quota_states}"
    ))?
    .query_row([institution_id], usage_row)?)
}

/// Refuses `add` when it would take the institution over any limit, naming
/// the limit and by how much. Run inside the transaction that then claims it.
pub fn check_quota(
    c: &Connection,
    institution_id: &str,
    add: Resources,
    add_vps: u64,
) -> Result<(), ApiError> {
    // The limits and what is in use, in one look-up: this runs for every
    // placement.
    let (code, quota, used) = c
        .prepare_cached(
            "SELECT i.code, i.quota_vcpus, i.quota_memory_mib, i.quota_disk_gib, i.quota_vps,
                    COALESCE(u.vcpus, 0), COALESCE(u.memory_mib, 0), COALESCE(u.disk_gib, 0),
                    COALESCE(u.vps_count, 0)
             FROM institutions i LEFT JOIN institution_usage u ON u.institution_id = i.id
             WHERE i.id = ?1",
        )?
        .query_row([institution_id], |r| {
            Ok((r.get::<_, String>(0)?, quota_at(r, 1)?, quota_at(r, 5)?))
        })
        .optional()?
        .ok_or_else(|| ApiError::NotFound {
            what: "institution",
            id: institution_id.to_owned(),
        })?;
    let checks = [
        (
            "vcpus",
            u64::from(used.vcpus),
            add.vcpus,
            u64::from(quota.vcpus),
            "",
        ),
        (
            "memory_mib",
            used.memory_mib,
            add.memory_mib,
            quota.memory_mib,
            " MiB",
        ),
        (
            "disk_gib",
            used.disk_gib,
            add.disk_gib,
            quota.disk_gib,
            " GiB",
        ),
        (
            "vps_count",
            u64::from(used.vps_count),
            add_vps,
            u64::from(quota.vps_count),
            "",
        ),
    ];
    for (name, used, add, limit, unit) in checks {
        let total = used.saturating_add(add);
        // Shrinking or keeping a resource never trips its limit, even when an
        // operator has since lowered the quota below what is in use.
        if add > 0 && total > limit {
            return Err(ApiError::QuotaExceeded(crate::error::QuotaExcess {
                limit_name: name,
                institution_code: code,
                used,
                asked: add,
                limit,
                unit,
            }));
        }
    }
    Ok(())
}

pub fn institution_exists(c: &Connection, id: &str) -> Result<bool, ApiError> {
    Ok(
        c.prepare_cached("SELECT EXISTS (SELECT 1 FROM institutions WHERE id = ?1)")?
            .query_row([id], |r| r.get(0))?,
    )
}

pub fn get_institution(c: &Connection, id: &str) -> Result<Institution, ApiError> {
    let mut inst = c
        .prepare_cached(&format!(
            "SELECT {INSTITUTION_COLS} FROM institutions WHERE id = ?1"
        ))?
        .query_row([id], institution_row)
        .optional()?
        .ok_or_else(|| ApiError::NotFound {
            what: "institution",
            id: id.to_owned(),
        })?;
    inst.used = Some(used(c, id)?);
    Ok(inst)
}

pub fn list_institutions(c: &Connection) -> Result<Vec<Institution>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT {INSTITUTION_COLS} FROM institutions ORDER BY code"
    ))?;
    let mut out: Vec<Institution> = q
        .query_map([], institution_row)?
        .collect::<Result<_, _>>()?;
    for i in &mut out {
        i.used = Some(used(c, &i.id)?);
    }
    Ok(out)
}

pub struct NewInstitution {
    pub code: String,
    pub name: String,
    pub contact_name: String,
    pub contact_email: String,
    pub contact_phone: String,
    pub quota: Quota,
}

fn insert_institution(c: &Connection, n: &NewInstitution, now_ms: i64) -> Result<String, ApiError> {
    check_slug("code", &n.code, false)?;
    check_text("name", &n.name, 200, true)?;
    check_text("contact_name", &n.contact_name, 200, false)?;
    check_text("contact_email", &n.contact_email, 200, false)?;
    check_text("contact_phone", &n.contact_phone, 40, false)?;
    let exists: bool = c
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM institutions WHERE code = ?1)")?
        .query_row([&n.code], |r| r.get(0))?;
    if exists {
        return Err(ApiError::AlreadyExists(format!(
            "code: an institution with code {:?} exists",
            n.code
        )));
    }
    let id = new_id();
    c.prepare_cached(&format!("INSERT INTO institutions ({INSTITUTION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0)"))?.execute(params![
            id,
            n.code,
            n.name,
            n.contact_name,
            n.contact_email,
            n.contact_phone,
            n.quota.vcpus,
            n.quota.memory_mib as i64,
            n.quota.disk_gib as i64,
            n.quota.vps_count,
            now_ms
        ],)?;
    Ok(id)
}

pub fn create_institution(
    c: &mut Connection,
    actor: &Caller,
    n: &NewInstitution,
    now_ms: i64,
) -> Result<Institution, ApiError> {
    let tx = c.savepoint()?;
    let id = insert_institution(&tx, n, now_ms)?;
    audit(
        &tx,
        actor,
        &id,
        "institution.create",
        &n.code,
        "created",
        now_ms,
    )?;
    let inst = get_institution(&tx, &id)?;
    tx.commit()?;
    Ok(inst)
}

/// The id of an institution named by its id or by its code.
pub fn institution_id_of(c: &Connection, id_or_code: &str) -> Result<String, ApiError> {
    c.prepare_cached(
        "SELECT id FROM institutions WHERE id = ?1 OR code = ?1 ORDER BY id = ?1 DESC",
    )?
    .query_row([id_or_code], |r| r.get(0))
    .optional()?
    .ok_or_else(|| ApiError::NotFound {
        what: "institution",
        id: id_or_code.to_owned(),
    })
}

/// A change that sets every limit: the whole quota.
pub fn whole(q: &Quota) -> QuotaChange {
    QuotaChange {
        vcpus: Some(q.vcpus),
        memory_mib: Some(q.memory_mib),
        disk_gib: Some(q.disk_gib),
        vps_count: Some(q.vps_count),
    }
}

/// Sets the limits named in `change`; the others keep their value.
pub fn set_quota(
    c: &mut Connection,
    actor: &Caller,
    id: &str,
    change: &QuotaChange,
    now_ms: i64,
) -> Result<Institution, ApiError> {
    let tx = c.savepoint()?;
    let old = get_institution(&tx, id)?.quota.unwrap_or_default();
    let q = Quota {
        vcpus: change.vcpus.unwrap_or(old.vcpus),
        memory_mib: change.memory_mib.unwrap_or(old.memory_mib),
        disk_gib: change.disk_gib.unwrap_or(old.disk_gib),
        vps_count: change.vps_count.unwrap_or(old.vps_count),
    };
    tx.prepare_cached(
        "UPDATE institutions SET quota_vcpus = ?2, quota_memory_mib = ?3, quota_disk_gib = ?4,
             quota_vps = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id,
        q.vcpus,
        q.memory_mib as i64,
        q.disk_gib as i64,
        q.vps_count
    ])?;
    let result = format!(
        "{} vCPU, {} MiB, {} GiB, {} VPS",
        q.vcpus, q.memory_mib, q.disk_gib, q.vps_count
    );
    audit(&tx, actor, id, "institution.set_quota", id, &result, now_ms)?;
    let inst = get_institution(&tx, id)?;
    tx.commit()?;
    Ok(inst)
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    let role: String = r.get(5)?;
    Ok(User {
        id: r.get(0)?,
        username: r.get(1)?,
        full_name: r.get(2)?,
        email: r.get(3)?,
        institution_id: r.get(4)?,
        role: Role::parse(&role).map_or(0, |r| r.to_proto() as i32),
        created_at_ms: r.get(6)?,
        disabled_at_ms: r.get(7)?,
    })
}

const USER_COLS: &str =
    "id, username, full_name, email, institution_id, role, created_at_ms, disabled_at_ms";

/// Disables (or enables again) a user, found by id or username. Admins may
/// not disable themselves: someone must be left to enable them.
pub fn set_user_enabled(
    c: &mut Connection,
    actor: &Caller,
    id_or_name: &str,
    enabled: bool,
    now_ms: i64,
) -> Result<User, ApiError> {
    let tx = c.savepoint()?;
    let id = user_id_of(&tx, id_or_name)?;
    if !enabled && id == actor.user_id {
        return Err(ApiError::invalid("id", "you cannot disable yourself"));
    }
    let user = get_user(&tx, &id)?;
    tx.prepare_cached(
        "UPDATE users SET disabled_at_ms = CASE WHEN ?2 THEN 0 ELSE ?3 END WHERE id = ?1",
    )?
    .execute(params![id, enabled, now_ms])?;
    let action = if enabled {
        "user.enable"
    } else {
        "user.disable"
    };
    audit(
        &tx,
        actor,
        &user.institution_id,
        action,
        &id,
        &user.username,
        now_ms,
    )?;
    let user = get_user(&tx, &id)?;
    tx.commit()?;
    Ok(user)
}

/// Disables (or enables again) an institution, found by id or code: its
/// users' tokens stop working; its VPS are not touched.
pub fn set_institution_enabled(
    c: &mut Connection,
    actor: &Caller,
    id_or_code: &str,
    enabled: bool,
    now_ms: i64,
) -> Result<Institution, ApiError> {
    let tx = c.savepoint()?;
    let id = institution_id_of(&tx, id_or_code)?;
    if !enabled && id == actor.institution_id {
        return Err(ApiError::invalid(
            "id",
            "you cannot disable your own institution",
        ));
    }
    tx.prepare_cached(
        "UPDATE institutions SET disabled_at_ms = CASE WHEN ?2 THEN 0 ELSE ?3 END WHERE id = ?1",
    )?
    .execute(params![id, enabled, now_ms])?;
    let action = if enabled {
        "institution.enable"
    } else {
        "institution.disable"
    };
    audit(&tx, actor, &id, action, &id, "", now_ms)?;
    let inst = get_institution(&tx, &id)?;
    tx.commit()?;
    Ok(inst)
}

/// A user's id, named by id or by username.
pub fn user_id_of(c: &Connection, id_or_name: &str) -> Result<String, ApiError> {
    c.prepare_cached("SELECT id FROM users WHERE id = ?1 OR username = ?1")?
        .query_row([id_or_name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| ApiError::NotFound {
            what: "user",
            id: id_or_name.to_owned(),
        })
}

pub fn get_user(c: &Connection, id: &str) -> Result<User, ApiError> {
    c.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"))?
        .query_row([id], user_row)
        .optional()?
        .ok_or_else(|| ApiError::NotFound {
            what: "user",
            id: id.to_owned(),
        })
}

pub fn list_users(c: &Connection, institution_id: &str) -> Result<Vec<User>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT {USER_COLS} FROM users WHERE (?1 = '' OR institution_id = ?1) ORDER BY username"
    ))?;
    Ok(q.query_map([institution_id], user_row)?
        .collect::<Result<_, _>>()?)
}

pub struct NewUser {
    pub username: String,
    pub full_name: String,
    pub email: String,
    pub institution_id: String,
    pub role: Role,
}

fn insert_user(c: &Connection, n: &NewUser, now_ms: i64) -> Result<String, ApiError> {
    check_slug("username", &n.username, true)?;
    check_text("full_name", &n.full_name, 200, false)?;
    check_text("email", &n.email, 200, false)?;
    if !n.email.is_empty() && !n.email.contains('@') {
        return Err(ApiError::invalid("email", "must be an e-mail address"));
    }
    // Named by id or by code.
    let institution = institution_id_of(c, &n.institution_id).map_err(|_| {
        ApiError::invalid(
            "institution_id",
            format!("no institution {:?}", n.institution_id),
        )
    })?;
    let exists: bool = c
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM users WHERE username = ?1)")?
        .query_row([&n.username], |r| r.get(0))?;
    if exists {
        return Err(ApiError::AlreadyExists(format!(
            "username: {:?} is taken",
            n.username
        )));
    }
    let id = new_id();
    c.prepare_cached(&format!(
        "INSERT INTO users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)"
    ))?
    .execute(params![
        id,
        n.username,
        n.full_name,
        n.email,
        institution,
        n.role.as_str(),
        now_ms
    ])?;
    Ok(id)
}

pub fn create_user(
    c: &mut Connection,
    actor: &Caller,
    n: &NewUser,
    now_ms: i64,
) -> Result<User, ApiError> {
    let tx = c.savepoint()?;
    let id = insert_user(&tx, n, now_ms)?;
    let u = get_user(&tx, &id)?;
    let result = format!("{} as {}", n.username, n.role.as_str());
    audit(
        &tx,
        actor,
        &u.institution_id,
        "user.create",
        &id,
        &result,
        now_ms,
    )?;
    tx.commit()?;
    Ok(u)
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<Token> {
    Ok(Token {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        created_at_ms: r.get(3)?,
        expires_at_ms: r.get(4)?,
        revoked_at_ms: r.get(5)?,
        last_used_at_ms: r.get(6)?,
        last_used_from: r.get(7)?,
    })
}

const TOKEN_COLS: &str = "id, user_id, name, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms, last_used_from";

/// Records that the token with this secret hash was used, when and from
/// where. Not a change of who the caller is: the caller cache stays.
pub fn note_token_use(c: &Connection, hash: &str, from: &str, now_ms: i64) -> Result<(), ApiError> {
    c.prepare_cached(
        "UPDATE tokens SET last_used_at_ms = ?2, last_used_from = ?3 WHERE secret_sha256 = ?1",
    )?
    .execute(params![hash, now_ms, from])?;
    Ok(())
}

/// The longest a token may live unless the controller's
/// `max_token_lifetime_days` says otherwise: every token expires.
pub const DEFAULT_MAX_TOKEN_DAYS: u32 = 365;

/// A token's lifetime in seconds: `ttl_seconds`, or the longest allowed when
/// 0 is asked; more than the longest is refused.
fn token_ttl(ttl_seconds: u32, max_days: u32) -> Result<i64, ApiError> {
    let max = i64::from(max_days) * 86_400;
    match i64::from(ttl_seconds) {
        0 => Ok(max),
        t if t > max => Err(ApiError::invalid(
            "ttl_seconds",
            format!(
                "{t} is longer than the {max_days} days a token may live (max_token_lifetime_days)"
            ),
        )),
        t => Ok(t),
    }
}

fn insert_token(
    c: &Connection,
    user_id: &str,
    name: &str,
    ttl_seconds: u32,
    max_days: u32,
    now_ms: i64,
) -> Result<(Token, String), ApiError> {
    check_text("name", name, 100, false)?;
    let expires = now_ms + token_ttl(ttl_seconds, max_days)? * 1000;
    let secret = auth::new_secret()?;
    let id = format!("tok-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    c.prepare_cached(
        "INSERT INTO tokens (id, user_id, name, secret_sha256, created_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id,
        user_id,
        name,
        auth::hash_secret(&secret),
        now_ms,
        expires
    ])?;
    let t = c
        .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"))?
        .query_row([&id], token_row)?;
    Ok((t, secret))
}

#[allow(clippy::too_many_arguments)]
pub fn create_token(
    c: &mut Connection,
    actor: &Caller,
    user_id: &str,
    name: &str,
    ttl_seconds: u32,
    max_days: u32,
    now_ms: i64,
) -> Result<(Token, String), ApiError> {
    let tx = c.savepoint()?;
    let user = get_user(&tx, user_id)?;
    let (t, secret) = insert_token(&tx, user_id, name, ttl_seconds, max_days, now_ms)?;
    audit(
        &tx,
        actor,
        &user.institution_id,
        "token.create",
        &t.id,
        &format!("for {}", user.username),
        now_ms,
    )?;
    tx.commit()?;
    Ok((t, secret))
}

pub fn list_tokens(c: &Connection, user_id: &str) -> Result<Vec<Token>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT {TOKEN_COLS} FROM tokens WHERE (?1 = '' OR user_id = ?1) ORDER BY created_at_ms"
    ))?;
    Ok(q.query_map([user_id], token_row)?
        .collect::<Result<_, _>>()?)
}

/// Revokes a token. Only admins may revoke other users' tokens; anyone else
/// gets NotFound for a token that is not theirs.
pub fn revoke_token(
    c: &mut Connection,
    actor: &Caller,
    id: &str,
    now_ms: i64,
) -> Result<Token, ApiError> {
    let tx = c.savepoint()?;
    let not_found = || ApiError::NotFound {
        what: "token",
        id: id.to_owned(),
    };
    let t = tx
        .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"))?
        .query_row([id], token_row)
        .optional()?
        .ok_or_else(not_found)?;
    if t.user_id != actor.user_id && !auth::allowed(actor.role, auth::Permission::ManageAllTokens) {
        return Err(not_found());
    }
    if t.revoked_at_ms == 0 {
        tx.prepare_cached("UPDATE tokens SET revoked_at_ms = ?2 WHERE id = ?1")?
            .execute(params![id, now_ms])?;
        let owner = get_user(&tx, &t.user_id)?;
        audit(
            &tx,
            actor,
            &owner.institution_id,
            "token.revoke",
            id,
            "revoked",
            now_ms,
        )?;
    }
    let t = tx
        .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"))?
        .query_row([id], token_row)?;
    tx.commit()?;
    Ok(t)
}

/// The first admin: creates the data center's own institution and an admin
/// user if they do not exist, and a fresh token for that admin.
pub fn bootstrap_admin(
    c: &mut Connection,
    code: &str,
    institution_name: &str,
    username: &str,
    now_ms: i64,
) -> Result<(User, String), ApiError> {
    let tx = c.savepoint()?;
    let inst_id: Option<String> = tx
        .prepare_cached("SELECT id FROM institutions WHERE code = ?1")?
        .query_row([code], |r| r.get(0))
        .optional()?;
    let inst_id = match inst_id {
        Some(id) => id,
        None => insert_institution(
            &tx,
            &NewInstitution {
                code: code.into(),
                name: institution_name.into(),
                contact_name: String::new(),
                contact_email: String::new(),
                contact_phone: String::new(),
                quota: Quota::default(),
            },
            now_ms,
        )?,
    };
    let user_id: Option<String> = tx
        .prepare_cached("SELECT id FROM users WHERE username = ?1")?
        .query_row([username], |r| r.get(0))
        .optional()?;
    let user_id = match user_id {
        Some(id) => {
            let u = get_user(&tx, &id)?;
            if u.role != Role::Admin.to_proto() as i32 {
                return Err(ApiError::invalid(
                    "username",
                    format!("{username:?} exists and is not an admin"),
                ));
            }
            id
        }
        None => insert_user(
            &tx,
            &NewUser {
                username: username.into(),
                full_name: "Betang administrator".into(),
                email: String::new(),
                institution_id: inst_id.clone(),
                role: Role::Admin,
            },
            now_ms,
        )?,
    };
    // Running it again (a lost token) leaves one bootstrap token, not one
    // more each time.
    let revoked = tx
        .prepare_cached(
            "UPDATE tokens SET revoked_at_ms = ?2
             WHERE user_id = ?1 AND name = 'bootstrap' AND revoked_at_ms = 0",
        )?
        .execute(params![user_id, now_ms])?;
    let (t, secret) = insert_token(
        &tx,
        &user_id,
        "bootstrap",
        0,
        DEFAULT_MAX_TOKEN_DAYS,
        now_ms,
    )?;
    let system = Caller {
        user_id: "system".into(),
        username: "bootstrap".into(),
        institution_id: inst_id.clone(),
        role: Role::Admin,
    };
    audit(
        &tx,
        &system,
        &inst_id,
        "token.create",
        &t.id,
        &if revoked == 0 {
            format!("bootstrap for {username}")
        } else {
            format!("bootstrap for {username}; {revoked} earlier bootstrap token(s) revoked")
        },
        now_ms,
    )?;
    let u = get_user(&tx, &user_id)?;
    tx.commit()?;
    Ok((u, secret))
}
