//! The web portal: server-rendered pages for institutions' members and the
//! data center's operators, in Bahasa Indonesia (English on a switch).
//!
//! It is a client of the same services as the gRPC API: every page calls a
//! service method with a request carrying the signed-in user's portal token,
//! so it has no SQL and no permission rule of its own. What it adds is what
//! a browser needs: passwords and invitations, session cookies, CSRF tokens
//! on every form, throttled sign-ins, and pages.

mod i18n;
mod operators;
mod pages;
mod session;
mod tokens;
mod views;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    routing::{get, post},
};

use crate::api::{Ctx, audit::AuditApi, hosts::HostApi, identity::IdentityApi, vps::VpsApi};

pub use i18n::Lang;

/// What every page handler shares.
pub struct Portal {
    ctx: Ctx,
    vps: VpsApi,
    identity: IdentityApi,
    hosts: HostApi,
    audit: AuditApi,
    idle: session::Idle,
    throttle: session::Throttle,
    /// Cookies are `Secure` when people reach the portal over HTTPS.
    secure: bool,
}

impl Portal {
    pub fn new(ctx: Ctx) -> Portal {
        let secure = ctx.cfg.portal_url.starts_with("https://");
        Portal {
            vps: VpsApi { ctx: ctx.clone() },
            identity: IdentityApi { ctx: ctx.clone() },
            hosts: HostApi { ctx: ctx.clone() },
            audit: AuditApi { ctx: ctx.clone() },
            ctx,
            idle: session::Idle::default(),
            throttle: session::Throttle::default(),
            secure,
        }
    }
}

pub fn router(portal: Arc<Portal>) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/assets/portal.css", get(pages::css))
        .route("/lang/{code}", get(pages::lang))
        .route("/sign-in", get(pages::sign_in_form).post(pages::sign_in))
        .route("/sign-out", post(pages::sign_out))
        .route(
            "/invite/{secret}",
            get(pages::invite_form).post(pages::invite),
        )
        .route("/password", get(pages::password_form).post(pages::password))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/tokens/{id}/revoke", post(tokens::revoke))
        .route("/vps", get(pages::vps_list).post(pages::vps_create))
        .route("/vps/new", get(pages::vps_new))
        .route("/vps/{id}", get(pages::vps_show))
        .route("/vps/{id}/confirm/{action}", get(pages::confirm))
        .route("/vps/{id}/{action}", post(pages::act))
        .route("/queue", get(pages::queue))
        .route("/hosts", get(operators::hosts))
        .route("/hosts/{id}/{action}", post(operators::cordon))
        .route("/audit", get(operators::audit))
        .route("/institutions", get(operators::institutions))
        .route("/users", get(operators::users))
        .route("/users/{id}/invite", post(operators::invite))
        .route("/inventory.csv", get(operators::inventory))
        .fallback(pages::not_found)
        .with_state(portal)
}

/// Serves the portal on `listener` until `stopped` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Ctx,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::new(Portal::new(ctx)));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stopped)
    .await
}
