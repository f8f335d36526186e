//! The portal's handlers. Each signed-in page resolves its caller through
//! `Ctx::caller` (as a gRPC call would), calls a service method with the
//! same token, and renders what came back. Every POST carries the form's
//! CSRF token; a wrong one changes nothing.

use std::{net::SocketAddr, sync::Arc};

use askama::Template;
use axum::{
    Form,
    extract::{ConnectInfo, Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use betang_proto::v1::{
    Application, ApproveVpsRequest, CancelVpsRequest, CreateVpsRequest, DeleteVpsRequest,
    GetInstitutionRequest, GetVpsRequest, ListImagesRequest, ListInstitutionsRequest,
    ListVpsRequest, RebootVpsRequest, RejectVpsRequest, StartVpsRequest, StopVpsRequest, Vps,
    VpsSpec, VpsState, identity_service_server::IdentityService, vps_service_server::VpsService,
};
use serde::Deserialize;
use tonic::{Code, Status};

use super::{
    Lang, Portal,
    session::{self, FORM_COOKIE, LANG_COOKIE, SESSION_COOKIE},
    views::*,
};
use crate::{
    auth::{Caller, Permission},
    now_ms,
    store::portal as store,
};

type S = State<Arc<Portal>>;

/// The request sizes offered on the form: (value, vCPUs, MiB, GiB).
const SIZES: [(&str, u32, u64, u64); 4] = [
    ("xs", 1, 512, 10),
    ("s", 1, 1024, 20),
    ("m", 2, 4096, 40),
    ("l", 4, 8192, 80),
];

/// The standard for deciding a request: 2 × 24 hours.
const DECISION_STANDARD_MS: i64 = 48 * 3_600_000;

/// A signed-in visitor: their token, who they are, and their language.
pub(super) struct Visitor {
    secret: String,
    pub(super) caller: Caller,
    pub(super) lang: Lang,
}

impl Visitor {
    pub(super) fn frame(&self, here: &str) -> Frame {
        Frame {
            t: self.lang.texts(),
            csrf: session::csrf_for(&self.secret),
            username: self.caller.username.clone(),
            operator: crate::auth::allowed(self.caller.role, Permission::AllVps),
            admin: crate::auth::allowed(self.caller.role, Permission::ManageUsers),
            here: here.to_owned(),
        }
    }

    /// A service request as the visitor's token would make it over gRPC.
    pub(super) fn req<T>(&self, msg: T) -> tonic::Request<T> {
        with_token(&self.secret, msg)
    }
}

/// `msg` with `authorization: Bearer <secret>`, as a gRPC client sends it.
fn with_token<T>(secret: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {secret}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn lang_of(headers: &HeaderMap) -> Lang {
    Lang::from_cookie(session::cookie(headers, LANG_COOKIE))
}

pub(super) fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::X_FRAME_OPTIONS, "DENY"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; form-action 'self'; frame-ancestors 'none'",
                ),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "a portal page did not render");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn to_sign_in() -> Response {
    Redirect::to("/sign-in").into_response()
}

/// The signed-in visitor, or the way to the sign-in page.
pub(super) async fn visitor(p: &Portal, headers: &HeaderMap) -> Result<Visitor, Response> {
    let secret = session::cookie(headers, SESSION_COOKIE)
        .filter(|s| !s.is_empty())
        .ok_or_else(to_sign_in)?
        .to_owned();
    if !p.idle.touch(&secret) {
        return Err(to_sign_in());
    }
    let caller = p.ctx.caller(&with_token(&secret, ())).await.map_err(|e| {
        p.idle.end(&secret);
        match Status::from(e).code() {
            Code::Unauthenticated => to_sign_in(),
            _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    })?;
    Ok(Visitor {
        secret,
        caller,
        lang: lang_of(headers),
    })
}

/// A page for a refusal from a service, in the visitor's language, with the
/// service's own words as the detail.
pub(super) fn refusal(v: &Visitor, here: &str, s: &Status) -> Response {
    let t = v.lang.texts();
    let (code, headline) = match s.code() {
        Code::Unauthenticated => return to_sign_in(),
        Code::NotFound => (StatusCode::NOT_FOUND, t.error_not_found),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, t.error_forbidden),
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, t.error_invalid),
        Code::FailedPrecondition | Code::AlreadyExists => (StatusCode::CONFLICT, t.error_state),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, t.error_quota),
        _ => (StatusCode::SERVICE_UNAVAILABLE, t.error_unavailable),
    };
    // Not found is not found: nothing says whether it exists elsewhere.
    let detail = if s.code() == Code::NotFound {
        String::new()
    } else {
        s.message().to_owned()
    };
    let page = ErrorPage {
        f: v.frame(here),
        headline: headline.to_owned(),
        detail,
    };
    (code, render(&page)).into_response()
}

fn bad_form(v: &Visitor, here: &str) -> Response {
    let page = ErrorPage {
        f: v.frame(here),
        headline: v.lang.texts().error_csrf.to_owned(),
        detail: String::new(),
    };
    (StatusCode::FORBIDDEN, render(&page)).into_response()
}

fn csrf_ok(v: &Visitor, posted: &str) -> bool {
    session::same(posted, &session::csrf_for(&v.secret))
}

/// A form that only carries its CSRF token.
#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: String,
}

/// The signed-in visitor posting a form, once its CSRF token (`posted`) is
/// the session's; otherwise the page that says the form is not genuine
/// (with `here` for the language switch), and nothing is done.
pub(super) async fn poster(
    p: &Portal,
    headers: &HeaderMap,
    posted: &str,
    here: &str,
) -> Result<Visitor, Response> {
    let v = visitor(p, headers).await?;
    if csrf_ok(&v, posted) {
        Ok(v)
    } else {
        Err(bad_form(&v, here))
    }
}

pub async fn home() -> Redirect {
    Redirect::to("/vps")
}

pub async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../../assets/portal.css"),
    )
        .into_response()
}

pub async fn not_found(State(p): S, headers: HeaderMap) -> Response {
    let lang = lang_of(&headers);
    let username = match visitor(&p, &headers).await {
        Ok(v) => v.caller.username,
        Err(_) => String::new(),
    };
    let page = ErrorPage {
        f: Frame {
            t: lang.texts(),
            csrf: String::new(),
            username,
            operator: false,
            admin: false,
            here: "/vps".into(),
        },
        headline: lang.texts().error_not_found.to_owned(),
        detail: String::new(),
    };
    (StatusCode::NOT_FOUND, render(&page)).into_response()
}

#[derive(Deserialize)]
pub struct Back {
    #[serde(default)]
    back: String,
}

/// Switches the language and goes back to the page it was asked from.
pub async fn lang(State(p): S, Path(code): Path<String>, Query(q): Query<Back>) -> Response {
    let value = if code == "en" { "en" } else { "id" };
    let back = session::local_path(&q.back).unwrap_or("/vps").to_owned();
    let mut r = Redirect::to(&back).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(LANG_COOKIE, value, 365 * 86_400, p.secure),
    );
    r
}

/// A page for someone not signed in, with the form's own CSRF cookie.
fn anonymous(p: &Portal, headers: &HeaderMap, page: impl FnOnce(Frame) -> Response) -> Response {
    let token = match session::cookie(headers, FORM_COOKIE) {
        Some(t) if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) => t.to_owned(),
        _ => session::csrf_for(&uuid::Uuid::new_v4().to_string()),
    };
    let frame = Frame {
        t: lang_of(headers).texts(),
        csrf: token.clone(),
        username: String::new(),
        operator: false,
        admin: false,
        here: "/sign-in".into(),
    };
    let mut r = page(frame);
    r.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(FORM_COOKIE, &token, 3600, p.secure),
    );
    r
}

fn anonymous_form_ok(headers: &HeaderMap, posted: &str) -> bool {
    session::cookie(headers, FORM_COOKIE).is_some_and(|c| !c.is_empty() && session::same(c, posted))
}

#[derive(Deserialize)]
pub struct Notice {
    #[serde(default)]
    done: String,
}

pub async fn sign_in_form(State(p): S, headers: HeaderMap, Query(q): Query<Notice>) -> Response {
    let t = lang_of(&headers).texts();
    let notice = if q.done == "password" {
        t.invite_done.to_owned()
    } else {
        String::new()
    };
    anonymous(&p, &headers, |f| {
        render(&SignIn {
            f,
            error: String::new(),
            notice,
            username: String::new(),
        })
    })
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// An argon2id hash of nothing anyone types, checked when the user is
/// unknown, so that a wrong name takes as long as a wrong password.
fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("betang-decoy-password").unwrap_or_default())
}

fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn password_matches(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Hashing takes tens of milliseconds of a core: off the async threads,
/// the decoy's first hashing too. No hash (no such user) checks the decoy.
async fn check_password(password: String, phc: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        password_matches(&password, phc.as_deref().unwrap_or_else(|| decoy()))
    })
    .await
    .unwrap_or(false)
}

pub async fn sign_in(
    State(p): S,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let t = lang_of(&headers).texts();
    let again = |error: &'static str, username: String| {
        anonymous(&p, &headers, |f| {
            (
                StatusCode::UNAUTHORIZED,
                render(&SignIn {
                    f,
                    error: error.to_owned(),
                    notice: String::new(),
                    username,
                }),
            )
                .into_response()
        })
    };
    if !anonymous_form_ok(&headers, &form.csrf) {
        return again(t.error_csrf, form.username);
    }
    let address = session::client_address(&headers, from);
    let username = form.username.trim().to_owned();
    if !p.throttle.allows(&username, &address) {
        return again(t.sign_in_throttled, username);
    }
    let name = username.clone();
    let found = p.ctx.store.run(move |c| store::password_of(c, &name)).await;
    let (user_id, phc) = match found {
        Ok(Some((id, phc))) => (id, Some(phc)),
        Ok(None) => (String::new(), None),
        Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    let right = check_password(form.password, phc).await;
    if !right || user_id.is_empty() {
        p.throttle.failed(&username, &address);
        return again(t.sign_in_failed, username);
    }
    let now = now_ms();
    let secret = match p
        .ctx
        .store
        .run(move |c| store::sign_in(c, &user_id, session::SESSION_HOURS, &address, now))
        .await
    {
        Ok(s) => s,
        Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    p.idle.start(&secret);
    let mut r = Redirect::to("/vps").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(
            SESSION_COOKIE,
            &secret,
            session::SESSION_HOURS * 3600,
            p.secure,
        ),
    );
    r
}

#[derive(Deserialize)]
pub struct SignOutForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    everywhere: String,
}

pub async fn sign_out(State(p): S, headers: HeaderMap, Form(form): Form<SignOutForm>) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/vps").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (caller, secret, now) = (v.caller.clone(), v.secret.clone(), now_ms());
    let everywhere = !form.everywhere.is_empty();
    if let Err(e) = p
        .ctx
        .store
        .run(move |c| store::sign_out(c, &caller, &secret, everywhere, now))
        .await
    {
        return refusal(&v, "/vps", &e.into());
    }
    p.idle.end(&v.secret);
    let mut r = to_sign_in();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, "", 0, p.secure),
    );
    r
}

pub async fn invite_form(State(p): S, headers: HeaderMap, Path(secret): Path<String>) -> Response {
    let lookup = secret.clone();
    let user = p
        .ctx
        .store
        .run(move |c| store::invited(c, &lookup, now_ms()))
        .await;
    anonymous(&p, &headers, |f| match user {
        Ok(u) => render(&Invite {
            f,
            secret,
            for_user: u.username,
            error: String::new(),
        }),
        Err(_) => {
            let headline = f.t.error_not_found.to_owned();
            (
                StatusCode::NOT_FOUND,
                render(&ErrorPage {
                    f,
                    headline,
                    detail: String::new(),
                }),
            )
                .into_response()
        }
    })
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    old: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    again: String,
}

/// Why a new password is refused, in the reader's language.
fn weak(t: &'static super::i18n::Texts, form: &PasswordForm) -> Option<&'static str> {
    if form.password.chars().count() < 12 {
        Some(t.password_short)
    } else if form.password != form.again {
        Some(t.password_mismatch)
    } else {
        None
    }
}

pub async fn invite(
    State(p): S,
    headers: HeaderMap,
    Path(secret): Path<String>,
    Form(form): Form<PasswordForm>,
) -> Response {
    let t = lang_of(&headers).texts();
    let lookup = secret.clone();
    let user = match p
        .ctx
        .store
        .run(move |c| store::invited(c, &lookup, now_ms()))
        .await
    {
        Ok(u) => u,
        Err(_) => return invite_form(State(p), headers, Path(secret)).await,
    };
    let problem = if anonymous_form_ok(&headers, &form.csrf) {
        weak(t, &form)
    } else {
        Some(t.error_csrf)
    };
    if let Some(error) = problem {
        return anonymous(&p, &headers, |f| {
            (
                StatusCode::BAD_REQUEST,
                render(&Invite {
                    f,
                    secret,
                    for_user: user.username,
                    error: error.to_owned(),
                }),
            )
                .into_response()
        });
    }
    let Ok(Ok(phc)) = tokio::task::spawn_blocking(move || hash_password(&form.password)).await
    else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let now = now_ms();
    match p
        .ctx
        .store
        .run(move |c| store::accept_invitation(c, &secret, &phc, now))
        .await
    {
        Ok(_) => Redirect::to("/sign-in?done=password").into_response(),
        Err(_) => StatusCode::CONFLICT.into_response(),
    }
}

pub async fn password_form(State(p): S, headers: HeaderMap) -> Response {
    match visitor(&p, &headers).await {
        Ok(v) => render(&Password {
            f: v.frame("/password"),
            error: String::new(),
            notice: String::new(),
        }),
        Err(r) => r,
    }
}

pub async fn password(State(p): S, headers: HeaderMap, Form(form): Form<PasswordForm>) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/password").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let t = v.lang.texts();
    let name = v.caller.username.clone();
    let current = p.ctx.store.run(move |c| store::password_of(c, &name)).await;
    let right = match current {
        Ok(Some((_, phc))) => check_password(form.old.clone(), Some(phc)).await,
        _ => false,
    };
    let problem = if right {
        weak(t, &form)
    } else {
        Some(t.password_wrong)
    };
    if let Some(error) = problem {
        let page = Password {
            f: v.frame("/password"),
            error: error.to_owned(),
            notice: String::new(),
        };
        return (StatusCode::BAD_REQUEST, render(&page)).into_response();
    }
    let Ok(Ok(phc)) = tokio::task::spawn_blocking(move || hash_password(&form.password)).await
    else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (me, now) = (v.caller.clone(), now_ms());
    if let Err(e) = p
        .ctx
        .store
        .run(move |c| store::change_password(c, &me, &phc, now))
        .await
    {
        return refusal(&v, "/password", &e.into());
    }
    render(&Password {
        f: v.frame("/password"),
        error: String::new(),
        notice: t.password_changed.to_owned(),
    })
}

pub(super) fn size_text(lang: Lang, spec: Option<&VpsSpec>) -> String {
    spec.map_or_else(String::new, |s| {
        format!(
            "{} vCPU · {} MiB · {} GiB",
            s.vcpus,
            lang.number(s.memory_mib),
            lang.number(s.disk_gib)
        )
    })
}

pub(super) fn state_class(s: VpsState) -> &'static str {
    match s {
        VpsState::Running => "running",
        VpsState::PendingApproval
        | VpsState::Pending
        | VpsState::Scheduled
        | VpsState::Provisioning
        | VpsState::Migrating => "waiting",
        VpsState::Error | VpsState::Rejected | VpsState::Unknown => "bad",
        _ => "",
    }
}

/// Institutions' codes by id, for operators' lists (empty for anyone who
/// may not list institutions: their pages show only their own).
pub(super) async fn institution_codes(
    p: &Portal,
    v: &Visitor,
) -> std::collections::HashMap<String, String> {
    // Not asked for a member: the service would refuse it anyway.
    if !crate::auth::allowed(v.caller.role, Permission::ViewInstitutions) {
        return Default::default();
    }
    match p
        .identity
        .list_institutions(v.req(ListInstitutionsRequest::default()))
        .await
    {
        Ok(r) => r
            .into_inner()
            .institutions
            .into_iter()
            .map(|i| (i.id, i.code))
            .collect(),
        Err(_) => Default::default(),
    }
}

pub(super) fn code_of(codes: &std::collections::HashMap<String, String>, id: &str) -> String {
    codes.get(id).cloned().unwrap_or_else(|| id.to_owned())
}

pub(super) fn address_of(v: &Vps) -> String {
    v.attachment
        .as_ref()
        .map(|a| a.ip_address.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "—".into())
}

pub(super) fn name_of(v: &Vps) -> String {
    v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
}

#[derive(Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    page: String,
}

pub async fn vps_list(State(p): S, headers: HeaderMap, Query(q): Query<PageQuery>) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let listed = p
        .vps
        .list_vps(v.req(ListVpsRequest {
            page_size: 50,
            page_token: q.page,
            ..Default::default()
        }))
        .await;
    let page = match listed {
        Ok(r) => r.into_inner(),
        Err(s) => return refusal(&v, "/vps", &s),
    };
    let offset = p.ctx.cfg.portal_utc_offset_hours;
    let zone = p.ctx.cfg.portal_zone_name.clone();
    let codes = institution_codes(&p, &v).await;
    let rows = page
        .vps
        .iter()
        .map(|x| VpsRow {
            id: x.id.clone(),
            name: name_of(x),
            state: v.lang.state(x.state()).to_owned(),
            state_class: state_class(x.state()),
            address: address_of(x),
            size: size_text(v.lang, x.spec.as_ref()),
            institution: code_of(&codes, &x.institution_id),
            since: v.lang.moment(x.created_at_ms, offset, &zone),
        })
        .collect();
    // A member sees their institution's quota; operators see every
    // institution's VPS, and quotas on their own pages.
    let frame = v.frame("/vps");
    let quota = if frame.operator {
        Vec::new()
    } else {
        match p
            .identity
            .get_institution(v.req(GetInstitutionRequest {
                id: v.caller.institution_id.clone(),
            }))
            .await
        {
            Ok(i) => quota_bars(v.lang, &i.into_inner()),
            Err(s) => return refusal(&v, "/vps", &s),
        }
    };
    render(&VpsList {
        f: frame,
        rows,
        quota,
        next_page: page.next_page_token,
    })
}

pub(super) fn quota_bars(lang: Lang, inst: &betang_proto::v1::Institution) -> Vec<QuotaBar> {
    let (q, u) = (
        inst.quota.unwrap_or_default(),
        inst.used.unwrap_or_default(),
    );
    let t = lang.texts();
    let bar = |label, used: u64, limit: u64| QuotaBar {
        label,
        used: lang.number(used),
        limit: lang.number(limit),
        percent: (used.saturating_mul(100))
            .checked_div(limit)
            .unwrap_or(0)
            .min(100),
    };
    vec![
        bar(t.quota_vcpus, u64::from(u.vcpus), u64::from(q.vcpus)),
        bar(t.quota_memory, u.memory_mib, q.memory_mib),
        bar(t.quota_disk, u.disk_gib, q.disk_gib),
        bar(
            t.quota_count,
            u64::from(u.vps_count),
            u64::from(q.vps_count),
        ),
    ]
}

async fn new_form(p: &Portal, v: &Visitor, error: String) -> Response {
    let images = match p.vps.list_images(v.req(ListImagesRequest {})).await {
        Ok(r) => r.into_inner().images,
        Err(s) => return refusal(v, "/vps/new", &s),
    };
    let mut names: Vec<String> = images.into_iter().map(|i| i.name).collect();
    names.sort();
    names.dedup();
    let sizes = SIZES
        .iter()
        .map(|(value, vcpus, mib, gib)| Choice {
            value: (*value).to_owned(),
            label: format!(
                "{} vCPU · {} MiB · {} GiB",
                vcpus,
                v.lang.number(*mib),
                v.lang.number(*gib)
            ),
        })
        .collect();
    let page = VpsNew {
        f: v.frame("/vps/new"),
        request_id: uuid::Uuid::new_v4().to_string(),
        sizes,
        images: names
            .into_iter()
            .map(|n| Choice {
                value: n.clone(),
                label: n,
            })
            .collect(),
        error,
    };
    let code = if page.error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (code, render(&page)).into_response()
}

pub async fn vps_new(State(p): S, headers: HeaderMap) -> Response {
    match visitor(&p, &headers).await {
        Ok(v) => new_form(&p, &v, String::new()).await,
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub struct RequestForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    size: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    ssh_public_key: String,
    #[serde(default)]
    app_name: String,
    #[serde(default)]
    app_kind: String,
    #[serde(default)]
    app_purpose: String,
    #[serde(default)]
    app_domain: String,
    #[serde(default)]
    responsible_name: String,
    #[serde(default)]
    responsible_nip: String,
    #[serde(default)]
    responsible_email: String,
    #[serde(default)]
    responsible_phone: String,
}

pub async fn vps_create(
    State(p): S,
    headers: HeaderMap,
    Form(form): Form<RequestForm>,
) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/vps/new").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(&(_, vcpus, memory_mib, disk_gib)) = SIZES.iter().find(|s| s.0 == form.size) else {
        return new_form(&p, &v, format!("size: no size {:?}", form.size)).await;
    };
    let req = CreateVpsRequest {
        request_id: form.request_id,
        spec: Some(VpsSpec {
            name: form.name.trim().to_owned(),
            vcpus,
            memory_mib,
            disk_gib,
            image: form.image,
            ssh_public_key: form.ssh_public_key.trim().to_owned(),
            ..Default::default()
        }),
        application: Some(Application {
            name: form.app_name,
            kind: form.app_kind,
            purpose: form.app_purpose,
            domain: form.app_domain,
            responsible_name: form.responsible_name,
            responsible_nip: form.responsible_nip,
            responsible_email: form.responsible_email,
            responsible_phone: form.responsible_phone,
        }),
        institution_id: v.caller.institution_id.clone(),
        ..Default::default()
    };
    match p.vps.create_vps(v.req(req)).await {
        Ok(r) => Redirect::to(&format!("/vps/{}", r.into_inner().id)).into_response(),
        Err(s) if s.code() == Code::InvalidArgument || s.code() == Code::ResourceExhausted => {
            new_form(&p, &v, s.message().to_owned()).await
        }
        Err(s) => refusal(&v, "/vps/new", &s),
    }
}

/// What the visitor may ask of a VPS in this state: the service decides in
/// the end; this only leaves out buttons that could not work.
fn actions_for(t: &'static super::i18n::Texts, s: VpsState) -> Vec<Action> {
    let a = |name, label| Action { name, label };
    match s {
        VpsState::Running => vec![
            a("stop", t.action_stop),
            a("reboot", t.action_reboot),
            a("delete", t.action_delete),
        ],
        VpsState::Stopped => vec![a("start", t.action_start), a("delete", t.action_delete)],
        VpsState::Error | VpsState::Unknown => vec![a("delete", t.action_delete)],
        VpsState::PendingApproval => vec![a("cancel", t.action_cancel)],
        _ => Vec::new(),
    }
}

async fn fetch(p: &Portal, v: &Visitor, id: &str) -> Result<Vps, Response> {
    p.vps
        .get_vps(v.req(GetVpsRequest {
            id: id.to_owned(),
            ..Default::default()
        }))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| refusal(v, "/vps", &s))
}

pub async fn vps_show(State(p): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let x = match fetch(&p, &v, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let t = v.lang.texts();
    let (offset, zone) = (
        p.ctx.cfg.portal_utc_offset_hours,
        p.ctx.cfg.portal_zone_name.as_str(),
    );
    let mut facts = vec![
        Fact {
            label: t.col_size,
            value: size_text(v.lang, x.spec.as_ref()),
        },
        Fact {
            label: t.col_address,
            value: address_of(&x),
        },
        Fact {
            label: t.field_image,
            value: x.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
        },
        Fact {
            label: t.col_application,
            value: x
                .application
                .as_ref()
                .map(|a| format!("{} ({})", a.name, a.kind))
                .unwrap_or_default(),
        },
        Fact {
            label: t.col_requested_by,
            value: x.requested_by.clone(),
        },
    ];
    if x.state() == VpsState::PendingApproval {
        facts.push(Fact {
            label: t.vps_waiting,
            value: v.lang.moment(x.created_at_ms, offset, zone),
        });
    } else {
        facts.push(Fact {
            label: t.col_since,
            value: v.lang.moment(x.created_at_ms, offset, zone),
        });
    }
    if !x.decided_by.is_empty() {
        facts.push(Fact {
            label: t.vps_decided_by,
            value: x.decided_by.clone(),
        });
    }
    if !x.state_reason.is_empty() {
        facts.push(Fact {
            label: t.error_detail,
            value: x.state_reason.clone(),
        });
    }
    if let Some(u) = x.usage.as_ref().filter(|_| x.state() == VpsState::Running) {
        facts.push(Fact {
            label: t.vps_cpu,
            value: format!("{:.0}%", u.cpu_rate * 100.0),
        });
        if u.memory_used_bytes > 0 {
            facts.push(Fact {
                label: t.vps_memory_used,
                value: format!("{} MiB", v.lang.number(u.memory_used_bytes >> 20)),
            });
        }
    }
    let frame = v.frame(&format!("/vps/{id}"));
    let decide = frame.operator && x.state() == VpsState::PendingApproval;
    render(&VpsShow {
        f: frame,
        name: name_of(&x),
        state: v.lang.state(x.state()).to_owned(),
        state_class: state_class(x.state()),
        actions: actions_for(t, x.state()),
        facts,
        decide,
        id,
    })
}

fn label_of(t: &'static super::i18n::Texts, action: &str) -> Option<&'static str> {
    Some(match action {
        "start" => t.action_start,
        "stop" => t.action_stop,
        "reboot" => t.action_reboot,
        "delete" => t.action_delete,
        "cancel" => t.action_cancel,
        _ => return None,
    })
}

pub async fn confirm(
    State(p): S,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let t = v.lang.texts();
    let Some(label) = label_of(t, &action) else {
        return not_found(State(p), headers).await;
    };
    let x = match fetch(&p, &v, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let action = ["start", "stop", "reboot", "delete", "cancel"]
        .into_iter()
        .find(|a| *a == action)
        .unwrap_or("start");
    render(&Confirm {
        f: v.frame(&format!("/vps/{id}")),
        name: name_of(&x),
        id,
        action,
        label,
    })
}

#[derive(Deserialize)]
pub struct ActForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
    /// An approval's changes; empty: as asked.
    #[serde(default)]
    vcpus: String,
    #[serde(default)]
    memory_mib: String,
    #[serde(default)]
    disk_gib: String,
    #[serde(default)]
    host_id: String,
}

/// A number from a form, 0 when left empty (the service's "as asked").
fn optional_number<T: std::str::FromStr + Default>(
    field: &'static str,
    text: &str,
) -> Result<T, Status> {
    match text.trim() {
        "" => Ok(T::default()),
        t => t
            .parse()
            .map_err(|_| Status::invalid_argument(format!("{field}: {t:?} is not a whole number"))),
    }
}

/// A power action, a cancel, or an operator's decision, once confirmed.
pub async fn act(
    State(p): S,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActForm>,
) -> Response {
    let here = format!("/vps/{id}");
    let v = match poster(&p, &headers, &form.csrf, &here).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let vps = &p.vps;
    let i = id.clone();
    let done = match action.as_str() {
        "start" => vps.start_vps(v.req(StartVpsRequest { id: i })).await,
        "stop" => {
            vps.stop_vps(v.req(StopVpsRequest {
                id: i,
                ..Default::default()
            }))
            .await
        }
        "reboot" => {
            vps.reboot_vps(v.req(RebootVpsRequest {
                id: i,
                ..Default::default()
            }))
            .await
        }
        "delete" => vps.delete_vps(v.req(DeleteVpsRequest { id: i })).await,
        "cancel" => vps.cancel_vps(v.req(CancelVpsRequest { id: i })).await,
        "approve" => {
            let asked = (|| {
                Ok::<_, Status>(ApproveVpsRequest {
                    id: i,
                    vcpus: optional_number("vcpus", &form.vcpus)?,
                    memory_mib: optional_number("memory_mib", &form.memory_mib)?,
                    disk_gib: optional_number("disk_gib", &form.disk_gib)?,
                    host_id: form.host_id.trim().to_owned(),
                    ..Default::default()
                })
            })();
            match asked {
                Ok(a) => vps.approve_vps(v.req(a)).await,
                Err(s) => Err(s),
            }
        }
        "reject" => {
            vps.reject_vps(v.req(RejectVpsRequest {
                id: i,
                reason: form.reason,
            }))
            .await
        }
        _ => return not_found(State(p.clone()), headers).await,
    };
    match done {
        Ok(_) => Redirect::to(&here).into_response(),
        Err(s) => refusal(&v, &here, &s),
    }
}

pub async fn queue(State(p): S, headers: HeaderMap) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut waiting = Vec::new();
    let mut token = String::new();
    // The whole queue: it is bounded by each institution's
    // max_pending_requests, so it stays short.
    loop {
        let page = match p
            .vps
            .list_vps(v.req(ListVpsRequest {
                page_size: 500,
                page_token: token.clone(),
                state: VpsState::PendingApproval as i32,
                ..Default::default()
            }))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return refusal(&v, "/queue", &s),
        };
        waiting.extend(page.vps);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    waiting.sort_by_key(|x| x.created_at_ms);
    let now = now_ms();
    let (offset, zone) = (
        p.ctx.cfg.portal_utc_offset_hours,
        p.ctx.cfg.portal_zone_name.as_str(),
    );
    let t = v.lang.texts();
    let codes = institution_codes(&p, &v).await;
    let rows = waiting
        .iter()
        .map(|x| {
            let age = (now - x.created_at_ms).max(0);
            QueueRow {
                id: x.id.clone(),
                name: name_of(x),
                institution: code_of(&codes, &x.institution_id),
                application: x
                    .application
                    .as_ref()
                    .map(|a| a.name.clone())
                    .unwrap_or_default(),
                requested_by: x.requested_by.clone(),
                size: size_text(v.lang, x.spec.as_ref()),
                since: v.lang.moment(x.created_at_ms, offset, zone),
                age: format!("{} {}", v.lang.number((age / 3_600_000) as u64), t.hours),
                age_class: if age >= DECISION_STANDARD_MS {
                    "late"
                } else if age >= DECISION_STANDARD_MS * 3 / 4 {
                    "near"
                } else {
                    "ok"
                },
            }
        })
        .collect();
    render(&Queue {
        f: v.frame("/queue"),
        rows,
    })
}
