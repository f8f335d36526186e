//! The serial console of a real guest through the controller: a member of
//! the owning institution gets a shell that runs what they type, a viewer
//! sees it, a second writer is refused unless it takes over, another
//! institution's member gets NotFound, and opening and closing are audited.
//!
//! Needs root and libvirtd (`deploy/test.sh` provides both); fails, never
//! skips, when they are missing.

use std::time::Duration;

use betang_proto::v1::{ListAuditRequest, Quota, VpsState};
use betang_tests::{Clients, console::Session, eventually, real::RealHost, wait_state};
use tonic::Code;

const T: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_gets_a_shell_on_the_console_and_no_one_else_does() -> anyhow::Result<()> {
    let host = RealHost::start(Quota {
        vcpus: 4,
        memory_mib: 1024,
        disk_gib: 10,
        vps_count: 4,
    })
    .await?;
    let op = host.operator().await?;
    let v = op
        .vps
        .clone()
        .create_vps(host.small_vps("console"))
        .await?
        .into_inner();
    wait_state(&op.vps, &v.id, VpsState::Running, T).await?;
    host.serial_says(&v.id, "BETANG-CONSOLE-READY", T).await?;

    // Another institution's member: as if there were no such VPS.
    let other = Clients::connect(&host.endpoint, Some(&host.people.member_b)).await?;
    let e = Session::open(&other, &v.id, true, false)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // The owner's member types; the shell runs it.
    let member = host.member().await?;
    let writer = Session::open(&member, &v.id, false, false).await?;
    writer.type_in("\necho $((6*7))\n").await;
    writer.until("42").await?;

    // A second writer is refused; a viewer sees what the writer does.
    let e = Session::open(&op, &v.id, false, false)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let viewer = Session::open(&op, &v.id, true, false).await?;
    viewer.until("watching").await?;
    viewer.type_in("echo ignored-$((2+2))\n").await;
    writer.type_in("echo seen-$((1+1))\n").await;
    viewer.until("seen-2").await?;
    writer.until("seen-2").await?;
    assert!(
        !writer.seen().contains("ignored-4"),
        "a viewer's keys never reach the guest"
    );

    // Taking over: the operator types, the member's keys no longer count.
    let taker = Session::open(&op, &v.id, false, true).await?;
    writer.type_in("echo stale-$((3+3))\n").await;
    taker.type_in("echo taken-$((4+4))\n").await;
    taker.until("taken-8").await?;
    assert!(!taker.seen().contains("stale-6"), "{}", taker.seen());

    drop((writer, viewer, taker));
    let audit = eventually(T, "opening and closing audited", || async {
        let records = op
            .audit
            .clone()
            .list_audit(ListAuditRequest {
                action: "vps.console.".into(),
                target: v.id.clone(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .records;
        let closed = records
            .iter()
            .filter(|r| r.action == "vps.console.close")
            .count();
        (closed == 3).then_some(records)
    })
    .await?;
    let opened: Vec<&str> = audit
        .iter()
        .filter(|r| r.action == "vps.console.open")
        .map(|r| r.result.as_str())
        .collect();
    assert_eq!(opened.len(), 3, "{audit:?}");
    assert!(opened.contains(&"viewer") && opened.contains(&"writer"));
    Ok(())
}
