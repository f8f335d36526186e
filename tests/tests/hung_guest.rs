//! A guest that stops answering, through the API, on simulated hosts: a
//! reboot under way reads "rebooting"; once the guest is known not to answer
//! its VPS says since when, a reboot is refused at once with the reason, its
//! neighbour is untouched, and a forced stop still works.

use std::time::Duration;

use betang_agent::names;
use betang_proto::v1::{
    GetVpsRequest, RebootVpsRequest, StopVpsRequest, Vps, VpsState,
    vps_service_client::VpsServiceClient,
};
use betang_tests::{Authed, Cluster, ClusterOptions, eventually, wait_state};

const T: Duration = Duration::from_secs(30);

async fn get(c: &VpsServiceClient<Authed>, id: &str) -> Option<Vps> {
    c.clone()
        .get_vps(GetVpsRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_guest_shows_itself_and_only_a_forced_stop_acts_on_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        simulated: true,
        hosts: vec![ClusterOptions::default().hosts[0]],
        ..ClusterOptions::default()
    })
    .await?;
    let mut c = cluster.as_operator().await?.vps;
    let hung = c
        .create_vps(cluster.create(cluster.spec("hung")))
        .await?
        .into_inner()
        .id;
    let calm = c
        .create_vps(cluster.create(cluster.spec("calm")))
        .await?
        .into_inner()
        .id;
    for id in [&hung, &calm] {
        wait_state(&c, id, VpsState::Running, T).await?;
    }
    let sim = cluster.hosts[0]
        .simulated
        .clone()
        .expect("a simulated host");
    let domain = names::domain_name(&hung);

    // A reboot the guest does not get through reads "rebooting" meanwhile.
    sim.hang(&domain);
    struct Release(
        std::sync::Arc<betang_agent::hypervisor::SimulatedHypervisor>,
        String,
    );
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release(&self.1);
        }
    }
    let release = Release(sim.clone(), domain.clone());
    let reboot = tokio::spawn({
        let mut c = c.clone();
        let id = hung.clone();
        async move {
            c.reboot_vps(RebootVpsRequest { id, force: false })
                .await
                .map(|_| ())
        }
    });
    eventually(T, "the VPS reads rebooting", || async {
        let v = get(&c, &hung).await?;
        (v.power_change == "rebooting").then_some(())
    })
    .await?;
    drop(release);
    reboot.await??;
    let v = get(&c, &hung).await.expect("the VPS");
    assert_eq!(v.power_change, "", "done rebooting");

    // Hung for good: reported, and only it.
    sim.hang(&domain);
    let _release = Release(sim.clone(), domain.clone());
    let v = eventually(T, "the guest reported as not answering", || async {
        let v = get(&c, &hung).await?;
        (v.unresponsive_since_ms != 0).then_some(v)
    })
    .await?;
    assert_eq!(v.state, VpsState::Running as i32);
    let other = get(&c, &calm).await.expect("the other VPS");
    assert_eq!(other.unresponsive_since_ms, 0);
    assert_eq!(other.state, VpsState::Running as i32);
    let started = std::time::Instant::now();
    let err = c
        .reboot_vps(RebootVpsRequest {
            id: hung.clone(),
            force: true,
        })
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert!(
        err.message().contains("has not answered") && err.message().contains("forced stop"),
        "{}",
        err.message()
    );
    // The other guest reboots as usual.
    c.reboot_vps(RebootVpsRequest {
        id: calm.clone(),
        force: false,
    })
    .await?;
    // A forced stop needs no answer from the guest.
    c.stop_vps(StopVpsRequest {
        id: hung.clone(),
        timeout_seconds: 1,
        force: true,
    })
    .await?;
    let v = wait_state(&c, &hung, VpsState::Stopped, T).await?;
    assert_eq!(
        v.unresponsive_since_ms, 0,
        "a stopped guest has nothing to answer"
    );
    Ok(())
}
