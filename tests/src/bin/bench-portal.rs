//! Portal benchmark: a full data center behind the portal. An in-process
//! controller with 100 real agents on the simulated hypervisor, 100
//! institutions and 20,000 VPS, plus requests waiting for approval; then
//! every page, asked by an operator and by a member over HTTP on loopback,
//! timed. Prints figures, then one line of JSON.
//!
//! `bash deploy/bench-portal.sh --vps 20000 --institutions 100 --rounds 50`

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use betang_agent::config::CapacityConfig;
use betang_proto::v1::{CreateInstitutionRequest, CreateVpsRequest, Quota, WhoAmIRequest};
use betang_tests::{
    Cluster, ClusterOptions, application,
    bench::{arg, pct},
    portal::Visitor,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = arg("--vps", 20_000);
    let institutions = arg("--institutions", 100).max(2);
    let rounds = arg("--rounds", 50);
    let waiting = arg("--waiting", 200);
    let quota = Quota {
        vcpus: 1 << 20,
        memory_mib: 1 << 40,
        disk_gib: 1 << 30,
        vps_count: 1 << 20,
    };
    let cluster = Cluster::start(ClusterOptions {
        hosts: vec![
            CapacityConfig {
                vcpus: 256,
                memory_mib: 1 << 21,
                disk_gib: 1 << 20,
            };
            100
        ],
        heartbeat_ms: 2_000,
        down_after_ms: 10_000,
        quota,
        simulated: true,
        ..Default::default()
    })
    .await?;
    let addr = cluster
        .controller
        .as_ref()
        .and_then(|c| c.portal_addr)
        .expect("portal_listen is set");
    let admin = cluster.clients(&cluster.people.admin).await?;
    let op = cluster.as_operator().await?;
    let mut ids = vec![cluster.people.inst_a.clone(), cluster.people.inst_b.clone()];
    for i in ids.len()..institutions {
        let inst = admin
            .identity
            .clone()
            .create_institution(CreateInstitutionRequest {
                code: format!("opd-{i:03}"),
                name: format!("Organisasi Perangkat Daerah {i}"),
                quota: Some(quota),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.push(inst.id);
    }

    // The data center's VPS, created directly by operators, four at a time.
    let started = Instant::now();
    let ids = Arc::new(ids);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (mut vps, ids, next) = (op.vps.clone(), ids.clone(), next.clone());
        let prefix = cluster.prefix.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let mut spec = betang_proto::v1::VpsSpec {
                    name: format!("{prefix}-vps-{i}"),
                    vcpus: 1,
                    memory_mib: 512,
                    disk_gib: 5,
                    image: "tiny".into(),
                    ..Default::default()
                };
                spec.name.truncate(63);
                vps.create_vps(CreateVpsRequest {
                    request_id: format!("bench-portal-{i}"),
                    spec: Some(spec),
                    application: Some(application()),
                    institution_id: ids[i % ids.len()].clone(),
                    ..Default::default()
                })
                .await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let placed_in = started.elapsed();
    // Requests waiting for approval, from a member.
    let member = cluster.clients(&cluster.people.member_a).await?;
    for i in 0..waiting {
        let mut spec = cluster.spec(&format!("wait-{i}"));
        spec.name.truncate(63);
        member
            .vps
            .clone()
            .create_vps(CreateVpsRequest {
                request_id: format!("bench-portal-wait-{i}"),
                spec: Some(spec),
                application: Some(application()),
                ..Default::default()
            })
            .await?;
    }

    let name = |c: &betang_tests::Clients| {
        let mut i = c.identity.clone();
        async move { anyhow::Ok(i.who_am_i(WhoAmIRequest {}).await?.into_inner().username) }
    };
    let mut operator =
        Visitor::join(addr, &admin, &name(&op).await?, "bench-operator-password").await?;
    let mut reader =
        Visitor::join(addr, &admin, &name(&member).await?, "bench-member-password").await?;
    let list = operator.get("/vps").await?;
    let second = list
        .body
        .split("href=\"/vps?page=")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(|t| format!("/vps?page={t}"))
        .unwrap_or_else(|| "/vps".into());
    let one = list
        .body
        .split("<tr data-id=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(|id| format!("/vps/{id}"))
        .unwrap_or_else(|| "/vps".into());
    let pages: Vec<(&str, String, bool)> = vec![
        ("operator: VPS list, first page", "/vps".into(), true),
        ("operator: VPS list, second page", second, true),
        ("operator: one VPS", one, true),
        ("operator: approval queue", "/queue".into(), true),
        ("operator: hosts", "/hosts".into(), true),
        ("operator: audit trail", "/audit".into(), true),
        ("operator: request form", "/vps/new".into(), true),
        ("member: VPS list with quota", "/vps".into(), false),
    ];
    let mut figures = serde_json::Map::new();
    let mut worst = 0.0f64;
    println!(
        "{total} VPS in {institutions} institutions placed in {:.1} s; {waiting} requests waiting",
        placed_in.as_secs_f64()
    );
    for (what, path, as_operator) in &pages {
        let v = if *as_operator {
            &mut operator
        } else {
            &mut reader
        };
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let a = v.get(path).await?;
            times.push(t.elapsed());
            anyhow::ensure!(a.status == 200, "{what} {path}: {}", a.status);
        }
        times.sort();
        let (p50, p95) = (pct(&times, 0.5), pct(&times, 0.95));
        worst = worst.max(p95);
        println!("{what:<36} p50 {p50:7.2} ms  p95 {p95:7.2} ms");
        figures.insert(
            what.replace([':', ','], "").replace(' ', "_"),
            serde_json::json!({ "p50_ms": p50, "p95_ms": p95 }),
        );
    }
    // The inventory is an export of every row, not a page.
    let t = Instant::now();
    let csv = operator.get("/inventory.csv").await?;
    let export = t.elapsed();
    let rows = csv.body.lines().count().saturating_sub(1);
    println!(
        "inventory CSV of {rows} VPS: {:.2} s, {:.1} MiB",
        export.as_secs_f64(),
        csv.body.len() as f64 / (1 << 20) as f64
    );
    println!("worst page p95: {worst:.2} ms (goal: under 100 ms)");
    figures.insert("vps".into(), total.into());
    figures.insert("institutions".into(), institutions.into());
    figures.insert("rounds".into(), rounds.into());
    figures.insert("worst_page_p95_ms".into(), worst.into());
    figures.insert("inventory_rows".into(), rows.into());
    figures.insert("inventory_s".into(), export.as_secs_f64().into());
    figures.insert("placed_s".into(), placed_in.as_secs_f64().into());
    drop(cluster);
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}
