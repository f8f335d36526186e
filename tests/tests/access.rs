//! Who may do what: every call of the user API against every kind of
//! caller, isolation between institutions, quotas under concurrency, token
//! expiry and revocation, and the audit trail.

use std::time::Duration;

use betang_proto::v1::{
    ApproveVpsRequest, CancelVpsRequest, CreateInstitutionRequest, CreateTokenRequest,
    CreateUserRequest, CreateVpsRequest, DeleteVpsRequest, GetHostRequest, GetInstitutionRequest,
    GetVpsRequest, ListAuditRequest, ListHostsRequest, ListImagesRequest, ListInstitutionsRequest,
    ListTokensRequest, ListUsersRequest, ListVpsRequest, Quota, RebootVpsRequest, RejectVpsRequest,
    ResizeVpsRequest, RevokeTokenRequest, Role, SetQuotaRequest, StartVpsRequest, StopVpsRequest,
    VpsState, WhoAmIRequest,
};
use betang_tests::{Clients, Cluster, ClusterOptions, application, state_of, wait_state};
use tonic::{Code, Status};

/// Generous: a loaded two-core machine may run the whole suite beside a build.
const T: Duration = Duration::from_secs(120);

fn code<R>(r: Result<tonic::Response<R>, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// What each matrix run acts on, made fresh by the operator.
struct Fixture {
    vps: String,
    stopped: String,
    to_approve: String,
    to_reject: String,
    to_cancel: String,
    throwaway_token: String,
    other_user: String,
}

async fn fixture(
    cluster: &Cluster,
    op: &Clients,
    member_a: &Clients,
    tag: &str,
) -> anyhow::Result<Fixture> {
    let v = op
        .vps
        .clone()
        .create_vps(cluster.create(cluster.spec(&format!("{tag}-v"))))
        .await?
        .into_inner();
    wait_state(&op.vps, &v.id, VpsState::Running, T).await?;
    let stopped = op
        .vps
        .clone()
        .create_vps(cluster.create(cluster.spec(&format!("{tag}-s"))))
        .await?
        .into_inner();
    wait_state(&op.vps, &stopped.id, VpsState::Running, T).await?;
    op.vps
        .clone()
        .stop_vps(StopVpsRequest {
            id: stopped.id.clone(),
            timeout_seconds: 1,
            force: true,
        })
        .await?;
    wait_state(&op.vps, &stopped.id, VpsState::Stopped, T).await?;
    let mut pending = Vec::new();
    for n in ["ap", "rj", "cn"] {
        let r = member_a
            .vps
            .clone()
            .create_vps(CreateVpsRequest {
                institution_id: String::new(),
                ..cluster.create(cluster.spec(&format!("{tag}-{n}")))
            })
            .await?
            .into_inner();
        assert_eq!(state_of(&r), VpsState::PendingApproval);
        pending.push(r.id);
    }
    let throwaway = member_a
        .identity
        .clone()
        .create_token(CreateTokenRequest {
            name: "throwaway".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // Someone who is none of the callers, whose tokens only admins may touch.
    let admin = cluster.clients(&cluster.people.admin).await?;
    let bystander = admin
        .identity
        .clone()
        .create_user(CreateUserRequest {
            username: format!("{}-{tag}-by", cluster.prefix),
            institution_id: cluster.people.inst_a.clone(),
            role: Role::Member as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(Fixture {
        vps: v.id,
        stopped: stopped.id,
        to_approve: pending[0].clone(),
        to_reject: pending[1].clone(),
        to_cancel: pending[2].clone(),
        throwaway_token: throwaway.token.unwrap().id,
        other_user: bystander.id,
    })
}

const CALLS: [&str; 27] = [
    "CreateVps",
    "GetVps",
    "ListVps",
    "StartVps",
    "RebootVps",
    "StopVps",
    "DeleteVps",
    "ListImages",
    "ApproveVps",
    "RejectVps",
    "CancelVps",
    "ListHosts",
    "GetHost",
    "WhoAmI",
    "CreateInstitution",
    "ListInstitutions",
    "GetInstitution",
    "SetQuota",
    "CreateUser",
    "ListUsers",
    "CreateToken",
    "CreateTokenForOther",
    "ListTokensOfOther",
    "RevokeToken",
    "ListAudit",
    "ResizeVps",
    "GetUsageReportOfA",
];

async fn run(c: &Clients, cluster: &Cluster, f: &Fixture, tag: &str) -> Vec<Code> {
    let (mut vps, mut hosts, mut id, mut audit) = (
        c.vps.clone(),
        c.hosts.clone(),
        c.identity.clone(),
        c.audit.clone(),
    );
    let a = &cluster.people.inst_a;
    let mut out = Vec::new();
    out.push(code(
        vps.create_vps(CreateVpsRequest {
            institution_id: String::new(),
            ..cluster.create(cluster.spec(&format!("{tag}-new")))
        })
        .await,
    ));
    // Staff must name the institution; retry that way so the call is judged on its merits.
    if out[0] == Code::InvalidArgument {
        out[0] = code(
            vps.create_vps(cluster.create(cluster.spec(&format!("{tag}-new"))))
                .await,
        );
    }
    out.push(code(
        vps.get_vps(GetVpsRequest {
            id: f.vps.clone(),
            ..Default::default()
        })
        .await,
    ));
    out.push(code(vps.list_vps(ListVpsRequest::default()).await));
    out.push(code(
        vps.start_vps(StartVpsRequest { id: f.vps.clone() }).await,
    ));
    out.push(code(
        vps.reboot_vps(RebootVpsRequest {
            id: f.vps.clone(),
            force: true,
        })
        .await,
    ));
    out.push(code(
        vps.stop_vps(StopVpsRequest {
            id: f.vps.clone(),
            timeout_seconds: 1,
            force: true,
        })
        .await,
    ));
    out.push(code(
        vps.delete_vps(DeleteVpsRequest { id: f.vps.clone() }).await,
    ));
    out.push(code(vps.list_images(ListImagesRequest {}).await));
    out.push(code(
        vps.approve_vps(ApproveVpsRequest {
            id: f.to_approve.clone(),
            ..Default::default()
        })
        .await,
    ));
    out.push(code(
        vps.reject_vps(RejectVpsRequest {
            id: f.to_reject.clone(),
            reason: "not in this year's plan".into(),
        })
        .await,
    ));
    out.push(code(
        vps.cancel_vps(CancelVpsRequest {
            id: f.to_cancel.clone(),
        })
        .await,
    ));
    out.push(code(hosts.list_hosts(ListHostsRequest {}).await));
    out.push(code(
        hosts
            .get_host(GetHostRequest {
                id: cluster.hosts[0].host_id.clone(),
            })
            .await,
    ));
    out.push(code(id.who_am_i(WhoAmIRequest {}).await));
    out.push(code(
        id.create_institution(CreateInstitutionRequest {
            code: format!("{}-{tag}", cluster.prefix),
            name: "Dinas baru".into(),
            quota: Some(ClusterOptions::default().quota),
            ..Default::default()
        })
        .await,
    ));
    out.push(code(id.list_institutions(ListInstitutionsRequest {}).await));
    out.push(code(
        id.get_institution(GetInstitutionRequest { id: a.clone() })
            .await,
    ));
    out.push(code(
        id.set_quota(SetQuotaRequest {
            institution_id: a.clone(),
            quota: Some(ClusterOptions::default().quota),
            change: None,
        })
        .await,
    ));
    out.push(code(
        id.create_user(CreateUserRequest {
            username: format!("{}-{tag}-nu", cluster.prefix),
            institution_id: a.clone(),
            role: Role::Member as i32,
            ..Default::default()
        })
        .await,
    ));
    out.push(code(id.list_users(ListUsersRequest::default()).await));
    out.push(code(id.create_token(CreateTokenRequest::default()).await));
    out.push(code(
        id.create_token(CreateTokenRequest {
            user_id: f.other_user.clone(),
            ..Default::default()
        })
        .await,
    ));
    out.push(code(
        id.list_tokens(ListTokensRequest {
            user_id: f.other_user.clone(),
        })
        .await,
    ));
    out.push(code(
        id.revoke_token(RevokeTokenRequest {
            id: f.throwaway_token.clone(),
        })
        .await,
    ));
    out.push(code(audit.list_audit(ListAuditRequest::default()).await));
    out.push(code(
        vps.resize_vps(ResizeVpsRequest {
            id: f.stopped.clone(),
            vcpus: 2,
            ..Default::default()
        })
        .await,
    ));
    out.push(code(
        vps.get_usage_report(betang_proto::v1::UsageReportRequest {
            from_ms: 0,
            to_ms: 86_400_000,
            institution_id: a.clone(),
        })
        .await,
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_against_every_role() -> anyhow::Result<()> {
    use Code::{NotFound as NF, Ok as OK, PermissionDenied as PD};
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let p = cluster.people.clone();
    let op = cluster.clients(&p.operator).await?;
    let member_a = cluster.clients(&p.member_a).await?;
    let expectations: [(&str, Option<&str>, [Code; 27]); 6] = [
        (
            "member-a",
            Some(&p.member_a),
            [
                OK, OK, OK, OK, OK, OK, OK, OK, PD, PD, OK, PD, PD, OK, PD, OK, OK, PD, PD, PD, OK,
                PD, PD, OK, PD, PD, OK,
            ],
        ),
        (
            "member-b",
            Some(&p.member_b),
            [
                OK, NF, OK, NF, NF, NF, NF, OK, PD, PD, NF, PD, PD, OK, PD, OK, NF, PD, PD, PD, OK,
                PD, PD, NF, PD, PD, NF,
            ],
        ),
        (
            "operator",
            Some(&p.operator),
            [
                OK, OK, OK, OK, OK, OK, OK, OK, OK, OK, OK, OK, OK, OK, PD, OK, OK, OK, PD, OK, OK,
                PD, PD, NF, OK, OK, OK,
            ],
        ),
        ("admin", Some(&p.admin), [OK; 27]),
        ("anonymous", None, [Code::Unauthenticated; 27]),
        (
            "forged",
            Some("btg_0000000000000000000000000000000000000000000000000000000000000000"),
            [Code::Unauthenticated; 27],
        ),
    ];
    for (who, token, expected) in expectations {
        let f = fixture(&cluster, &op, &member_a, who).await?;
        let c = Clients::connect(&cluster.endpoint, token).await?;
        let audit_before = count_audit(&op).await?;
        let got = run(&c, &cluster, &f, who).await;
        let mismatches: Vec<String> = CALLS
            .iter()
            .zip(got.iter().zip(expected.iter()))
            .filter(|(_, (g, e))| g != e)
            .map(|(call, (g, e))| format!("{call}: got {g:?}, expected {e:?}"))
            .collect();
        assert!(mismatches.is_empty(), "{who}:\n{}", mismatches.join("\n"));
        // Exactly one audit record per change that was allowed, none for refusals.
        let changes = [
            "CreateVps",
            "StartVps",
            "RebootVps",
            "StopVps",
            "DeleteVps",
            "ApproveVps",
            "RejectVps",
            "CancelVps",
            "CreateInstitution",
            "SetQuota",
            "CreateUser",
            "CreateToken",
            "CreateTokenForOther",
            "RevokeToken",
            "ResizeVps",
        ];
        let allowed_changes = CALLS
            .iter()
            .zip(got.iter())
            .filter(|(c, g)| changes.contains(c) && **g == Code::Ok)
            .count();
        // StartVps on a running VPS changes nothing and records nothing.
        let no_ops = usize::from(got[3] == Code::Ok);
        assert_eq!(
            count_audit(&op).await? - audit_before,
            allowed_changes - no_ops,
            "{who}: audit records"
        );
    }
    Ok(())
}

async fn count_audit(c: &Clients) -> anyhow::Result<usize> {
    let r = c
        .audit
        .clone()
        .list_audit(ListAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    // Betang's own records (a host seen going down on a busy machine) are not
    // the callers' changes.
    Ok(r.records
        .iter()
        .filter(|a| a.actor_user_id != "system")
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn institutions_never_see_each_other() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let p = cluster.people.clone();
    let a = cluster.clients(&p.member_a).await?;
    let b = cluster.clients(&p.member_b).await?;
    let op = cluster.as_operator().await?;
    let req = CreateVpsRequest {
        institution_id: String::new(),
        ..cluster.create(cluster.spec("mine"))
    };
    let mine = a.vps.clone().create_vps(req.clone()).await?.into_inner();
    // B reusing A's request id gets its own request, not A's.
    let theirs = b.vps.clone().create_vps(req).await?.into_inner();
    assert_ne!(mine.id, theirs.id);
    assert_eq!(theirs.institution_id, p.inst_b);
    // Naming another institution is as if it did not exist.
    let err = b
        .vps
        .clone()
        .create_vps(cluster.create(cluster.spec("sneaky")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let list_b = b
        .vps
        .clone()
        .list_vps(ListVpsRequest::default())
        .await?
        .into_inner();
    assert_eq!(list_b.vps.len(), 1);
    assert_eq!(list_b.vps[0].id, theirs.id);
    // Asking for A's rows explicitly changes nothing.
    let list_b = b
        .vps
        .clone()
        .list_vps(ListVpsRequest {
            institution_id: p.inst_a.clone(),
            include_deleted: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(list_b.vps.iter().all(|v| v.institution_id == p.inst_b));
    let insts = b
        .identity
        .clone()
        .list_institutions(ListInstitutionsRequest {})
        .await?
        .into_inner();
    assert_eq!(insts.institutions.len(), 1);
    assert_eq!(insts.institutions[0].id, p.inst_b);
    // The operator sees both, and the pending queue holds both requests.
    let queue = op
        .vps
        .clone()
        .list_vps(ListVpsRequest {
            state: VpsState::PendingApproval as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(queue.vps.len(), 2);
    // A rejection reaches the member with its reason.
    op.vps
        .clone()
        .reject_vps(RejectVpsRequest {
            id: mine.id.clone(),
            reason: "please attach the decree".into(),
        })
        .await?;
    let seen = a
        .vps
        .clone()
        .get_vps(GetVpsRequest {
            id: mine.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(state_of(&seen), VpsState::Rejected);
    assert_eq!(seen.state_reason, "please attach the decree");
    assert_eq!(seen.application.unwrap(), application());
    // A rejected request cannot be approved after all.
    let err = op
        .vps
        .clone()
        .approve_vps(ApproveVpsRequest {
            id: mine.id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    Ok(())
}

/// CloudStack's CVE-2025-69233 was this race: concurrent approvals against
/// one quota. 200 at once against room for 50 must give exactly 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_approvals_never_exceed_the_quota() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        quota: Quota {
            vcpus: 50,
            memory_mib: 1 << 30,
            disk_gib: 1 << 20,
            vps_count: 1000,
        },
        ..Default::default()
    })
    .await?;
    let p = cluster.people.clone();
    let member = cluster.clients(&p.member_a).await?;
    let op = cluster.as_operator().await?;
    let mut ids = Vec::new();
    for i in 0..200 {
        let mut spec = cluster.spec(&format!("q{i}"));
        spec.memory_mib = 64;
        spec.disk_gib = 1;
        let v = member
            .vps
            .clone()
            .create_vps(CreateVpsRequest {
                institution_id: String::new(),
                ..cluster.create(spec)
            })
            .await?
            .into_inner();
        ids.push(v.id);
    }
    let results = futures::future::join_all(ids.iter().map(|id| {
        let mut c = op.vps.clone();
        let id = id.clone();
        async move {
            c.approve_vps(ApproveVpsRequest {
                id,
                ..Default::default()
            })
            .await
        }
    }))
    .await;
    let mut approved = 0;
    for r in &results {
        match r {
            Ok(_) => approved += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                assert!(
                    s.message().starts_with(&format!(
                        "quota: vcpus of institution {}-a would be 51, 1 over its limit of 50",
                        cluster.prefix
                    )),
                    "{}",
                    s.message()
                );
            }
        }
    }
    assert_eq!(approved, 50);
    let inst = op
        .identity
        .clone()
        .get_institution(GetInstitutionRequest { id: p.inst_a })
        .await?
        .into_inner();
    assert_eq!(inst.used.unwrap().vcpus, 50);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_expire_and_can_be_revoked() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        hosts: vec![],
        ..Default::default()
    })
    .await?;
    let member = cluster.clients(&cluster.people.member_a).await?;
    let short = member
        .identity
        .clone()
        .create_token(CreateTokenRequest {
            name: "short".into(),
            ttl_seconds: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let long = member
        .identity
        .clone()
        .create_token(CreateTokenRequest {
            name: "long".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let with_short = cluster.clients(&short.secret).await?;
    let with_long = cluster.clients(&long.secret).await?;
    with_short
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await?;
    with_long
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await?;
    // Each token's use is recorded, with the address it came from.
    let long_id = long.token.clone().unwrap().id;
    let used = betang_tests::eventually(T, "the long token's use recorded", || async {
        let list = member
            .identity
            .clone()
            .list_tokens(ListTokensRequest::default())
            .await
            .ok()?
            .into_inner();
        list.tokens
            .into_iter()
            .find(|t| t.id == long_id && t.last_used_at_ms != 0)
    })
    .await?;
    assert_eq!(used.last_used_from, "127.0.0.1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = with_short
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    member
        .identity
        .clone()
        .revoke_token(RevokeTokenRequest {
            id: long.token.unwrap().id,
        })
        .await?;
    let err = with_long
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Only the hash is stored: the secret appears nowhere in the database file.
    let db = std::fs::read(cluster.controller_cfg.data_dir.join("betang.db"))?;
    let needle = short.secret.as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle));
    Ok(())
}

/// A disabled user's tokens stop at once, and so do those of every user of
/// a disabled institution; enabling brings them back. Only admins may, and
/// never against themselves; each change is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabled_users_and_institutions_are_shut_out_until_enabled() -> anyhow::Result<()> {
    use betang_proto::v1::SetEnabledRequest;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let p = &cluster.people;
    let admin = cluster.clients(&p.admin).await?;
    let member = cluster.clients(&p.member_a).await?;
    let operator = cluster.clients(&p.operator).await?;
    let who = |c: &Clients| {
        let mut c = c.identity.clone();
        async move { code(c.who_am_i(WhoAmIRequest {}).await) }
    };
    assert_eq!(who(&member).await, Code::Ok);
    let me = member
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner();
    let set_user = |c: &Clients, id: &str, enabled: bool| {
        let (mut c, id) = (c.identity.clone(), id.to_owned());
        async move { c.set_user_enabled(SetEnabledRequest { id, enabled }).await }
    };
    // Members and operators may not; admins may, by username.
    assert_eq!(
        code(set_user(&member, &me.username, false).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(set_user(&operator, &me.username, false).await),
        Code::PermissionDenied
    );
    let u = set_user(&admin, &me.username, false).await?.into_inner();
    assert!(u.disabled_at_ms > 0);
    let denied = member
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    assert!(
        denied.message().contains("disabled"),
        "{}",
        denied.message()
    );
    set_user(&admin, &me.id, true).await?;
    assert_eq!(who(&member).await, Code::Ok);
    // An admin cannot lock themselves out.
    let admin_me = admin
        .identity
        .clone()
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(
        code(set_user(&admin, &admin_me.id, false).await),
        Code::InvalidArgument
    );
    // A disabled institution shuts out its users, by code; the other
    // institution's users are not touched.
    let code_a = format!("{}-a", cluster.prefix);
    let mut ids = admin.identity.clone();
    let i = ids
        .set_institution_enabled(SetEnabledRequest {
            id: code_a.clone(),
            enabled: false,
        })
        .await?
        .into_inner();
    assert!(i.disabled_at_ms > 0);
    assert_eq!(who(&member).await, Code::Unauthenticated);
    let member_b = cluster.clients(&p.member_b).await?;
    assert_eq!(who(&member_b).await, Code::Ok);
    ids.set_institution_enabled(SetEnabledRequest {
        id: code_a,
        enabled: true,
    })
    .await?;
    assert_eq!(who(&member).await, Code::Ok);
    let audit = admin
        .audit
        .clone()
        .list_audit(ListAuditRequest {
            action: "user".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let actions: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.action != "user.create")
        .map(|r| r.action.as_str())
        .collect();
    assert_eq!(actions, ["user.disable", "user.enable"]);
    Ok(())
}

/// User-data (up to 64 KiB, and often holding secrets) comes back only from
/// GetVps, never in a list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_never_carry_user_data() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.as_operator().await?;
    let mut spec = cluster.spec("data");
    spec.user_data = "#cloud-config\nchpasswd: {list: 'root:s3cret'}\n".into();
    let v = op
        .vps
        .clone()
        .create_vps(cluster.create(spec.clone()))
        .await?
        .into_inner();
    let listed = op
        .vps
        .clone()
        .list_vps(ListVpsRequest::default())
        .await?
        .into_inner()
        .vps;
    let mine = listed.iter().find(|l| l.id == v.id).expect("listed");
    assert_eq!(mine.spec.as_ref().unwrap().user_data, "");
    assert_eq!(mine.spec.as_ref().unwrap().name, spec.name);
    let got = op
        .vps
        .clone()
        .get_vps(GetVpsRequest {
            id: v.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(got.spec.unwrap().user_data, spec.user_data);
    Ok(())
}
