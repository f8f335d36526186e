//! Reach benchmark, on the real libvirtd with real guests of the offline
//! test image: the time from CreateVps to the guest answering TCP at its
//! address, against the same image and seed booted with plain `virsh create`
//! in the same run; then a console keystroke's round trip through the
//! controller. The guests sit on a bridge with no uplink, asked from a
//! network namespace of the benchmark's own, on 198.18.0.0/15. Prints
//! figures, then one line of JSON.
//!
//! `bash deploy/bench-reach.sh --rounds 5 --keystrokes 200`

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use betang_proto::v1::{DeleteVpsRequest, Quota, VpsState};
use betang_tests::{
    bench::{arg, pct},
    console::Session,
    lan::Lan,
    real::RealHost,
    wait_state,
};

const T: Duration = Duration::from_secs(240);

/// A transient domain of the floor's, destroyed (and so gone) when dropped.
struct Floor {
    name: String,
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", betang_tests::real::URI, "destroy", &self.name])
            .output();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What Betang made for `id` (its domain's XML, its seed, its disk's
/// base and size), made again for plain libvirt under `dir`: a fresh
/// overlay on the same base, a copy of the same seed, the same devices.
fn floor_copy(host: &RealHost, id: &str, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let theirs = host.vm_dir.join(id);
    std::fs::copy(theirs.join("seed.img"), dir.join("seed.img"))?;
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json"])
        .arg(theirs.join("root.qcow2")))?)?;
    let base = info["full-backing-filename"]
        .as_str()
        .context("Betang's disk has a base")?;
    let size = info["virtual-size"].as_u64().context("a virtual size")?;
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base])
        .arg(dir.join("root.qcow2"))
        .arg(size.to_string()))?;
    let dom = host.domain(id).context("Betang's domain")?;
    // The definition, not the running state: as it would be written by hand.
    let xml = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
    let mut xml = xml
        .replace(
            &format!("{}/", theirs.display()),
            &format!("{}/", dir.display()),
        )
        .replace(
            &format!("<name>betang-{id}</name>"),
            &format!("<name>{name}</name>"),
        );
    for tag in ["uuid", "metadata"] {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        if let (Some(a), Some(b)) = (xml.find(&open), xml.find(&close)) {
            xml.replace_range(a..b + close.len(), "");
        }
    }
    let file = dir.join("domain.xml");
    std::fs::write(&file, xml)?;
    Ok(file)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 5);
    let keystrokes = arg("--keystrokes", 200);
    let host = RealHost::start(Quota {
        vcpus: 8,
        memory_mib: 2048,
        disk_gib: 10,
        vps_count: 8,
    })
    .await?;
    let lan = Lan::create()?;
    let op = host.operator().await?;
    lan.define_network(&op, &host.people.inst_a).await?;
    let floor_root = host
        .vm_dir
        .parent()
        .context("the test directory")?
        .join("floor");

    let (mut betang, mut floor) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Betang: the API call, placement, the agent's disk and seed, libvirt.
        let t = Instant::now();
        let v = op
            .vps
            .clone()
            .create_vps(host.small_vps(&format!("reach-{round}")))
            .await?
            .into_inner();
        let at = v.attachment.clone().context("an address")?.ip_address;
        let heard = lan.wait_answer(&at, T).await?;
        betang.push(t.elapsed());
        anyhow::ensure!(heard.starts_with("BETANG-HOSTNAME="), "{heard}");
        let name = format!("{}-floor-{round}", host.prefix);
        let xml = floor_copy(&host, &v.id, &floor_root.join(round.to_string()), &name)?;
        op.vps
            .clone()
            .delete_vps(DeleteVpsRequest { id: v.id.clone() })
            .await?;
        wait_state(&op.vps, &v.id, VpsState::Deleted, T).await?;

        // The floor: the same image, seed, devices and address, `virsh create`.
        let t = Instant::now();
        let _floor = Floor { name };
        run(Command::new("virsh")
            .args(["-c", betang_tests::real::URI, "create"])
            .arg(&xml))?;
        let heard_floor = lan.wait_answer(&at, T).await?;
        floor.push(t.elapsed());
        anyhow::ensure!(heard_floor == heard, "{heard_floor} is not {heard}");
        println!(
            "round {round}: Betang {:.2} s, virsh create {:.2} s",
            betang[round].as_secs_f64(),
            floor[round].as_secs_f64()
        );
    }

    // A keystroke's round trip: typed by a member through the controller,
    // echoed by the guest's shell, read back the same way.
    let v = op
        .vps
        .clone()
        .create_vps(host.small_vps("console"))
        .await?
        .into_inner();
    wait_state(&op.vps, &v.id, VpsState::Running, T).await?;
    host.serial_says(&v.id, "BETANG-CONSOLE-READY", T).await?;
    let member = host.member().await?;
    let console = Session::open(&member, &v.id, false, false).await?;
    console.type_in("\n").await;
    console.until("#").await?;
    let mut round_trips = Vec::with_capacity(keystrokes);
    let letters: Vec<char> = ('a'..='y').collect();
    while round_trips.len() < keystrokes {
        // A comment: Enter runs nothing and prints only the next prompt.
        console.type_in("# ").await;
        for &key in letters.iter().take(keystrokes - round_trips.len()) {
            round_trips.push(console.echo(key, Duration::from_secs(5)).await?);
        }
        console.type_in("\n").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(console);
    round_trips.sort();
    op.vps
        .clone()
        .delete_vps(DeleteVpsRequest { id: v.id.clone() })
        .await?;
    wait_state(&op.vps, &v.id, VpsState::Deleted, T).await?;

    let secs = |d: &[Duration]| d.iter().map(Duration::as_secs_f64).collect::<Vec<_>>();
    let (mut b, mut f) = (betang.clone(), floor.clone());
    b.sort();
    f.sort();
    let (bm, fm) = (pct(&b, 0.5) / 1000.0, pct(&f, 0.5) / 1000.0);
    let ratio = bm / fm;
    println!(
        "CreateVps to TCP answer: median {bm:.2} s; virsh create of the same: median {fm:.2} s; {ratio:.2}x (goal 1.2x) over {rounds} rounds"
    );
    println!(
        "console keystroke round trip through the controller: p50 {:.2} ms, p99 {:.2} ms over {} keys (goal p99 < 50 ms)",
        pct(&round_trips, 0.5),
        pct(&round_trips, 0.99),
        round_trips.len()
    );
    println!(
        "{}",
        serde_json::json!({
            "rounds": rounds,
            "betang_create_to_tcp_s": secs(&betang),
            "virsh_create_to_tcp_s": secs(&floor),
            "betang_median_s": bm,
            "virsh_median_s": fm,
            "ratio": (ratio * 1000.0).round() / 1000.0,
            "console_keystrokes": round_trips.len(),
            "console_p50_ms": pct(&round_trips, 0.5),
            "console_p99_ms": pct(&round_trips, 0.99),
        })
    );
    Ok(())
}
