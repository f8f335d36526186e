//! Everyone's own API tokens, for `betangctl`: listed with their use,
//! created (the secret shown once) and revoked, through the same
//! IdentityService calls `betangctl token` makes. Portal sign-ins are
//! tokens too and show here, so one can be ended from another browser.

use std::sync::Arc;

use axum::{
    Form,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};
use betang_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest,
    identity_service_server::IdentityService,
};
use serde::Deserialize;

use super::{
    Portal,
    pages::{CsrfForm, Visitor, poster, refusal, render, visitor},
    views::{TokenRow, Tokens},
};
use crate::now_ms;

type S = State<Arc<Portal>>;

async fn page(p: &Portal, v: &Visitor, secret: String, error: String) -> Response {
    let listed = match p
        .identity
        .list_tokens(v.req(ListTokensRequest {
            user_id: v.caller.user_id.clone(),
        }))
        .await
    {
        Ok(r) => r.into_inner().tokens,
        Err(s) => return refusal(v, "/tokens", &s),
    };
    let t = v.lang.texts();
    let (offset, zone) = (
        p.ctx.cfg.portal_utc_offset_hours,
        p.ctx.cfg.portal_zone_name.as_str(),
    );
    let now = now_ms();
    let rows = listed
        .iter()
        .rev()
        .map(|k| {
            let (state, active) = if k.revoked_at_ms != 0 {
                (t.token_revoked, false)
            } else if k.expires_at_ms != 0 && k.expires_at_ms <= now {
                (t.token_expired, false)
            } else {
                (t.token_active, true)
            };
            let last_used = match k.last_used_at_ms {
                0 => "—".to_owned(),
                at => format!("{} ({})", v.lang.moment(at, offset, zone), k.last_used_from),
            };
            TokenRow {
                id: k.id.clone(),
                name: k.name.clone(),
                state,
                active,
                created: v.lang.moment(k.created_at_ms, offset, zone),
                expires: v.lang.moment(k.expires_at_ms, offset, zone),
                last_used,
            }
        })
        .collect();
    let code = if error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let page = Tokens {
        f: v.frame("/tokens"),
        rows,
        secret,
        error,
    };
    (code, render(&page)).into_response()
}

pub async fn list(State(p): S, headers: HeaderMap) -> Response {
    match visitor(&p, &headers).await {
        Ok(v) => page(&p, &v, String::new(), String::new()).await,
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub struct NewToken {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    days: String,
}

pub async fn create(State(p): S, headers: HeaderMap, Form(form): Form<NewToken>) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/tokens").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(days) = form.days.trim().parse::<u32>().ok().filter(|d| *d > 0) else {
        let why = format!("days: {:?} is not a whole number of days", form.days);
        return page(&p, &v, String::new(), why).await;
    };
    let asked = CreateTokenRequest {
        user_id: v.caller.user_id.clone(),
        name: form.name.trim().to_owned(),
        ttl_seconds: days.saturating_mul(86_400),
    };
    match p.identity.create_token(v.req(asked)).await {
        Ok(r) => page(&p, &v, r.into_inner().secret, String::new()).await,
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            page(&p, &v, String::new(), s.message().to_owned()).await
        }
        Err(s) => refusal(&v, "/tokens", &s),
    }
}

pub async fn revoke(
    State(p): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/tokens").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match p
        .identity
        .revoke_token(v.req(RevokeTokenRequest { id }))
        .await
    {
        Ok(_) => Redirect::to("/tokens").into_response(),
        Err(s) => refusal(&v, "/tokens", &s),
    }
}
