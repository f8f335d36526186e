//! A tenant's disk survives what once destroyed one, on the real libvirtd:
//! a refreshed image published the ordinary way (a new file, the catalogue
//! entry pointed at it, the agent restarted), then the domain lost from
//! libvirt. The agent defines the VM again on the disk the VPS already has,
//! based on the image it was built on, and the data written into it is still
//! there. When the base under a disk was overwritten in place, the agent
//! stops with a reason and keeps the disk byte for byte.
//!
//! Needs root and libvirtd (`deploy/test.sh` provides both); fails, never
//! skips, when they are missing.

use std::time::Duration;

use betang_proto::v1::{DeleteVpsRequest, GetVpsRequest, Quota, StopVpsRequest, VpsState};
use betang_tests::{
    eventually,
    real::{RealHost, qemu_io, write_catalogue},
    state_of, wait_state,
};

const T: Duration = Duration::from_secs(180);

fn sha256_of(path: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {}", path.display());
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn backing_file(disk: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(disk)
        .output()?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(info["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refreshed_image_and_a_lost_domain_keep_the_tenants_data() -> anyhow::Result<()> {
    let quota = Quota {
        vcpus: 4,
        memory_mib: 1024,
        disk_gib: 10,
        vps_count: 2,
    };
    let mut host = RealHost::start(quota).await?;
    let mut c = host.operator().await?.vps;
    let v = c.create_vps(host.small_vps("keep")).await?.into_inner();
    let id = v.id.clone();
    let v = wait_state(&c, &id, VpsState::Running, T).await?;
    assert_eq!(
        v.image_digest.len(),
        64,
        "the VPS records its image's digest"
    );
    c.stop_vps(StopVpsRequest {
        id: id.clone(),
        timeout_seconds: 1,
        force: true,
    })
    .await?;
    wait_state(&c, &id, VpsState::Stopped, T).await?;
    let disk = host.root_disk(&id);
    let v1 = host.image_dir.join("betang-test.qcow2");
    assert_eq!(backing_file(&disk)?, v1.display().to_string());
    qemu_io(&disk, "write -P 0xab 512M 1M")?;

    // A refreshed image, published the ordinary way: a new file with other
    // bytes, the catalogue entry pointed at it, the agent restarted.
    let v2 = host.image_dir.join("betang-test-v2.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-c", "-f", "qcow2", "-O", "qcow2"])
        .arg(&v1)
        .arg(&v2)
        .status()?;
    anyhow::ensure!(st.success(), "qemu-img convert");
    assert_ne!(sha256_of(&v1)?, sha256_of(&v2)?);
    write_catalogue(&host.image_dir, "betang-test-v2.qcow2")?;
    host.start_agent().await?;

    // The domain disappears from libvirt (an operator's `virsh undefine`).
    host.domain(&id).expect("domain").undefine()?;
    let dom = eventually(T, "the domain defined again", || {
        let d = host.domain(&id);
        async move { d }
    })
    .await?;
    assert!(!dom.is_active()?, "it was stopped and stays stopped");
    wait_state(&c, &id, VpsState::Stopped, T).await?;
    // On the same disk, still based on the image it was built on, data intact.
    assert_eq!(backing_file(&disk)?, v1.display().to_string());
    let read = qemu_io(&disk, "read -P 0xab 512M 1M")?;
    assert!(read.contains("read 1048576/1048576"), "{read}");

    // The base under the disk overwritten in place: the agent refuses to use
    // the disk, says which file and why, and keeps it byte for byte.
    let before = sha256_of(&disk)?;
    std::fs::copy(&v2, &v1)?;
    host.domain(&id).expect("domain").undefine()?;
    let v = eventually(T, "the VPS to stop with a reason", || {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            let v = c
                .get_vps(GetVpsRequest {
                    id,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (state_of(&v) == VpsState::Error).then_some(v)
        }
    })
    .await?;
    assert!(v.state_reason.contains("root.qcow2"), "{}", v.state_reason);
    assert!(v.state_reason.contains("sha256"), "{}", v.state_reason);
    // Nothing cleans it up behind the operator's back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(host.domain(&id).is_none());
    assert_eq!(sha256_of(&disk)?, before, "the disk was not touched");

    // Only the tenant's own delete removes it.
    c.delete_vps(DeleteVpsRequest { id: id.clone() }).await?;
    wait_state(&c, &id, VpsState::Deleted, T).await?;
    assert!(!host.vm_dir.join(&id).exists());
    Ok(())
}
