//! The portal can do nothing the same person could not do through gRPC:
//! for members of two institutions and an operator, each page and action is
//! tried through the portal and the same call through the API with the
//! person's own token, and the portal's answer must be the API's verdict
//! (200 or a redirect for OK, 404 for NotFound, 403 for PermissionDenied).
//! Refused actions change nothing; allowed ones take effect. On libvirt's
//! test driver.

use std::time::Duration;

use betang_proto::v1::{
    ApproveVpsRequest, CancelVpsRequest, CordonHostRequest, CreateInvitationRequest,
    CreateVpsRequest, GetVpsRequest, ListAuditRequest, ListHostsRequest, ListInstitutionsRequest,
    ListUsersRequest, RevokeTokenRequest, StopVpsRequest, VpsState, WhoAmIRequest,
};
use betang_tests::{
    Clients, Cluster, ClusterOptions, application, portal::Visitor, state_of, wait_state,
};
use tonic::Code;

const T: Duration = Duration::from_secs(120);

/// What the portal answers for a service's verdict.
fn expected(verdict: Code, post: bool) -> u16 {
    match verdict {
        Code::Ok if post => 303,
        Code::Ok => 200,
        Code::NotFound => 404,
        Code::PermissionDenied => 403,
        Code::InvalidArgument => 400,
        Code::FailedPrecondition | Code::AlreadyExists => 409,
        other => panic!("no portal answer is defined for {other:?}"),
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

async fn username(c: &Clients) -> anyhow::Result<String> {
    Ok(c.identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner()
        .username)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_portal_allows_exactly_what_the_api_allows() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let addr = cluster
        .controller
        .as_ref()
        .and_then(|c| c.portal_addr)
        .expect("portal_listen is set");
    let admin = cluster.clients(&cluster.people.admin).await?;
    let (a, b, op) = (
        cluster.clients(&cluster.people.member_a).await?,
        cluster.clients(&cluster.people.member_b).await?,
        cluster.as_operator().await?,
    );
    // A running VPS of institution A, and a request of A's waiting for approval.
    let mine = op
        .vps
        .clone()
        .create_vps(cluster.create(cluster.spec("mine")))
        .await?
        .into_inner();
    wait_state(&op.vps, &mine.id, VpsState::Running, T).await?;
    let asked = a
        .vps
        .clone()
        .create_vps(CreateVpsRequest {
            request_id: "portal-access-asked".into(),
            spec: Some(cluster.spec("asked")),
            application: Some(application()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state_of(&asked), VpsState::PendingApproval);
    let host = cluster.hosts[0].host_id.clone();

    let mut people = Vec::new();
    for (who, c) in [("member A", &a), ("member B", &b), ("operator", &op)] {
        let name = username(c).await?;
        let v = Visitor::join(addr, &admin, &name, &format!("{name}-password-1")).await?;
        people.push((who, c, v));
    }

    let a_user = a
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner()
        .id;
    let show = format!("/vps/{}", mine.id);
    for (who, c, v) in &mut people {
        // Pages: the verdict of the call behind each.
        let pages = [
            (
                show.clone(),
                code(
                    c.vps
                        .clone()
                        .get_vps(GetVpsRequest {
                            id: mine.id.clone(),
                            ..Default::default()
                        })
                        .await,
                ),
            ),
            (
                "/hosts".to_owned(),
                code(c.hosts.clone().list_hosts(ListHostsRequest {}).await),
            ),
            (
                "/institutions".to_owned(),
                code(
                    c.identity
                        .clone()
                        .list_institutions(ListInstitutionsRequest::default())
                        .await,
                ),
            ),
            (
                "/users".to_owned(),
                code(
                    c.identity
                        .clone()
                        .list_users(ListUsersRequest::default())
                        .await,
                ),
            ),
            (
                "/audit".to_owned(),
                code(
                    c.audit
                        .clone()
                        .list_audit(ListAuditRequest::default())
                        .await,
                ),
            ),
        ];
        for (path, verdict) in pages {
            let got = v.get(&path).await?.status;
            assert_eq!(
                got,
                expected(verdict, false),
                "{who}: GET {path} ({verdict:?})"
            );
        }
        // The inventory holds only what the person may see.
        let csv = v.get("/inventory.csv").await?;
        assert_eq!(csv.status, 200, "{who}");
        let sees = code(
            c.vps
                .clone()
                .get_vps(GetVpsRequest {
                    id: mine.id.clone(),
                    ..Default::default()
                })
                .await,
        ) == Code::Ok;
        assert_eq!(csv.body.contains(&mine.id), sees, "{who}: inventory");
        let csrf = betang_tests::portal::csrf_in(&v.get("/vps").await?.body).expect("a form");

        // Actions the permission table refuses this person: the API's
        // verdict on the very target (a refusal changes nothing), and the
        // portal must give the same one.
        let member = *who != "operator";
        let other = *who == "member B";
        let mut refused = Vec::new();
        // Only admins invite: everyone here is refused.
        let verdict = c
            .identity
            .clone()
            .create_invitation(CreateInvitationRequest {
                user: a_user.clone(),
            })
            .await;
        refused.push((format!("/users/{a_user}/invite"), code(verdict)));
        if member {
            let verdict = c
                .vps
                .clone()
                .approve_vps(ApproveVpsRequest {
                    id: asked.id.clone(),
                    ..Default::default()
                })
                .await;
            refused.push((format!("/vps/{}/approve", asked.id), code(verdict)));
            let verdict = c
                .hosts
                .clone()
                .cordon_host(CordonHostRequest { id: host.clone() })
                .await;
            refused.push((format!("/hosts/{host}/cordon"), code(verdict)));
        }
        if other {
            let verdict = c
                .vps
                .clone()
                .stop_vps(StopVpsRequest {
                    id: mine.id.clone(),
                    ..Default::default()
                })
                .await;
            refused.push((format!("/vps/{}/stop", mine.id), code(verdict)));
            let verdict = c
                .vps
                .clone()
                .cancel_vps(CancelVpsRequest {
                    id: asked.id.clone(),
                })
                .await;
            refused.push((format!("/vps/{}/cancel", asked.id), code(verdict)));
        }
        for (path, verdict) in refused {
            assert_ne!(verdict, Code::Ok, "{who}: the API refuses {path}");
            let got = v.post_with(&path, &csrf, &[]).await?.status;
            assert_eq!(
                got,
                expected(verdict, true),
                "{who}: POST {path} ({verdict:?})"
            );
        }
        let now = |id: &str| {
            let mut vps = op.vps.clone();
            let id = id.to_owned();
            async move {
                vps.get_vps(GetVpsRequest {
                    id,
                    ..Default::default()
                })
                .await
                .map(|r| state_of(&r.into_inner()))
            }
        };
        assert_eq!(now(&mine.id).await?, VpsState::Running, "{who}");
        assert_eq!(now(&asked.id).await?, VpsState::PendingApproval, "{who}");
        let cordoned = op
            .hosts
            .clone()
            .list_hosts(ListHostsRequest {})
            .await?
            .into_inner()
            .hosts
            .into_iter()
            .any(|h| h.cordoned);
        assert!(!cordoned, "{who}: no host was cordoned");

        // Without the form's token, nothing is done, whoever asks.
        let got = v
            .post_with(&format!("/vps/{}/cancel", asked.id), "", &[])
            .await?
            .status;
        assert_eq!(got, 403, "{who}: a form without its token");
    }

    // Allowed: the operator cordons a host and uncordons it; member A
    // cancels their own request.
    let (_, _, operator) = &mut people[2];
    let at = operator
        .post_form("/hosts", &format!("/hosts/{host}/cordon"), &[])
        .await?;
    assert_eq!(at.status, 303);
    let listed = op.hosts.clone().list_hosts(ListHostsRequest {}).await?;
    assert!(
        listed
            .into_inner()
            .hosts
            .iter()
            .any(|h| h.id == host && h.cordoned)
    );
    operator
        .post_form("/hosts", &format!("/hosts/{host}/uncordon"), &[])
        .await?;
    let (_, _, member) = &mut people[0];
    let at = member
        .post_form(
            &format!("/vps/{}/confirm/cancel", asked.id),
            &format!("/vps/{}/cancel", asked.id),
            &[],
        )
        .await?;
    assert_eq!(at.status, 303);
    wait_state(&op.vps, &asked.id, VpsState::Cancelled, T).await?;
    // An admin makes an invitation on the users' page; its link opens.
    let admin_name = username(&admin).await?;
    let mut root = Visitor::join(addr, &admin, &admin_name, "admin-password-1234").await?;
    let made = root
        .post_form("/users", &format!("/users/{a_user}/invite"), &[])
        .await?;
    assert_eq!(made.status, 200);
    let link = made
        .body
        .split("<code id=\"link\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .expect("the invitation's link is shown");
    let path = link.trim_start_matches(&format!("http://{addr}"));
    assert!(path.starts_with("/invite/btg_"), "{link}");
    assert_eq!(Visitor::new(addr).get(path).await?.status, 200);

    // Each person's own API tokens: made in the portal (the secret shown
    // once works with the API), not revocable by another member, revoked.
    let (_, _, member) = &mut people[0];
    let made = member
        .post_form("/tokens", "/tokens", &[("name", "laptop"), ("days", "30")])
        .await?;
    assert_eq!(made.status, 200);
    let secret = made
        .body
        .split("<code id=\"secret\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .expect("the new token's secret is shown")
        .to_owned();
    let with_it = Clients::connect(&cluster.endpoint, Some(&secret)).await?;
    assert_eq!(username(&with_it).await?, username(&a).await?);
    let token_id = made
        .body
        .split("<tr data-id=\"")
        .find(|row| row.contains("<td>laptop</td>"))
        .and_then(|row| row.split('"').next())
        .expect("the token is listed")
        .to_owned();
    let verdict = code(
        b.identity
            .clone()
            .revoke_token(RevokeTokenRequest {
                id: token_id.clone(),
            })
            .await,
    );
    let (_, _, other) = &mut people[1];
    let got = other
        .post_form("/tokens", &format!("/tokens/{token_id}/revoke"), &[])
        .await?;
    assert_eq!(
        got.status,
        expected(verdict, true),
        "another member revokes"
    );
    assert_eq!(
        username(&with_it).await?,
        username(&a).await?,
        "still works"
    );
    let (_, _, member) = &mut people[0];
    let got = member
        .post_form("/tokens", &format!("/tokens/{token_id}/revoke"), &[])
        .await?;
    assert_eq!(got.status, 303);
    let refused = with_it
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await
        .expect_err("a revoked token");
    assert_eq!(refused.code(), Code::Unauthenticated);

    // The operator approves a request resized; a size that is no number
    // is refused and changes nothing.
    let resized = a
        .vps
        .clone()
        .create_vps(CreateVpsRequest {
            request_id: "portal-access-resized".into(),
            spec: Some(cluster.spec("resized")),
            application: Some(application()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (_, _, operator) = &mut people[2];
    let page = format!("/vps/{}", resized.id);
    let approve = format!("/vps/{}/approve", resized.id);
    let bad = operator
        .post_form(&page, &approve, &[("vcpus", "two")])
        .await?;
    assert_eq!(bad.status, 400);
    assert_eq!(
        state_of(
            &op.vps
                .clone()
                .get_vps(GetVpsRequest {
                    id: resized.id.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
        ),
        VpsState::PendingApproval
    );
    let good = operator
        .post_form(
            &page,
            &approve,
            &[
                ("vcpus", "2"),
                ("memory_mib", ""),
                ("disk_gib", ""),
                ("host_id", ""),
            ],
        )
        .await?;
    assert_eq!(good.status, 303);
    let now = op
        .vps
        .clone()
        .get_vps(GetVpsRequest {
            id: resized.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_ne!(state_of(&now), VpsState::PendingApproval);
    assert_eq!(now.spec.unwrap_or_default().vcpus, 2);

    // And it has left the operators' queue.
    let (_, _, operator) = &mut people[2];
    let queue = operator.get("/queue").await?;
    assert_eq!(queue.status, 200);
    assert!(!queue.body.contains(&asked.id), "{}", queue.body);
    Ok(())
}
