//! The real `betangctl` binary against an in-process cluster, as an operator
//! would type it: what it prints and how it exits.

use std::process::Output;

use betang_tests::{Cluster, ClusterOptions};

/// Runs `betangctl ARGS` with `token` against the cluster; never reads a
/// config file of the machine's.
async fn betangctl(cluster: &Cluster, token: &str, args: &[&str]) -> anyhow::Result<Output> {
    let bin = betang_tests::chaos::default_bin_dir()?.join("betangctl");
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .env("BETANG_ENDPOINT", &cluster.endpoint)
        .env("BETANG_TOKEN", token)
        .env(
            "BETANG_CONFIG",
            cluster.dir.path().join("no-such-config.toml"),
        )
        .env("HOME", cluster.dir.path())
        .output()
        .await?;
    Ok(out)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Setting one limit changes that limit only, and the institution is found
/// by its code as well as its id; a call that names no limit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_change_touches_only_the_limits_it_names() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let admin = cluster.people.admin.clone();
    let code = format!("{}-a", cluster.prefix);
    let q = ClusterOptions::default().quota;
    let out = betangctl(
        &cluster,
        &admin,
        &["institution", "quota", &code, "--vcpus", "4"],
    )
    .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "used:      0/4 vCPU, 0/{} MiB, 0/{} GiB, 0/{} VPS",
            q.memory_mib, q.disk_gib, q.vps_count
        )),
        "{stdout}"
    );
    let id = cluster.people.inst_a.clone();
    let out = betangctl(
        &cluster,
        &admin,
        &["institution", "quota", &id, "--vps", "3"],
    )
    .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("/4 vCPU, 0/{} MiB", q.memory_mib)),
        "{stdout}"
    );
    assert!(stdout.contains("0/3 VPS"), "{stdout}");
    let out = betangctl(&cluster, &admin, &["institution", "quota", &code]).await?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("change: name at least one limit"),
        "{stderr}"
    );
    let out = betangctl(
        &cluster,
        &admin,
        &["institution", "quota", "no-such", "--vcpus", "1"],
    )
    .await?;
    assert!(!out.status.success());
    assert!(text(&out).1.contains("not found"), "{}", text(&out).1);
    Ok(())
}

/// A host's allocation reads against what may be placed on it (after the
/// reserve and the overcommit ratio), as placement measures it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_allocation_reads_against_what_may_be_placed() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.people.operator.clone();
    let out = betangctl(&cluster, &op, &["host", "get", &cluster.hosts[0].host_id]).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // 8 vCPUs at the default ratio of 4; memory and disk at ratio 1 (the
    // test controller keeps no reserve).
    assert!(
        stdout.contains("allocated:  0/32 vCPU, 0/16384 MiB, 0/500 GiB (of what may be placed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("capacity:   8 vCPU, 16384 MiB, 500 GiB"),
        "{stdout}"
    );
    Ok(())
}
