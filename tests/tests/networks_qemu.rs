//! Addresses on the real libvirtd with real guests: a bridge with no uplink
//! and a client in a network namespace of the test's own, on addresses from
//! 198.18.0.0/15, so nothing can route off the machine. The guests configure
//! themselves from the seed's network-config and answer on TCP port 80 with
//! their hostname. A guest that takes another's address is dropped by
//! libvirt's clean-traffic filter, and a deleted VPS's address serves the
//! next one. Every interface and namespace is removed, even on failure.
//!
//! Needs root, libvirtd and the nwfilter package (`deploy/test.sh` provides
//! them); fails, never skips, when they are missing.

use std::time::Duration;

use betang_proto::v1::{DeleteVpsRequest, NetworkAttachment, Quota, StopVpsRequest, Vps, VpsState};
use betang_tests::{Clients, eventually, lan::Lan, real::RealHost, wait_state};

const T: Duration = Duration::from_secs(240);

async fn running(
    host: &RealHost,
    op: &Clients,
    name: &str,
    user_data: &str,
) -> anyhow::Result<(Vps, NetworkAttachment)> {
    let mut req = host.small_vps(name);
    if let Some(s) = req.spec.as_mut() {
        s.user_data = user_data.into();
    }
    let v = op.vps.clone().create_vps(req).await?.into_inner();
    let at = v.attachment.clone().expect("an address with the placement");
    wait_state(&op.vps, &v.id, VpsState::Running, T).await?;
    Ok((v, at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guests_answer_at_their_addresses_and_a_spoofer_is_dropped() -> anyhow::Result<()> {
    let host = RealHost::start(Quota {
        vcpus: 8,
        memory_mib: 2048,
        disk_gib: 10,
        vps_count: 8,
    })
    .await?;
    let lan = Lan::create()?;
    let op = host.operator().await?;
    let name = lan.define_network(&op, &host.people.inst_a).await?;

    // Two guests, each at its own address.
    let (a, at_a) = running(&host, &op, "web-a", "").await?;
    let (b, at_b) = running(&host, &op, "web-b", "").await?;
    assert_ne!(at_a.ip_address, at_b.ip_address);
    for (v, at) in [(&a, &at_a), (&b, &at_b)] {
        host.serial_says(&v.id, &format!("BETANG-ADDRESS={}/28", at.ip_address), T)
            .await?;
        let hostname = v.spec.clone().unwrap_or_default().name;
        let heard = eventually(T, "the guest answers at its address", || async {
            lan.ask(&at.ip_address)
        })
        .await?;
        assert_eq!(heard, format!("BETANG-HOSTNAME={hostname}"));
    }

    // A third guest takes the first one's address: with the first stopped,
    // nothing answers there, because the filter drops what the third sends
    // from an address that is not its own.
    let spoof = format!(
        "#cloud-config\n#betang-test-address: {}/28\n",
        at_a.ip_address
    );
    let (c, at_c) = running(&host, &op, "spoofer", &spoof).await?;
    host.serial_says(&c.id, &format!("BETANG-ADDRESS={}/28", at_a.ip_address), T)
        .await?;
    op.vps
        .clone()
        .stop_vps(StopVpsRequest {
            id: a.id.clone(),
            force: true,
            ..Default::default()
        })
        .await?;
    wait_state(&op.vps, &a.id, VpsState::Stopped, T).await?;
    for _ in 0..3 {
        assert_eq!(lan.ask(&at_a.ip_address), None, "the spoofer is dropped");
    }
    assert_eq!(lan.ask(&at_c.ip_address), None, "it never took its own");
    assert!(
        lan.ask(&at_b.ip_address).is_some(),
        "the other still answers"
    );
    // The agent's metrics name each guest's address.
    let metrics = host.agent().metrics_addr.expect("metrics_listen is set");
    let body = betang_tests::http_get(metrics, "/metrics").await?;
    assert_eq!(
        betang_tests::sample(
            &body,
            "betang_vm_address_info",
            &[
                ("vps_id", &b.id),
                ("network", &name),
                ("address", &at_b.ip_address)
            ]
        ),
        Some(1.0),
        "{body}"
    );

    // Deleted, the first one's address serves the next VPS.
    op.vps
        .clone()
        .delete_vps(DeleteVpsRequest { id: a.id.clone() })
        .await?;
    wait_state(&op.vps, &a.id, VpsState::Deleted, T).await?;
    let (d, at_d) = running(&host, &op, "web-d", "").await?;
    assert_eq!(at_d.ip_address, at_a.ip_address);
    let hostname = d.spec.clone().unwrap_or_default().name;
    let heard = eventually(T, "the next VPS answers at the freed address", || async {
        lan.ask(&at_d.ip_address)
    })
    .await?;
    assert_eq!(heard, format!("BETANG-HOSTNAME={hostname}"));

    for v in [&b, &c, &d] {
        op.vps
            .clone()
            .delete_vps(DeleteVpsRequest { id: v.id.clone() })
            .await?;
    }
    for v in [&b, &c, &d] {
        wait_state(&op.vps, &v.id, VpsState::Deleted, T).await?;
    }
    println!(
        "{}",
        serde_json::json!({
            "network": lan.cidr(),
            "guest_addresses": [at_b.ip_address, at_d.ip_address],
        })
    );
    Ok(())
}
