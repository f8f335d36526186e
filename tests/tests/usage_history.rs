//! Usage history through the API: GetVps shows a VPS's recent use, and the
//! usage report gives each institution its allocation hours, to its own
//! people only.

use std::time::Duration;

use betang_proto::v1::{GetVpsRequest, UsageReportRequest, VpsState};
use betang_tests::{Cluster, ClusterOptions, eventually, wait_state};
use tonic::Code;

/// Generous: a loaded two-core machine may run the whole suite beside a build.
const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_and_the_usage_report() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut op = cluster.vps_client().await?;
    let started = betang_controller::now_ms();
    let v = op
        .create_vps(cluster.create(cluster.spec("h")))
        .await?
        .into_inner();
    wait_state(&op, &v.id, VpsState::Running, T).await?;

    // Points arrive with the heartbeats; a plain GetVps carries none.
    let history = eventually(T, "two minutes of history", || {
        let (mut op, id) = (op.clone(), v.id.clone());
        async move {
            let h = op
                .get_vps(GetVpsRequest {
                    id,
                    history_minutes: 10,
                })
                .await
                .ok()?
                .into_inner()
                .history;
            (!h.is_empty()).then_some(h)
        }
    })
    .await?;
    let p = &history[0];
    assert_eq!(p.step_seconds, 60);
    assert!(p.at_ms % 60_000 == 0 && p.at_ms >= started - 60_000);
    assert!(p.cpu_rate >= 0.0);
    let plain = op
        .get_vps(GetVpsRequest {
            id: v.id.clone(),
            history_minutes: 0,
        })
        .await?
        .into_inner();
    assert!(plain.history.is_empty());
    let long = op
        .get_vps(GetVpsRequest {
            id: v.id.clone(),
            history_minutes: 3 * 24 * 60,
        })
        .await?
        .into_inner();
    assert!(long.history.iter().all(|p| p.step_seconds == 3600));
    let err = op
        .get_vps(GetVpsRequest {
            id: v.id.clone(),
            history_minutes: 90 * 24 * 60 + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("history_minutes"),
        "{}",
        err.message()
    );

    // The report: allocation held since the VPS was placed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = betang_controller::now_ms();
    let report = op
        .get_usage_report(UsageReportRequest {
            from_ms: started - 1000,
            to_ms: now + 3_600_000,
            institution_id: String::new(),
        })
        .await?
        .into_inner();
    let a = report
        .institutions
        .iter()
        .find(|i| i.institution_id == cluster.people.inst_a)
        .expect("institution A in the report");
    let b = report
        .institutions
        .iter()
        .find(|i| i.institution_id == cluster.people.inst_b)
        .expect("institution B in the report");
    assert_eq!(a.vps_count, 1);
    // 1 vCPU held for at most the time since `started`, and at least 0.5 s.
    let held_h = (betang_controller::now_ms() - started) as f64 / 3_600_000.0;
    assert!(
        a.vcpu_hours > 0.5 / 3600.0 && a.vcpu_hours <= held_h,
        "{a:?}"
    );
    assert!(
        (a.memory_gib_hours - a.vcpu_hours * 0.5).abs() < 1e-9,
        "{a:?}"
    );
    assert_eq!((b.vps_count, b.vcpu_hours), (0, 0.0));
    let csv = betang_controller::report::usage_csv(&report)?;
    assert_eq!(csv.lines().count(), 1 + report.institutions.len());

    // Members see their own institution only; another's does not exist for them.
    let member = cluster.clients(&cluster.people.member_a).await?;
    let own = member
        .vps
        .clone()
        .get_usage_report(UsageReportRequest {
            from_ms: started - 1000,
            to_ms: now + 1000,
            institution_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(own.institutions.len(), 1);
    assert_eq!(own.institutions[0].institution_id, cluster.people.inst_a);
    let err = member
        .vps
        .clone()
        .get_usage_report(UsageReportRequest {
            from_ms: started - 1000,
            to_ms: now + 1000,
            institution_id: cluster.people.inst_b.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Bad periods name the field and the rule.
    for (from_ms, to_ms, field) in [
        (now, now, "to_ms"),
        (-1, now, "from_ms"),
        (0, 400 * 24 * 3_600_000, "to_ms"),
    ] {
        let err = op
            .get_usage_report(UsageReportRequest {
                from_ms,
                to_ms,
                institution_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    Ok(())
}
