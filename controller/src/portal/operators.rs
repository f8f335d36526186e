//! The data center's pages: hosts with their capacity and use (cordon,
//! uncordon), institutions with their quotas, users and their invitations,
//! the audit trail with filters, and the application inventory of every VPS
//! as CSV, the list the province's SPBE team asks for. Each is
//! a service call with the visitor's token: a member who opens one gets
//! what the service gives a member (a refusal, or their own institution's
//! rows).

use std::sync::Arc;

use axum::{
    Form,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use betang_proto::v1::{
    CordonHostRequest, CreateInvitationRequest, HostState, Invitation, ListAuditRequest,
    ListHostsRequest, ListInstitutionsRequest, ListUsersRequest, ListVpsRequest, Role,
    UncordonHostRequest, audit_service_server::AuditService, host_service_server::HostService,
    identity_service_server::IdentityService, vps_service_server::VpsService,
};
use serde::Deserialize;

use super::{
    Portal,
    pages::{
        CsrfForm, Visitor, address_of, code_of, institution_codes, name_of, poster, quota_bars,
        refusal, render, visitor,
    },
    views::{Audit, AuditRow, HostRow, Hosts, InstitutionRow, Institutions, UserRow, Users},
};

type S = State<Arc<Portal>>;

fn of_total(lang: super::Lang, used: u64, total: u64, unit: &str) -> String {
    format!("{} / {} {unit}", lang.number(used), lang.number(total))
}

pub async fn hosts(State(p): S, headers: HeaderMap) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let listed = match p.hosts.list_hosts(v.req(ListHostsRequest {})).await {
        Ok(r) => r.into_inner().hosts,
        Err(s) => return refusal(&v, "/hosts", &s),
    };
    let t = v.lang.texts();
    let rows = listed
        .iter()
        .map(|h| {
            let (a, can) = (
                h.allocated.unwrap_or_default(),
                h.allocatable.unwrap_or_default(),
            );
            let (state, state_class) = match h.state() {
                HostState::Up => (t.host_up, "running"),
                HostState::Degraded => (t.host_degraded, "waiting"),
                HostState::Down | HostState::Unspecified => (t.host_down, "bad"),
            };
            HostRow {
                id: h.id.clone(),
                zone: h.zone.clone(),
                state,
                state_class,
                reason: h.state_reason.clone(),
                cordoned: h.cordoned,
                vcpus: of_total(v.lang, a.vcpus.into(), can.vcpus.into(), "vCPU"),
                memory: of_total(v.lang, a.memory_mib, can.memory_mib, "MiB"),
                disk: of_total(v.lang, a.disk_gib, can.disk_gib, "GiB"),
                cpu: h
                    .usage
                    .map(|u| format!("{:.0}%", u.cpu_percent))
                    .unwrap_or_default(),
                vps: h.vps_count,
            }
        })
        .collect();
    render(&Hosts {
        f: v.frame("/hosts"),
        rows,
    })
}

pub async fn cordon(
    State(p): S,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/hosts").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let done = match action.as_str() {
        "cordon" => p.hosts.cordon_host(v.req(CordonHostRequest { id })).await,
        "uncordon" => {
            p.hosts
                .uncordon_host(v.req(UncordonHostRequest { id }))
                .await
        }
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    match done {
        Ok(_) => Redirect::to("/hosts").into_response(),
        Err(s) => refusal(&v, "/hosts", &s),
    }
}

#[derive(Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    page: String,
}

pub async fn audit(State(p): S, headers: HeaderMap, Query(q): Query<AuditQuery>) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let asked = ListAuditRequest {
        actor_user_id: q.actor.trim().to_owned(),
        action: q.action.trim().to_owned(),
        page_size: 100,
        page_token: q.page,
        ..Default::default()
    };
    let page = match p.audit.list_audit(v.req(asked)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return refusal(&v, "/audit", &s),
    };
    let (offset, zone) = (
        p.ctx.cfg.portal_utc_offset_hours,
        p.ctx.cfg.portal_zone_name.as_str(),
    );
    let rows = page
        .records
        .iter()
        .map(|r| AuditRow {
            at: v.lang.moment(r.at_ms, offset, zone),
            actor: r.actor_username.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            result: r.result.clone(),
        })
        .collect();
    render(&Audit {
        f: v.frame("/audit"),
        actor: q.actor,
        action: q.action,
        rows,
        next_page: page.next_page_token,
    })
}

/// Every VPS the visitor may see (deleted ones left out), one row each.
async fn every_vps(p: &Portal, v: &Visitor) -> Result<Vec<betang_proto::v1::Vps>, Response> {
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let page = p
            .vps
            .list_vps(v.req(ListVpsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .map_err(|s| refusal(v, "/vps", &s))?
            .into_inner();
        all.extend(page.vps);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

/// A cell a spreadsheet will not run: what members typed (an application's
/// name, a domain) is opened by the SPBE team in a spreadsheet, which would
/// take `=`, `+`, `-` or `@` at the start as a formula.
fn spreadsheet_safe(cell: String) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{cell}")
    } else {
        cell
    }
}

/// The application inventory as CSV (UTF-8, a header row, RFC 4180
/// quoting), with times in the portal's zone.
pub async fn inventory(State(p): S, headers: HeaderMap) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let vps = match every_vps(&p, &v).await {
        Ok(all) => all,
        Err(r) => return r,
    };
    let codes = institution_codes(&p, &v).await;
    let (offset, zone) = (
        p.ctx.cfg.portal_utc_offset_hours,
        p.ctx.cfg.portal_zone_name.as_str(),
    );
    let mut w = csv::Writer::from_writer(Vec::new());
    let header = [
        "institution",
        "vps",
        "vps_id",
        "application",
        "kind",
        "purpose",
        "domain",
        "responsible_name",
        "responsible_nip",
        "responsible_email",
        "responsible_phone",
        "state",
        "address",
        "vcpus",
        "memory_mib",
        "disk_gib",
        "since",
        "requested_by",
        "decided_by",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for x in &vps {
        let a = x.application.clone().unwrap_or_default();
        let s = x.spec.clone().unwrap_or_default();
        let address = address_of(x);
        rows.push(vec![
            code_of(&codes, &x.institution_id),
            name_of(x),
            x.id.clone(),
            a.name,
            a.kind,
            a.purpose,
            a.domain,
            a.responsible_name,
            a.responsible_nip,
            a.responsible_email,
            a.responsible_phone,
            x.state()
                .as_str_name()
                .trim_start_matches("VPS_STATE_")
                .to_owned(),
            if address == "—" {
                String::new()
            } else {
                address
            },
            s.vcpus.to_string(),
            s.memory_mib.to_string(),
            s.disk_gib.to_string(),
            v.lang.moment(x.created_at_ms, offset, zone),
            x.requested_by.clone(),
            x.decided_by.clone(),
        ]);
    }
    for r in rows {
        if w.write_record(r.into_iter().map(spreadsheet_safe)).is_err() {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    let Ok(body) = w.into_inner() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"betang-inventory.csv\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

pub async fn institutions(State(p): S, headers: HeaderMap) -> Response {
    let v = match visitor(&p, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let listed = match p
        .identity
        .list_institutions(v.req(ListInstitutionsRequest::default()))
        .await
    {
        Ok(r) => r.into_inner().institutions,
        Err(s) => return refusal(&v, "/institutions", &s),
    };
    let rows = listed
        .iter()
        .map(|i| InstitutionRow {
            id: i.id.clone(),
            code: i.code.clone(),
            name: i.name.clone(),
            disabled: i.disabled_at_ms != 0,
            quota: quota_bars(v.lang, i),
        })
        .collect();
    render(&Institutions {
        f: v.frame("/institutions"),
        rows,
    })
}

async fn users_page(p: &Portal, v: &Visitor, invitation: Option<Invitation>) -> Response {
    let listed = match p
        .identity
        .list_users(v.req(ListUsersRequest::default()))
        .await
    {
        Ok(r) => r.into_inner().users,
        Err(s) => return refusal(v, "/users", &s),
    };
    let codes = institution_codes(p, v).await;
    let t = v.lang.texts();
    let rows = listed
        .iter()
        .map(|u| UserRow {
            id: u.id.clone(),
            username: u.username.clone(),
            institution: code_of(&codes, &u.institution_id),
            role: match u.role() {
                Role::Admin => t.role_admin,
                Role::Operator => t.role_operator,
                Role::Member | Role::Unspecified => t.role_member,
            },
            disabled: u.disabled_at_ms != 0,
        })
        .collect();
    let (offset, zone) = (
        p.ctx.cfg.portal_utc_offset_hours,
        p.ctx.cfg.portal_zone_name.as_str(),
    );
    let i = invitation.unwrap_or_default();
    let link = match (i.link.is_empty(), i.secret.is_empty()) {
        (_, true) => String::new(),
        (false, false) => i.link.clone(),
        (true, false) => format!("/invite/{}", i.secret),
    };
    render(&Users {
        f: v.frame("/users"),
        rows,
        invited: i.user.map(|u| u.username).unwrap_or_default(),
        link,
        until: v.lang.moment(i.expires_at_ms, offset, zone),
    })
}

pub async fn users(State(p): S, headers: HeaderMap) -> Response {
    match visitor(&p, &headers).await {
        Ok(v) => users_page(&p, &v, None).await,
        Err(r) => r,
    }
}

/// Makes an invitation and shows its link once, on the users' page.
pub async fn invite(
    State(p): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match poster(&p, &headers, &form.csrf, "/users").await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match p
        .identity
        .create_invitation(v.req(CreateInvitationRequest { user: id }))
        .await
    {
        Ok(i) => users_page(&p, &v, Some(i.into_inner())).await,
        Err(s) => refusal(&v, "/users", &s),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_members_typed_is_never_a_formula() {
        assert_eq!(
            super::spreadsheet_safe("=HYPERLINK(\"x\")".into()),
            "'=HYPERLINK(\"x\")"
        );
        assert_eq!(super::spreadsheet_safe("-2+3".into()), "'-2+3");
        assert_eq!(super::spreadsheet_safe("Situs Dinas".into()), "Situs Dinas");
    }
}
