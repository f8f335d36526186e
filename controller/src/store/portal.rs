//! What the portal keeps: passwords (argon2id PHC strings, hashed and
//! checked off the store's thread), one-time invitations that set them,
//! and sign-ins, which are tokens of kind `portal`, so that a page is served
//! through the same caller, permissions and limits as a gRPC call.

use betang_proto::v1::User;
use rusqlite::{Connection, OptionalExtension, params};

use super::identity::{audit, get_user};
use crate::{
    auth::{self, Caller, Role},
    error::ApiError,
};

/// How long an invitation link may wait to be used.
pub const INVITATION_HOURS: i64 = 72;

/// A new one-time invitation for `user_id`; the secret is in the link only.
pub fn create_invitation(
    c: &mut Connection,
    actor: &Caller,
    user_id: &str,
    now_ms: i64,
) -> Result<(User, String), ApiError> {
    let tx = c.savepoint()?;
    let user = get_user(&tx, user_id)?;
    let secret = auth::new_secret()?;
    tx.prepare_cached(
        "INSERT INTO invitations (secret_sha256, user_id, created_by, created_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        auth::hash_secret(&secret),
        user.id,
        actor.user_id,
        now_ms,
        now_ms + INVITATION_HOURS * 3_600_000
    ])?;
    audit(
        &tx,
        actor,
        &user.institution_id,
        "user.invite",
        &user.id,
        &format!("for {}", user.username),
        now_ms,
    )?;
    tx.commit()?;
    Ok((user, secret))
}

/// The user an unused, unexpired invitation is for.
pub fn invited(c: &Connection, secret: &str, now_ms: i64) -> Result<User, ApiError> {
    let user_id: Option<String> = c
        .prepare_cached(
            "SELECT user_id FROM invitations
             WHERE secret_sha256 = ?1 AND used_at_ms = 0 AND expires_at_ms > ?2",
        )?
        .query_row(params![auth::hash_secret(secret), now_ms], |r| r.get(0))
        .optional()?;
    let id = user_id.ok_or_else(|| {
        ApiError::invalid(
            "invitation",
            "is unknown, used already or expired: ask for a new one",
        )
    })?;
    get_user(c, &id)
}

/// Sets the invited user's password (`phc`, hashed already) and uses the
/// invitation up; the user's other unused invitations go with it.
pub fn accept_invitation(
    c: &mut Connection,
    secret: &str,
    phc: &str,
    now_ms: i64,
) -> Result<User, ApiError> {
    let tx = c.savepoint()?;
    let user = invited(&tx, secret, now_ms)?;
    tx.prepare_cached(
        "UPDATE invitations SET used_at_ms = ?2 WHERE user_id = ?1 AND used_at_ms = 0",
    )?
    .execute(params![user.id, now_ms])?;
    tx.prepare_cached("UPDATE users SET password_phc = ?2 WHERE id = ?1")?
        .execute(params![user.id, phc])?;
    let me = caller_of(&user);
    audit(
        &tx,
        &me,
        &user.institution_id,
        "user.password.set",
        &user.id,
        "by invitation",
        now_ms,
    )?;
    tx.commit()?;
    Ok(user)
}

/// A user's id and password hash, by username: `None` when there is no such
/// user, it is disabled, or it has no password yet (all the same to a
/// sign-in, which must not tell them apart).
pub fn password_of(c: &Connection, username: &str) -> Result<Option<(String, String)>, ApiError> {
    Ok(c.prepare_cached(
        "SELECT u.id, u.password_phc FROM users u JOIN institutions i ON i.id = u.institution_id
         WHERE u.username = ?1 AND u.password_phc != '' AND u.disabled_at_ms = 0
           AND i.disabled_at_ms = 0",
    )?
    .query_row([username], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()?)
}

/// Changes the caller's own password (the old one was checked already).
pub fn change_password(
    c: &mut Connection,
    me: &Caller,
    phc: &str,
    now_ms: i64,
) -> Result<(), ApiError> {
    let tx = c.savepoint()?;
    tx.prepare_cached("UPDATE users SET password_phc = ?2 WHERE id = ?1")?
        .execute(params![me.user_id, phc])?;
    audit(
        &tx,
        me,
        &me.institution_id,
        "user.password.set",
        &me.user_id,
        "changed",
        now_ms,
    )?;
    tx.commit()?;
    Ok(())
}

/// A sign-in: a portal token for `user_id` that ends after `hours`.
pub fn sign_in(
    c: &mut Connection,
    user_id: &str,
    hours: i64,
    from: &str,
    now_ms: i64,
) -> Result<String, ApiError> {
    let tx = c.savepoint()?;
    let user = get_user(&tx, user_id)?;
    let secret = auth::new_secret()?;
    let id = format!("ses-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    tx.prepare_cached(
        "INSERT INTO tokens (id, user_id, name, secret_sha256, created_at_ms, expires_at_ms, kind)
         VALUES (?1, ?2, 'portal sign-in', ?3, ?4, ?5, 'portal')",
    )?
    .execute(params![
        id,
        user.id,
        auth::hash_secret(&secret),
        now_ms,
        now_ms + hours * 3_600_000
    ])?;
    audit(
        &tx,
        &caller_of(&user),
        &user.institution_id,
        "portal.sign_in",
        &user.id,
        from,
        now_ms,
    )?;
    tx.commit()?;
    Ok(secret)
}

/// Ends one sign-in, or (`everywhere`) all of the caller's.
pub fn sign_out(
    c: &mut Connection,
    me: &Caller,
    secret: &str,
    everywhere: bool,
    now_ms: i64,
) -> Result<usize, ApiError> {
    let tx = c.savepoint()?;
    let ended = tx
        .prepare_cached(
            "UPDATE tokens SET revoked_at_ms = ?3
             WHERE user_id = ?1 AND kind = 'portal' AND revoked_at_ms = 0
               AND (?4 OR secret_sha256 = ?2)",
        )?
        .execute(params![
            me.user_id,
            auth::hash_secret(secret),
            now_ms,
            everywhere
        ])?;
    let what = if everywhere { "everywhere" } else { "here" };
    audit(
        &tx,
        me,
        &me.institution_id,
        "portal.sign_out",
        &me.user_id,
        what,
        now_ms,
    )?;
    tx.commit()?;
    Ok(ended)
}

fn caller_of(u: &User) -> Caller {
    Caller {
        user_id: u.id.clone(),
        username: u.username.clone(),
        institution_id: u.institution_id.clone(),
        role: Role::from_proto(u.role).unwrap_or(Role::Member),
    }
}
