//! The store's bookkeeping: the totals its triggers keep, the in-memory host
//! index, and claims made by two controllers sharing one file.

use betang_proto::v1::HeartbeatRequest;
use betang_proto::v1::{
    Application, HostCapacity, HostInfoResponse, Image, PowerState, VmStatus, VmUsage, VpsSpec,
};
use rusqlite::params;

use super::*;
use crate::{
    auth::Caller,
    ids::HostId,
    scheduler::{Policy, Ratios},
    store::{
        hosts, identity,
        vps::{self, NewVps, Placement},
    },
};

const NOW: i64 = 1_000_000;

/// A VPS just placed, as its first ensure finds it: through PROVISIONING, as
/// the lifecycle (and the store's trigger) asks, before a test sets where
/// the ensure left it.
fn as_built(c: &Connection, id: &str) -> rusqlite::Result<usize> {
    c.execute(
        "UPDATE vps SET state = 'PROVISIONING' WHERE id = ?1 AND state = 'SCHEDULED'",
        [id],
    )
}

fn register(s: &Store, id: &str, vcpus: u32) {
    let info = HostInfoResponse {
        host_id: id.into(),
        hostname: id.into(),
        capacity: Some(HostCapacity {
            vcpus,
            memory_mib: u64::from(vcpus) * 1024,
            disk_gib: 1000,
        }),
        images: vec![Image {
            name: "tiny".into(),
            min_disk_gib: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    s.run_sync(|c| hosts::register(c, &info, "http://127.0.0.1:1", NOW))
        .unwrap();
}

/// The data center's own institution, as bootstrapping makes it.
fn institution(s: &Store) -> String {
    let (admin, _) = s
        .run_sync(|c| identity::bootstrap_admin(c, "dc", "Data center", "admin", NOW))
        .unwrap();
    let room = betang_proto::v1::Quota {
        vcpus: 1000,
        memory_mib: 1 << 30,
        disk_gib: 1 << 30,
        vps_count: 1000,
    };
    s.run_sync(|c| {
        identity::set_quota(
            c,
            &Caller::system(),
            &admin.institution_id,
            &identity::whole(&room),
            NOW,
        )
    })
    .unwrap();
    admin.institution_id
}

fn placement() -> Placement {
    Placement {
        ratios: Ratios {
            cpu: 1.0,
            memory: 1.0,
            disk: 1.0,
        },
        policy: Policy::default(),
        down_after_ms: 10_000,
        max_pending: 20,
    }
}

fn new_vps(institution: &str, n: usize, vcpus: u32) -> NewVps {
    NewVps {
        request_id: format!("r-{n}"),
        spec: VpsSpec {
            name: format!("vps-{n}"),
            vcpus,
            memory_mib: u64::from(vcpus) * 1024,
            disk_gib: 10,
            image: "tiny".into(),
            ..Default::default()
        },
        application: Application {
            name: "App".into(),
            responsible_name: "Siti".into(),
            ..Default::default()
        },
        institution_id: institution.into(),
        pin: None,
        placement: Default::default(),
        ip_address: String::new(),
    }
}

/// Host "a" with room for 8 vCPUs, holding one VPS of 2; returns the
/// institution that owns it.
fn one_host_holding_one_vps(s: &Store) -> String {
    register(s, "a", 8);
    let inst = institution(s);
    s.run_sync(|c| {
        vps::create(
            c,
            &Caller::system(),
            &new_vps(&inst, 0, 2),
            &placement(),
            NOW,
        )
    })
    .unwrap();
    inst
}

/// Every host's totals and the institution's usage, as kept and as summed.
fn assert_totals_agree(s: &Store, institution: &str) {
    s.run_sync(|c| {
        let mut q = c.prepare(
            "SELECT h.id, a.vcpus, a.memory_mib, a.disk_gib, a.vps_count,
                    (SELECT COALESCE(SUM(vcpus), 0) FROM vps WHERE host_id = h.id AND state <> 'DELETED'),
                    (SELECT COALESCE(SUM(memory_mib), 0) FROM vps WHERE host_id = h.id AND state <> 'DELETED'),
                    (SELECT COALESCE(SUM(disk_gib), 0) FROM vps WHERE host_id = h.id AND state <> 'DELETED'),
                    (SELECT COUNT(*) FROM vps WHERE host_id = h.id AND state <> 'DELETED')
             FROM hosts h JOIN host_allocation a ON a.host_id = h.id",
        )?;
        let rows: Vec<(String, [i64; 8])> = q
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    [
                        r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?,
                        r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?,
                    ],
                ))
            })?
            .collect::<Result<_, _>>()?;
        assert!(!rows.is_empty());
        for (h, v) in rows {
            assert_eq!(v[..4], v[4..], "host {h}: kept totals differ from the sums");
        }
        assert_eq!(
            identity::used(c, institution)?,
            identity::used_by_sum(c, institution)?
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn totals_follow_every_change_of_a_vps() {
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    register(&s, "b", 8);
    let inst = institution(&s);
    let op = Caller::system();
    let p = placement();
    let mut ids = Vec::new();
    for n in 0..6 {
        let v = s
            .run_sync(|c| vps::create(c, &op, &new_vps(&inst, n, 2), &p, NOW))
            .unwrap();
        ids.push(v.id);
    }
    assert_totals_agree(&s, &inst);
    let used = s.run_sync(|c| identity::used(c, &inst)).unwrap();
    assert_eq!((used.vcpus, used.vps_count), (12, 6));

    // Deleted: DELETING still holds, DELETED releases.
    s.run_sync(|c| vps::mark_deleting(c, &op, &ids[0], NOW))
        .unwrap();
    assert_totals_agree(&s, &inst);
    s.run_sync(|c| vps::deleted(c, &ids[0], NOW)).unwrap();
    assert_totals_agree(&s, &inst);
    // A failed build: ERROR holds the quota, the cleanup releases the host.
    s.run_sync(|c| {
        vps::call_failed(
            c,
            &ids[1],
            &vps::CallFailure {
                transient: false,
                reason: "refused".into(),
                disk_kept: false,
            },
            NOW,
            1,
        )
    })
    .unwrap();
    assert_totals_agree(&s, &inst);
    s.run_sync(|c| vps::cleaned_up(c, &ids[1], NOW)).unwrap();
    assert_totals_agree(&s, &inst);
    // Resized while stopped.
    s.run_sync(|c| {
        as_built(c, &ids[2].to_string())?;
        c.execute(
            "UPDATE vps SET state = 'STOPPED' WHERE id = ?1",
            [ids[2].to_string()],
        )?;
        Ok(())
    })
    .unwrap();
    let bigger = vps::Approval {
        vcpus: 3,
        memory_mib: 0,
        disk_gib: 20,
        pin: None,
        ip_address: String::new(),
    };
    s.run_sync(|c| vps::resize(c, &op, &ids[2], &bigger, &p, NOW))
        .unwrap();
    assert_totals_agree(&s, &inst);
    let used = s.run_sync(|c| identity::used(c, &inst)).unwrap();
    assert_eq!((used.vcpus, used.vps_count), (2 * 3 + 3 + 2, 5));
}

#[test]
fn the_host_index_follows_the_rows() {
    let s = Store::open_in_memory().unwrap();
    let inst = one_host_holding_one_vps(&s);
    let (op, p) = (Caller::system(), placement());
    let same = |s: &Store| {
        s.run_sync(|db| {
            let fresh = hosts::views(&db.conn, NOW, 10_000)?;
            let Db { conn, hosts, .. } = db;
            let kept = hosts.hosts(conn, NOW, 10_000)?;
            assert_eq!(fresh.len(), kept.len());
            for (f, k) in fresh.iter().zip(kept) {
                assert_eq!(
                    (
                        &f.id,
                        f.allocated,
                        f.capacity,
                        f.schedulable,
                        &f.images,
                        f.weight,
                        &f.groups
                    ),
                    (
                        &k.id,
                        k.allocated,
                        k.capacity,
                        k.schedulable,
                        &k.images,
                        k.weight,
                        &k.groups
                    )
                );
            }
            Ok(fresh)
        })
        .unwrap()
    };
    same(&s);
    // Changes the index learns of through the triggers, each in its own unit of work.
    register(&s, "b", 16);
    s.run_sync(|c| vps::create(c, &op, &new_vps(&inst, 1, 2), &p, NOW))
        .unwrap();
    let a = HostId::parse("a").unwrap();
    s.run_sync(|c| hosts::update(c, &op, &a, hosts::HostChange::Cordon(true), NOW))
        .unwrap();
    s.run_sync(|c| hosts::update(c, &op, &a, hosts::HostChange::Weight(2.5), NOW))
        .unwrap();
    let views = same(&s);
    assert_eq!(views.len(), 2);
    assert!(!views[0].schedulable);
    assert_eq!(
        views[1].allocated.vcpus, 2,
        "the second VPS went to the empty host b"
    );
    // Anti-affinity groups: a member placed, then deleted, then gone for good.
    let mut grouped = new_vps(&inst, 2, 1);
    grouped.placement.anti_affinity_group = "web".into();
    let g = s
        .run_sync(|c| vps::create(c, &op, &grouped, &p, NOW))
        .unwrap();
    let group = format!("{inst}/web");
    assert!(same(&s)[1].groups.contains(&group), "b holds the group");
    s.run_sync(|c| vps::mark_deleting(c, &op, &g.id, NOW))
        .unwrap();
    assert!(
        same(&s)[1].groups.contains(&group),
        "DELETING still holds it"
    );
    s.run_sync(|c| vps::deleted(c, &g.id, NOW)).unwrap();
    assert!(same(&s)[1].groups.is_empty(), "DELETED lets it go");
    s.run_sync(|c| {
        c.execute("DELETE FROM vps WHERE id = ?1", [g.id.to_string()])?;
        Ok(())
    })
    .unwrap();
    same(&s);
}

#[test]
fn two_controllers_on_one_file_never_double_book() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("betang.db");
    let first = Store::open(&path).unwrap();
    // Room for exactly 10 VPS of 2 vCPUs over three hosts.
    register(&first, "a", 4);
    register(&first, "b", 6);
    register(&first, "c", 10);
    let inst = institution(&first);
    let second = Store::open(&path).unwrap();
    let p = placement();
    // Each store loads its index, then both place in turn: each one's
    // index is stale after every claim the other makes.
    let mut placed = 0;
    for n in 0..30 {
        let s = if n % 2 == 0 { &first } else { &second };
        let r = s.run_sync(|c| vps::create(c, &Caller::system(), &new_vps(&inst, n, 2), &p, NOW));
        match r {
            Ok(_) => placed += 1,
            Err(ApiError::NoHostFits(why)) => {
                assert_eq!(why.rejects.get(&crate::scheduler::Reject::Cpu), Some(&3));
                assert!(why.to_string().contains("3 lack vCPUs"), "{why}");
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(placed, 10);
    assert_totals_agree(&first, &inst);
    let views = first.run_sync(|c| hosts::views(c, NOW, 10_000)).unwrap();
    for v in views {
        assert_eq!(
            v.allocated.vcpus, v.capacity.vcpus,
            "host {} is exactly full",
            v.id
        );
    }
}

#[test]
fn the_reconciler_reads_only_the_vps_that_need_work() {
    let s = Store::open_in_memory().unwrap();
    let plan: Vec<String> = s
        .run_sync(|c| {
            let sql = format!("EXPLAIN QUERY PLAN {}", vps::WORK_ITEMS_SQL);
            let mut q = c.prepare(&sql)?;
            let rows = q.query_map([0], |r| r.get::<_, String>(3))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .unwrap();
    assert!(
        plan.iter().any(|p| p.contains("USING INDEX vps_work")),
        "{plan:?}"
    );
}

/// Siti, a member of `inst`.
fn member_of(inst: &str) -> Caller {
    Caller {
        user_id: "u-siti".into(),
        username: "siti".into(),
        institution_id: inst.to_owned(),
        role: crate::auth::Role::Member,
    }
}

/// A store with host "a" and one VPS on it, built and RUNNING.
fn one_running_vps() -> (Store, vps::VpsRecord) {
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    let inst = institution(&s);
    let v = s
        .run_sync(|c| {
            vps::create(
                c,
                &Caller::system(),
                &new_vps(&inst, 0, 1),
                &placement(),
                NOW,
            )
        })
        .unwrap();
    let id = v.id.to_string();
    s.run_sync(move |c| {
        as_built(c, &id)?;
        c.execute(
            "UPDATE vps SET state = 'RUNNING', applied_generation = generation,
                 observed_power = 'running' WHERE id = ?1",
            [&id],
        )?;
        Ok(())
    })
    .unwrap();
    (s, v)
}

#[test]
fn heartbeats_write_only_what_changed() {
    use betang_proto::v1::{PowerState, VmStatus, VmUsage};
    let (s, v) = one_running_vps();
    s.run_sync(|c| {
        c.execute_batch(
            "CREATE TEMP TABLE vps_writes (n INTEGER);
             CREATE TEMP TRIGGER count_vps_writes AFTER UPDATE ON vps
             BEGIN INSERT INTO vps_writes VALUES (1); END;",
        )?;
        Ok(())
    })
    .unwrap();
    let host = HostId::parse("a").unwrap();
    let beat = |at: i64, cpu: u64| {
        let vm = VmStatus {
            vps_id: v.id.to_string(),
            power: PowerState::Running as i32,
            generation: v.generation,
            usage: Some(VmUsage {
                cpu_time_ns: cpu,
                sampled_at_ms: at,
                ..Default::default()
            }),
            ..Default::default()
        };
        s.run_sync(|c| {
            c.execute("DELETE FROM temp.vps_writes", [])?;
            let b = HeartbeatRequest {
                vms: vec![vm],
                vms_listed: true,
                vm_dirs_listed: true,
                ..Default::default()
            };
            hosts::heartbeat(c, &host, &b, 30_000, at)?;
            Ok(
                c.query_row("SELECT count(*) FROM temp.vps_writes", [], |r| {
                    r.get::<_, i64>(0)
                })?,
            )
        })
        .unwrap()
    };
    let cpu_of = || {
        s.run_sync(|c| vps::get_any(c, &v.id))
            .unwrap()
            .usage
            .cpu_time_ns
    };
    assert_eq!(beat(NOW, 100), 1, "the first usage is written");
    assert_eq!(cpu_of(), 100);
    assert_eq!(beat(NOW + 2_000, 200), 0, "nothing changed worth a write");
    assert_eq!(cpu_of(), 100);
    assert_eq!(beat(NOW + 30_000, 300), 1, "usage again after the interval");
    assert_eq!(cpu_of(), 300);
}

fn sample(at_ms: i64, cpu_rate: f64, disk_read: u64) -> betang_proto::v1::VmUsage {
    betang_proto::v1::VmUsage {
        cpu_rate,
        memory_used_bytes: 100 << 20,
        memory_rss_bytes: 200 << 20,
        disk_read_bytes: disk_read,
        net_rx_bytes: disk_read / 2,
        sampled_at_ms: at_ms,
        ..Default::default()
    }
}

#[test]
fn usage_history_keeps_minutes_and_hours_with_rates() {
    use super::history::{self, HOUR_S, MINUTE_S};
    let s = Store::open_in_memory().unwrap();
    // On the hour.
    let t0: i64 = 500_000 * 3_600_000;
    s.run_sync(|c| {
        // Every 30 s for two minutes: 1 MiB read per 30 s, half a vCPU then a whole one.
        for (i, rate) in [0.5, 0.5, 1.0, 1.0].into_iter().enumerate() {
            let at = t0 + i as i64 * 30_000;
            history::record(c, "v1", &sample(at, rate, (i as u64 + 1) << 20), 0)?;
        }
        // Replayed or late samples do not count twice.
        history::record(c, "v1", &sample(t0, 0.5, 1 << 20), 0)?;
        Ok(())
    })
    .unwrap();
    let minutes = s
        .run_sync(|c| history::points(c, "v1", t0, MINUTE_S))
        .unwrap();
    assert_eq!(minutes.len(), 2);
    assert_eq!(minutes[0].at_ms, t0);
    assert_eq!(minutes[1].at_ms, t0 + 60_000);
    assert!((minutes[0].cpu_rate - 0.5).abs() < 1e-9);
    assert!((minutes[1].cpu_rate - 1.0).abs() < 1e-9);
    // The second minute ends 60 s after the first: 2 MiB more were read.
    let want = (2u64 << 20) as f64 / 60.0;
    assert!((minutes[1].disk_read_bytes_per_second - want).abs() < 1e-6);
    assert!((minutes[1].net_rx_bytes_per_second - want / 2.0).abs() < 1e-6);
    assert_eq!(minutes[1].memory_rss_bytes, 200 << 20);
    let hours = s
        .run_sync(|c| history::points(c, "v1", t0, HOUR_S))
        .unwrap();
    assert_eq!(hours.len(), 1);
    assert!((hours[0].cpu_rate - 0.75).abs() < 1e-9);

    // A guest restart resets its counters: the rate counts from zero, never negative.
    s.run_sync(|c| history::record(c, "v1", &sample(t0 + 120_000, 1.0, 1 << 10), 0))
        .unwrap();
    let after = s
        .run_sync(|c| history::points(c, "v1", t0 + 120_000, MINUTE_S))
        .unwrap();
    assert!((after[0].disk_read_bytes_per_second - 1024.0 / 30.0).abs() < 1e-6);

    // Minutes go after a day, hours after 90 days.
    let pruned = s
        .run_sync(|c| history::prune(c, t0 + history::KEEP_MINUTES_MS + 3_600_000))
        .unwrap();
    assert_eq!(pruned, 3);
    let left = s.run_sync(|c| history::points(c, "v1", 0, HOUR_S)).unwrap();
    assert_eq!(left.len(), 1);
}

#[test]
fn the_usage_report_counts_allocation_hours_inside_the_period() {
    use super::history;
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 64);
    let inst = institution(&s);
    const H: i64 = 3_600_000;
    s.run_sync(|c| {
        // Injected spans with known times: 2 vCPU / 4 GiB / 10 GiB from hour 1
        // to hour 5, and 1 vCPU from hour 4, still open.
        c.execute(
            "INSERT INTO allocation_spans VALUES ('x', ?1, 2, 4096, 10, ?2, ?3),
                                                 ('y', ?1, 1, 1024, 10, ?4, NULL)",
            rusqlite::params![inst, H, 5 * H, 4 * H],
        )?;
        Ok(())
    })
    .unwrap();
    // The period [2 h, 8 h) with "now" at 6 h: x counts 3 h, y 2 h.
    let r = s
        .run_sync(|c| history::report(c, 2 * H, 8 * H, Some(&inst), 6 * H))
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].vps_count, 2);
    assert!((r[0].vcpu_hours - (2.0 * 3.0 + 2.0)).abs() < 1e-9);
    assert!((r[0].memory_gib_hours - (4.0 * 3.0 + 2.0)).abs() < 1e-9);
    assert!((r[0].disk_gib_hours - (30.0 + 20.0)).abs() < 1e-9);
    // Outside every span: nothing.
    let r = s
        .run_sync(|c| history::report(c, 0, H, Some(&inst), 6 * H))
        .unwrap();
    assert_eq!((r[0].vps_count, r[0].vcpu_hours), (0, 0.0));
}

#[test]
fn allocation_spans_open_and_close_with_the_vps() {
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    let inst = institution(&s);
    let (op, p) = (Caller::system(), placement());
    let v = s
        .run_sync(|c| vps::create(c, &op, &new_vps(&inst, 1, 2), &p, NOW))
        .unwrap();
    let spans = |s: &Store| -> Vec<(i64, bool)> {
        s.run_sync(|c| {
            let mut q = c.prepare(
                "SELECT vcpus, to_ms IS NULL FROM allocation_spans WHERE vps_id = ?1 ORDER BY rowid",
            )?;
            Ok(q.query_map([v.id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?)
        })
        .unwrap()
    };
    assert_eq!(spans(&s), [(2, true)]);
    s.run_sync(|c| {
        as_built(c, &v.id.to_string())?;
        c.execute(
            "UPDATE vps SET state = 'STOPPED' WHERE id = ?1",
            [v.id.to_string()],
        )?;
        Ok(())
    })
    .unwrap();
    assert_eq!(spans(&s), [(2, true)], "a stop keeps the allocation");
    let bigger = vps::Approval {
        vcpus: 4,
        memory_mib: 0,
        disk_gib: 20,
        pin: None,
        ip_address: String::new(),
    };
    s.run_sync(|c| vps::resize(c, &op, &v.id, &bigger, &p, NOW))
        .unwrap();
    assert_eq!(spans(&s), [(2, false), (4, true)]);
    s.run_sync(|c| vps::mark_deleting(c, &op, &v.id, NOW))
        .unwrap();
    s.run_sync(|c| vps::deleted(c, &v.id, NOW)).unwrap();
    assert_eq!(spans(&s), [(2, false), (4, false)]);
}

/// Calls queued together share a transaction, yet each one that fails or
/// panics takes back only its own writes, and claims made in one batch see
/// each other: 300 concurrent placements into room for exactly 100.
#[test]
fn calls_committed_together_succeed_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("betang.db")).unwrap();
    register(&s, "a", 20);
    register(&s, "b", 30);
    register(&s, "c", 50);
    let inst = institution(&s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let commits_before = s.commits();
    let outcomes: Vec<Result<(), String>> = rt.block_on(async {
        let calls: Vec<_> = (0..300)
            .map(|n| {
                let (s, inst) = (s.clone(), inst.clone());
                tokio::spawn(async move {
                    s.run(move |c| {
                        let v = vps::create(
                            c,
                            &Caller::system(),
                            &new_vps(&inst, n, 1),
                            &placement(),
                            NOW,
                        )?;
                        // Every tenth call writes, then fails or panics.
                        match n % 10 {
                            3 => Err(ApiError::invalid(
                                "name",
                                format!("refused after creating {}", v.id),
                            )),
                            7 => panic!("call {n} broke after creating {}", v.id),
                            _ => Ok(()),
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    });
    let commits = s.commits() - commits_before;
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|o| {
            o.as_ref()
                .is_err_and(|e| e.contains("refused after creating"))
        })
        .count();
    let panicked = outcomes
        .iter()
        .filter(|o| o.as_ref().is_err_and(|e| e.contains("panicked")))
        .count();
    assert_eq!(ok, 100, "exactly the room there is: {outcomes:?}");
    assert!(
        refused > 0 && panicked > 0,
        "{refused} refused, {panicked} panicked"
    );
    assert_eq!(
        ok + refused
            + panicked
            + outcomes
                .iter()
                .filter(|o| o.as_ref().is_err_and(|e| e.contains("no host fits")))
                .count(),
        300
    );
    assert!(
        commits < 300,
        "{commits} commits for 300 calls: none were shared"
    );
    // Only the successful calls' VPS exist, and the totals agree with them.
    let rows: i64 = s
        .run_sync(|c| Ok(c.query_row("SELECT COUNT(*) FROM vps", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(rows, 100);
    assert_totals_agree(&s, &inst);
    for v in s.run_sync(|c| hosts::views(c, NOW, 10_000)).unwrap() {
        assert_eq!(
            v.allocated.vcpus, v.capacity.vcpus,
            "host {} is exactly full",
            v.id
        );
    }
    // The store goes on after a panic.
    let again: i64 = rt
        .block_on(s.run(|c| Ok(c.query_row("SELECT COUNT(*) FROM hosts", [], |r| r.get(0))?)))
        .unwrap();
    assert_eq!(again, 3);
}

/// The index is trusted without reading the chosen host's rows only while
/// nothing can have changed them behind it.
#[test]
fn the_host_index_knows_when_it_is_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("betang.db");
    let s = Store::open(&path).unwrap();
    one_host_holding_one_vps(&s);
    let op = Caller::system();
    let in_step = |s: &Store| {
        s.run_sync(|db| {
            let Db { conn, hosts, .. } = db;
            let before = hosts.hosts_in_step(conn, NOW, 10_000)?.1;
            // A claim made in this unit of work, not yet caught up with.
            conn.execute(
                "UPDATE host_allocation SET vcpus = vcpus WHERE host_id = 'a'",
                [],
            )?;
            let after_write = hosts.hosts_in_step(conn, NOW, 10_000)?.1;
            Ok((before, after_write))
        })
        .unwrap()
    };
    assert_eq!(in_step(&s), (true, false));
    // Caught up after that unit of work, so in step again.
    assert!(in_step(&s).0);
    // Another connection's write: the next read notices and reloads, so the
    // index it answers with has the change and is in step.
    let other = Store::open(&path).unwrap();
    other
        .run_sync(|c| {
            hosts::update(
                c,
                &op,
                &HostId::parse("a").unwrap(),
                hosts::HostChange::Weight(2.0),
                NOW,
            )
        })
        .unwrap();
    let (weight, fresh) = s
        .run_sync(|db| {
            let Db { conn, hosts, .. } = db;
            let (views, in_step) = hosts.hosts_in_step(conn, NOW, 10_000)?;
            Ok((views[0].weight, in_step))
        })
        .unwrap();
    assert_eq!(weight, 2.0, "another connection's write was read");
    assert!(fresh, "reloaded, so in step");
}

/// The triggers count what the lifecycle says, in every state and across
/// every change of state: capacity on the host, capacity on the host a
/// MIGRATING VPS moves to, and the institution's quota.
#[test]
fn totals_agree_with_the_lifecycle_in_every_state() {
    use crate::lifecycle::{ALL_STATES, VpsState};
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 64);
    register(&s, "b", 64);
    let inst = institution(&s);
    // Every pair of states, allowed or not: what is counted must not depend
    // on how the state was reached.
    s.run_sync(|c| {
        c.execute_batch("DROP TRIGGER vps_state_follows_the_lifecycle")?;
        Ok(())
    })
    .unwrap();
    let expect = |state: VpsState| -> [[i64; 4]; 3] {
        let size = [2, 512, 10, 1];
        let zero = [0; 4];
        [
            if state.holds_capacity() { size } else { zero },
            if state == VpsState::Migrating {
                size
            } else {
                zero
            },
            if state.holds_quota() { size } else { zero },
        ]
    };
    let read = |c: &Connection, inst: &str| -> Result<[[i64; 4]; 3], ApiError> {
        let host = |h: &str| -> Result<[i64; 4], ApiError> {
            Ok(c.query_row(
                "SELECT vcpus, memory_mib, disk_gib, vps_count FROM host_allocation
                 WHERE host_id = ?1",
                [h],
                |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]),
            )?)
        };
        let u = identity::used(c, inst)?;
        Ok([
            host("a")?,
            host("b")?,
            [
                i64::from(u.vcpus),
                u.memory_mib as i64,
                u.disk_gib as i64,
                i64::from(u.vps_count),
            ],
        ])
    };
    for (n, from) in ALL_STATES.into_iter().enumerate() {
        for (m, to) in ALL_STATES.into_iter().enumerate() {
            let inst = inst.clone();
            s.run_sync(move |c| {
                let id = format!("walk-{n}-{m}");
                let target = |st: VpsState| (st == VpsState::Migrating).then_some("b");
                c.execute(
                    "INSERT INTO vps (id, request_id, name, vcpus, memory_mib, disk_gib, image,
                         ssh_public_key, user_data, state, desired_power, host_id,
                         created_at_ms, updated_at_ms, institution_id, move_target)
                     VALUES (?1, ?1, 'w', 2, 512, 10, 'debian-12', '', '', ?2, 'running', 'a',
                         0, 0, ?3, ?4)",
                    params![id, from.as_str(), inst, target(from)],
                )?;
                assert_eq!(read(c, &inst)?, expect(from), "inserted as {from}");
                c.execute(
                    "UPDATE vps SET state = ?2, move_target = ?3 WHERE id = ?1",
                    params![id, to.as_str(), target(to)],
                )?;
                assert_eq!(read(c, &inst)?, expect(to), "{from} -> {to}");
                assert_eq!(super::totals::kept(c)?, super::totals::recounted(c)?);
                c.execute("DELETE FROM vps WHERE id = ?1", [&id])?;
                assert_eq!(read(c, &inst)?, [[0; 4]; 3], "deleted from {to}");
                Ok(())
            })
            .unwrap();
        }
    }
}

/// A VPS being moved keeps holding its institution's quota, and capacity on
/// both hosts, so approvals made while its disk is copied cannot take either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moving_vps_holds_its_quota_against_concurrent_approvals() {
    use crate::{lifecycle::VpsState, store::moves};
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    register(&s, "b", 4);
    let inst = institution(&s);
    let tight = betang_proto::v1::Quota {
        vcpus: 4,
        memory_mib: 1 << 20,
        disk_gib: 1 << 20,
        vps_count: 100,
    };
    let i = inst.clone();
    s.run_sync(move |c| {
        identity::set_quota(c, &Caller::system(), &i, &identity::whole(&tight), NOW)
    })
    .unwrap();
    let i = inst.clone();
    let v = s
        .run_sync(move |c| vps::create(c, &Caller::system(), &new_vps(&i, 0, 4), &placement(), NOW))
        .unwrap();
    let id = v.id;
    s.run_sync(move |c| {
        as_built(c, &id.to_string())?;
        c.execute(
            "UPDATE vps SET state = 'STOPPED', desired_power = 'stopped',
                 applied_generation = generation WHERE id = ?1",
            [id.to_string()],
        )?;
        Ok(())
    })
    .unwrap();
    let member = member_of(&inst);
    let mut requests = Vec::new();
    for n in 1..=12 {
        let (m, i) = (member.clone(), inst.clone());
        let r = s
            .run_sync(move |c| vps::create(c, &m, &new_vps(&i, n, 1), &placement(), NOW))
            .unwrap();
        requests.push(r.id);
    }
    let (moved, target) = s
        .run_sync(move |c| moves::request(c, &Caller::system(), &id, false, &placement(), NOW))
        .unwrap();
    assert_eq!(moved.state, VpsState::Migrating);
    assert_eq!(target.as_str(), "b");
    let approvals: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let s = s.clone();
            tokio::spawn(async move {
                s.run(move |c| {
                    let none = vps::Approval {
                        vcpus: 0,
                        memory_mib: 0,
                        disk_gib: 0,
                        pin: None,
                        ip_address: String::new(),
                    };
                    vps::approve(c, &Caller::system(), &r, &none, &placement(), NOW)
                })
                .await
            })
        })
        .collect();
    for a in approvals {
        let e = a.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("quota: vcpus"), "{e}");
    }
    let i = inst.clone();
    let used = s.run_sync(move |c| identity::used(c, &i)).unwrap();
    assert_eq!((used.vcpus, used.vps_count), (4, 1));
    let alloc = |h: &'static str| {
        s.run_sync(move |c| {
            Ok(c.query_row(
                "SELECT vcpus FROM host_allocation WHERE host_id = ?1",
                [h],
                |r| r.get::<_, i64>(0),
            )?)
        })
        .unwrap()
    };
    assert_eq!((alloc("a"), alloc("b")), (4, 4), "held on both hosts");
    // The copy is done: the claim on the source goes, the VPS lives on b.
    let v = s.run_sync(move |c| moves::switch(c, &id, NOW)).unwrap();
    assert_eq!(
        (v.state, v.host_id.as_ref().map(|h| h.as_str())),
        (VpsState::Stopped, Some("b"))
    );
    assert_eq!((alloc("a"), alloc("b")), (0, 4));
    // A second move must wait until the first one's old copy is removed.
    let e = s
        .run_sync(move |c| moves::request(c, &Caller::system(), &id, false, &placement(), NOW))
        .unwrap_err();
    assert!(e.to_string().contains("old copy"), "{e}");
    s.run_sync(move |c| moves::done(c, &id)).unwrap();
    // Nor while a start is on its way.
    s.run_sync(move |c| {
        c.execute(
            "UPDATE vps SET desired_power = 'running' WHERE id = ?1",
            [id.to_string()],
        )?;
        Ok(())
    })
    .unwrap();
    let e = s
        .run_sync(move |c| moves::request(c, &Caller::system(), &id, true, &placement(), NOW))
        .unwrap_err();
    assert!(e.to_string().contains("still being applied"), "{e}");
    s.run_sync(move |c| {
        c.execute(
            "UPDATE vps SET desired_power = 'stopped' WHERE id = ?1",
            [id.to_string()],
        )?;
        Ok(())
    })
    .unwrap();
    // Back to a, and given up there: the VPS stays on b, a is released.
    s.run_sync(move |c| moves::request(c, &Caller::system(), &id, false, &placement(), NOW))
        .unwrap();
    assert_eq!((alloc("a"), alloc("b")), (4, 4));
    let v = s
        .run_sync(move |c| moves::give_up(c, &id, "the target's agent cannot be reached", NOW))
        .unwrap();
    assert_eq!(
        (v.state, v.host_id.as_ref().map(|h| h.as_str())),
        (VpsState::Stopped, Some("b"))
    );
    assert!(
        v.state_reason.contains("cannot be reached"),
        "{}",
        v.state_reason
    );
    assert_eq!((alloc("a"), alloc("b")), (0, 4));
    let i = inst.clone();
    let used = s.run_sync(move |c| identity::used(c, &i)).unwrap();
    assert_eq!(used.vcpus, 4);
    s.run_sync(|c| {
        assert_eq!(super::totals::kept(c)?, super::totals::recounted(c)?);
        Ok(())
    })
    .unwrap();
}

/// When a failed call's writes cannot be taken back (`ROLLBACK TO` failing,
/// as on a full disk), nothing else runs in that transaction and nothing of
/// it commits: not the calls before it, not the calls after.
#[test]
fn a_call_whose_writes_cannot_be_undone_fails_its_whole_batch() {
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    let weight = |s: &Store| -> f64 {
        s.run_sync(
            |c| Ok(c.query_row("SELECT weight FROM hosts WHERE id = 'a'", [], |r| r.get(0))?),
        )
        .unwrap()
    };
    let mut db = s.db.lock().unwrap();
    let outcome = super::batch::in_transaction(&mut db, |db| {
        let before = db.work(|db| {
            db.conn
                .execute("UPDATE hosts SET weight = 2 WHERE id = 'a'", [])?;
            Ok(())
        });
        let failed: Result<(), ApiError> = db.work(|db| {
            db.conn
                .execute("UPDATE hosts SET weight = 5 WHERE id = 'a'", [])?;
            // What `work` records when its ROLLBACK TO fails.
            db.poisoned = Some("disk I/O error".into());
            Err(ApiError::invalid("x", "fails"))
        });
        let after = db.work(|db| {
            db.conn
                .execute("UPDATE hosts SET weight = 3 WHERE id = 'a'", [])?;
            Ok(())
        });
        (before.is_ok(), failed.is_err(), after.is_err())
    });
    drop(db);
    let e = outcome.unwrap_err();
    assert!(e.to_string().contains("disk I/O error"), "{e}");
    assert_eq!(weight(&s), 1.0, "nothing of the batch was committed");
    // The store goes on: the next transaction is a clean one.
    s.run_sync(|c| {
        c.execute("UPDATE hosts SET weight = 4 WHERE id = 'a'", [])?;
        Ok(())
    })
    .unwrap();
    assert_eq!(weight(&s), 4.0);
}

/// The build clock starts at placement, not at the request, and stands
/// still while the host is down; a failure whose disk was kept leaves no
/// cleanup; a cleanup that waits says so, and stops saying it once done.
#[test]
fn builds_time_out_from_placement_and_never_while_their_host_is_down() {
    use crate::lifecycle::VpsState;
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    let inst = institution(&s);
    let member = member_of(&inst);
    // Asked long ago, approved now: the clock starts at the approval.
    let (m, i) = (member.clone(), inst.clone());
    let asked = s
        .run_sync(move |c| vps::create(c, &m, &new_vps(&i, 1, 1), &placement(), NOW - 3_600_000))
        .unwrap();
    let id = asked.id;
    let none = || vps::Approval {
        vcpus: 0,
        memory_mib: 0,
        disk_gib: 0,
        pin: None,
        ip_address: String::new(),
    };
    let v = s
        .run_sync(move |c| vps::approve(c, &Caller::system(), &id, &none(), &placement(), NOW))
        .unwrap();
    assert_eq!(v.build_since_ms, NOW);
    let transient = |reason: &str| vps::CallFailure {
        transient: true,
        reason: reason.into(),
        disk_kept: false,
    };
    let timeout = 600_000;
    let fail = |f: vps::CallFailure, at: i64| {
        s.run_sync(move |c| vps::call_failed(c, &id, &f, at, timeout))
            .unwrap();
        s.run_sync(move |c| vps::get_any(c, &id)).unwrap()
    };
    let v = fail(
        transient("the agent on host a cannot be reached"),
        NOW + 1000,
    );
    assert_eq!(v.state, VpsState::Scheduled, "a first hiccup is retried");
    // The host goes down for an hour: no timeout, and the VPS says why.
    s.run_sync(|c| {
        c.execute(
            "UPDATE hosts SET down_since_ms = ?1 WHERE id = 'a'",
            [NOW + 2000],
        )?;
        Ok(())
    })
    .unwrap();
    let v = fail(
        transient("the agent on host a cannot be reached"),
        NOW + 3_600_000,
    );
    assert_eq!(v.state, VpsState::Scheduled);
    assert!(
        v.state_reason.starts_with("waiting for host a"),
        "{}",
        v.state_reason
    );
    // It comes back: the hour it was down does not count.
    let info = HostInfoResponse {
        host_id: "a".into(),
        hostname: "a".into(),
        capacity: Some(HostCapacity {
            vcpus: 8,
            memory_mib: 8192,
            disk_gib: 1000,
        }),
        images: vec![Image {
            name: "tiny".into(),
            min_disk_gib: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    s.run_sync(move |c| hosts::register(c, &info, "http://127.0.0.1:1", NOW + 3_602_000))
        .unwrap();
    let v = s.run_sync(move |c| vps::get_any(c, &id)).unwrap();
    assert_eq!(v.build_since_ms, NOW + 3_600_000);
    let v = fail(transient("slow"), NOW + 3_700_000);
    assert_eq!(v.state, VpsState::Scheduled, "100 s of building so far");
    // Past the timeout with the host up: ERROR, and the cleanup is pending.
    let v = fail(transient("slow"), NOW + 4_300_000);
    assert_eq!(v.state, VpsState::Error);
    assert!(v.cleanup_pending);
    assert!(
        v.state_reason.ends_with("; cleanup pending on host a"),
        "{}",
        v.state_reason
    );
    let v = fail(
        transient("the agent on host a cannot be reached"),
        NOW + 4_400_000,
    );
    assert!(
        v.state_reason.starts_with("provisioning took longer"),
        "{}",
        v.state_reason
    );
    assert_eq!(v.state_reason.matches("cleanup pending").count(), 1);
    s.run_sync(move |c| vps::cleaned_up(c, &id, NOW + 4_500_000))
        .unwrap();
    let v = s.run_sync(move |c| vps::get_any(c, &id)).unwrap();
    assert!(
        !v.state_reason.contains("cleanup pending"),
        "{}",
        v.state_reason
    );
    assert!(v.host_id.is_none());

    // A refusal whose disk was kept: ERROR without a cleanup.
    let (m, i) = (member.clone(), inst.clone());
    let asked = s
        .run_sync(move |c| vps::create(c, &m, &new_vps(&i, 2, 1), &placement(), NOW))
        .unwrap();
    let id = asked.id;
    s.run_sync(move |c| vps::approve(c, &Caller::system(), &id, &none(), &placement(), NOW))
        .unwrap();
    let kept = vps::CallFailure {
        transient: false,
        reason: "host a: the disk … was kept, not used".into(),
        disk_kept: true,
    };
    s.run_sync(move |c| vps::call_failed(c, &id, &kept, NOW + 1, timeout))
        .unwrap();
    let v = s.run_sync(move |c| vps::get_any(c, &id)).unwrap();
    assert_eq!(v.state, VpsState::Error);
    assert!(!v.cleanup_pending, "nothing may remove a kept disk");
    assert_eq!(v.host_id.as_ref().map(|h| h.as_str()), Some("a"));
    let _ = inst;
}

/// A refreshed image is a new version: VPS keep the digest they were built
/// on, and the catalogue lists both versions with who offers and who uses them.
#[test]
fn image_versions_are_listed_with_their_hosts_and_vps() {
    let s = Store::open_in_memory().unwrap();
    let offer = |digest: &str, at: i64| {
        let info = HostInfoResponse {
            host_id: "a".into(),
            hostname: "a".into(),
            capacity: Some(HostCapacity {
                vcpus: 8,
                memory_mib: 8192,
                disk_gib: 1000,
            }),
            images: vec![Image {
                name: "tiny".into(),
                min_disk_gib: 1,
                digest: digest.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        s.run_sync(move |c| hosts::register(c, &info, "http://127.0.0.1:1", at))
            .unwrap();
    };
    let (d1, d2) = ("1".repeat(64), "2".repeat(64));
    offer(&d1, NOW);
    let inst = institution(&s);
    let i = inst.clone();
    let v = s
        .run_sync(move |c| vps::create(c, &Caller::system(), &new_vps(&i, 0, 1), &placement(), NOW))
        .unwrap();
    assert_eq!(v.image_digest, d1, "the VPS records what it is built on");
    offer(&d2, NOW + 1);
    let list = s.run_sync(|c| hosts::catalogue(c)).unwrap();
    let row = |d: &str| {
        list.iter()
            .find(|i| i.digest == d)
            .map(|i| (i.name.as_str(), i.host_count, i.vps_count))
    };
    assert_eq!(row(&d1), Some(("tiny", 0, 1)));
    assert_eq!(row(&d2), Some(("tiny", 1, 0)));
    // A move of that VPS needs a host with its version: there is none.
    let id = v.id;
    s.run_sync(move |c| {
        as_built(c, &id.to_string())?;
        c.execute(
            "UPDATE vps SET state = 'STOPPED', desired_power = 'stopped',
                 applied_generation = generation WHERE id = ?1",
            [id.to_string()],
        )?;
        Ok(())
    })
    .unwrap();
    register(&s, "b", 8);
    let e = s
        .run_sync(move |c| {
            crate::store::moves::request(c, &Caller::system(), &id, false, &placement(), NOW + 2)
        })
        .unwrap_err();
    assert!(e.to_string().ends_with("1 lacks the image"), "{e}");
}

/// The store refuses every change of state the lifecycle's table does not
/// allow, whatever statement makes it, and allows every one it does.
#[test]
fn the_store_enforces_the_lifecycle_for_every_pair_of_states() {
    use crate::lifecycle::ALL_STATES;
    let s = Store::open_in_memory().unwrap();
    s.run_sync(|c| {
        for from in ALL_STATES {
            for to in ALL_STATES {
                let want = from == to || from.can_become(to);
                assert_eq!(
                    super::transitions::allowed(c, from, to)?,
                    want,
                    "{from} -> {to}"
                );
            }
        }
        Ok(())
    })
    .unwrap();
}

/// A VPS smaller than its image needs is refused when it is asked for, by a
/// member as by an operator, naming the field and the image's minimum.
#[test]
fn a_vps_below_its_images_memory_is_refused_at_request_time() {
    let s = Store::open_in_memory().unwrap();
    let info = HostInfoResponse {
        host_id: "a".into(),
        hostname: "a".into(),
        capacity: Some(HostCapacity {
            vcpus: 8,
            memory_mib: 8192,
            disk_gib: 1000,
        }),
        images: vec![Image {
            name: "tiny".into(),
            min_disk_gib: 1,
            min_memory_mib: 128,
            ..Default::default()
        }],
        ..Default::default()
    };
    s.run_sync(move |c| hosts::register(c, &info, "http://127.0.0.1:1", NOW))
        .unwrap();
    let inst = institution(&s);
    let member = member_of(&inst);
    for who in [member, Caller::system()] {
        let mut n = new_vps(&inst, 7, 1);
        n.spec.memory_mib = 64;
        let e = s
            .run_sync(move |c| vps::create(c, &who, &n, &placement(), NOW))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "memory_mib: image tiny needs at least 128 MiB of memory to boot, 64 MiB was asked"
        );
    }
    let none: i64 = s
        .run_sync(|c| Ok(c.query_row("SELECT COUNT(*) FROM vps", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(none, 0, "nothing was created");
}

/// A commit holding an acknowledged write is flushed to disk before it is
/// answered; one holding only relaxed writes (heartbeats) or only reads is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_are_flushed_and_heartbeats_ride_along() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("betang.db")).unwrap();
    register(&s, "a", 8);
    let before = s.log_flushes();
    s.run(|c| {
        c.execute("UPDATE hosts SET weight = 2 WHERE id = 'a'", [])?;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(s.log_flushes(), before + 1, "a durable write is flushed");
    s.run_relaxed(|c| {
        c.execute("UPDATE hosts SET weight = 3 WHERE id = 'a'", [])?;
        Ok(())
    })
    .await
    .unwrap();
    s.run(|c| Ok(c.query_row("SELECT weight FROM hosts", [], |r| r.get::<_, f64>(0))?))
        .await
        .unwrap();
    assert_eq!(
        s.log_flushes(),
        before + 1,
        "relaxed writes and reads are not"
    );
    // The relaxed write was committed all the same, and the next durable
    // flush carries it.
    let w: f64 = s
        .run(|c| {
            c.execute("UPDATE hosts SET cordoned = 0 WHERE id = 'a'", [])?;
            Ok(c.query_row("SELECT weight FROM hosts", [], |r| r.get(0))?)
        })
        .await
        .unwrap();
    assert_eq!((w, s.log_flushes()), (3.0, before + 2));
}

/// The report's CPU comes from the CPU-time counter: a VPS that ran ten
/// minutes of an hour at full speed used a sixth of a vCPU-hour, never more
/// than it held; a stopped one adds nothing, and a reset counter counts from zero.
#[test]
fn reported_cpu_is_cpu_time_used_and_never_more_than_held() {
    use super::history;
    assert_eq!(history::cpu_used_ns(0, 5_000), 0, "first reading");
    assert_eq!(history::cpu_used_ns(5_000, 8_000), 3_000);
    assert_eq!(history::cpu_used_ns(5_000, 1_000), 1_000, "counter reset");
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 8);
    let inst = institution(&s);
    let (op, p) = (Caller::system(), placement());
    let v = s
        .run_sync(|c| vps::create(c, &op, &new_vps(&inst, 1, 1), &p, NOW))
        .unwrap();
    let host = HostId::parse("a").unwrap();
    const H: i64 = 3_600_000;
    let t0 = 10 * H;
    // Spans are stamped with the real clock; this test's clock is its own.
    s.run_sync(|c| {
        c.execute("UPDATE allocation_spans SET from_ms = ?1", [t0 - H])?;
        Ok(())
    })
    .unwrap();
    // Heartbeats every minute: running at 100 % of its one vCPU for ten
    // minutes, then stopped for fifty (its last rate still 100 %).
    let beat = |minute: i64, cpu_s: u64, running: bool| {
        let vm = VmStatus {
            vps_id: v.id.to_string(),
            power: if running {
                PowerState::Running as i32
            } else {
                PowerState::Stopped as i32
            },
            generation: v.generation,
            usage: Some(VmUsage {
                cpu_rate: 1.0,
                cpu_time_ns: cpu_s * 1_000_000_000,
                sampled_at_ms: t0 + minute * 60_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let host = host.clone();
        let b = HeartbeatRequest {
            vms: vec![vm],
            vms_listed: true,
            ..Default::default()
        };
        s.run_sync(move |c| hosts::heartbeat(c, &host, &b, 0, t0 + minute * 60_000))
            .unwrap();
    };
    beat(0, 100, true);
    for m in 1..=10 {
        beat(m, 100 + 60 * m as u64, true);
    }
    for m in 11..60 {
        beat(m, 700, false);
    }
    let r = s
        .run_sync(|c| history::report(c, t0, t0 + H, Some(&inst), t0 + H))
        .unwrap();
    assert!(
        (r[0].cpu_used_hours - 600.0 / 3600.0).abs() < 1e-9,
        "{}",
        r[0].cpu_used_hours
    );
    assert!(r[0].cpu_used_hours <= r[0].vcpu_hours + 1e-9);
    let stopped_rate: f64 = s
        .run_sync(move |c| {
            Ok(c.query_row(
                "SELECT cpu_rate FROM vps WHERE id = ?1",
                [v.id.to_string()],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(stopped_rate, 0.0, "a stopped VPS shows no CPU");
}

#[test]
fn a_host_whose_hypervisor_is_silent_is_degraded_and_its_vps_keep_their_state() {
    use betang_proto::v1::{HostState, PowerState, VmStatus, VpsState as P};
    let (s, created) = one_running_vps();
    let (vps_id, generation) = (created.id, created.generation);
    let id = vps_id.to_string();
    let host = HostId::parse("a").unwrap();
    let beat = |b: HeartbeatRequest, at: i64| {
        let host = host.clone();
        s.run_sync(move |c| hosts::heartbeat(c, &host, &b, 0, at))
            .unwrap();
    };
    let read_host = |at: i64| {
        s.run_sync(move |c| hosts::list(c, at, 10_000))
            .unwrap()
            .remove(0)
    };
    let running = |unresponsive_since_ms: i64| VmStatus {
        vps_id: id.clone(),
        power: PowerState::Running as i32,
        generation,
        unresponsive_since_ms,
        ..Default::default()
    };
    beat(
        HeartbeatRequest {
            vms: vec![running(0)],
            vms_listed: true,
            ..Default::default()
        },
        NOW,
    );
    assert_eq!(read_host(NOW).state, HostState::Up as i32);

    // libvirtd stops answering: the agent still beats, saying so.
    let silent = HeartbeatRequest {
        hypervisor_problem: "libvirt does not answer".into(),
        hypervisor_problem_since_ms: NOW + 500,
        ..Default::default()
    };
    for t in 1..=30 {
        beat(silent.clone(), NOW + t * 1_000);
    }
    let h = read_host(NOW + 30_000);
    assert_eq!(h.state, HostState::Degraded as i32, "degraded, never down");
    assert_eq!(h.state_reason, "libvirt does not answer");
    assert_eq!(h.state_since_ms, NOW + 500);
    // The VPS keeps what it was: nothing about it is known to have changed.
    let v = s.run_sync(|c| vps::get_any(c, &vps_id)).unwrap();
    assert_eq!(v.to_proto().state, P::Running as i32);
    assert_eq!(v.observed_power, "running");
    // Nothing is placed on it.
    let views = s
        .run_sync(|c| hosts::views(c, NOW + 30_000, 10_000))
        .unwrap();
    assert!(views[0].degraded);

    // A silent host that also stops beating is DOWN.
    assert_eq!(read_host(NOW + 45_000).state, HostState::Down as i32);

    // Back: one record each way in the audit trail.
    beat(
        HeartbeatRequest {
            vms: vec![running(0)],
            vms_listed: true,
            ..Default::default()
        },
        NOW + 46_000,
    );
    let h = read_host(NOW + 46_000);
    assert_eq!(
        (h.state, h.state_reason.as_str()),
        (HostState::Up as i32, "")
    );
    let actions: Vec<String> = s
        .run_sync(|c| {
            let mut q =
                c.prepare("SELECT action FROM audit WHERE action LIKE 'host.%' ORDER BY id")?;
            let rows = q.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .unwrap();
    assert_eq!(actions, ["host.degraded", "host.recovered"]);

    // One guest stops answering: its VPS says since when, and only it.
    beat(
        HeartbeatRequest {
            vms: vec![running(NOW + 40_000)],
            vms_listed: true,
            ..Default::default()
        },
        NOW + 47_000,
    );
    let v = s.run_sync(|c| vps::get_any(c, &vps_id)).unwrap().to_proto();
    assert_eq!(v.unresponsive_since_ms, NOW + 40_000);
    assert_eq!(v.state, P::Running as i32);
    assert_eq!(read_host(NOW + 47_000).state, HostState::Up as i32);
    beat(
        HeartbeatRequest {
            vms: vec![running(0)],
            vms_listed: true,
            ..Default::default()
        },
        NOW + 48_000,
    );
    let v = s.run_sync(|c| vps::get_any(c, &vps_id)).unwrap().to_proto();
    assert_eq!(v.unresponsive_since_ms, 0);
}

/// Requests hold no quota, so an institution's waiting requests are capped:
/// one past the cap is refused and creates nothing; a decision makes room;
/// operators creating directly are not held by it.
#[test]
fn an_institutions_waiting_requests_are_capped() {
    use crate::lifecycle::VpsState;
    let s = Store::open_in_memory().unwrap();
    register(&s, "a", 64);
    let inst = institution(&s);
    let member = member_of(&inst);
    let cap = || Placement {
        max_pending: 3,
        ..placement()
    };
    let ask = |n: usize| {
        let (who, p, v) = (member.clone(), cap(), new_vps(&inst, n, 1));
        s.run_sync(move |c| vps::create(c, &who, &v, &p, NOW))
    };
    let first = ask(0).unwrap();
    ask(1).unwrap();
    ask(2).unwrap();
    let e = ask(3).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "institution {} already has 3 requests waiting for approval, the most it may have; \
             cancel one or wait for a decision",
            s.run_sync(|c| identity::get_institution(c, &inst))
                .unwrap()
                .code
        )
    );
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::ResourceExhausted
    );
    let count = || {
        s.run_sync(|c| Ok(c.query_row("SELECT COUNT(*) FROM vps", [], |r| r.get::<_, i64>(0))?))
            .unwrap()
    };
    assert_eq!(count(), 3, "nothing was created");
    // An operator's direct creation is not a request.
    let (p, v) = (cap(), new_vps(&inst, 4, 1));
    s.run_sync(move |c| vps::create(c, &Caller::system(), &v, &p, NOW))
        .unwrap();
    // A cancelled request makes room.
    let who = member.clone();
    s.run_sync(move |c| vps::decide_against(c, &who, &first.id, VpsState::Cancelled, "", NOW))
        .unwrap();
    ask(5).unwrap();
    assert!(ask(6).is_err());
}

/// Every token expires: one asked for without a lifetime gets the longest
/// allowed, a longer one is refused; running bootstrap-admin again revokes
/// the bootstrap token before it.
#[test]
fn tokens_expire_and_bootstrap_keeps_one_token() {
    let s = Store::open_in_memory().unwrap();
    let (admin, first) = s
        .run_sync(|c| identity::bootstrap_admin(c, "dc", "Data center", "root", NOW))
        .unwrap();
    let (_, second) = s
        .run_sync(|c| identity::bootstrap_admin(c, "dc", "Data center", "root", NOW + 1))
        .unwrap();
    let who = |secret: &str| {
        let h = crate::auth::hash_secret(secret);
        s.run_sync(move |c| identity::caller_for_hash(c, &h, NOW + 2))
    };
    assert!(
        who(&first).is_err(),
        "the earlier bootstrap token is revoked"
    );
    let (_, expires) = who(&second).unwrap();
    assert_eq!(expires, NOW + 1 + 365 * 86_400_000);
    let id = admin.id.clone();
    let (t, _) = s
        .run_sync(move |c| identity::create_token(c, &Caller::system(), &id, "ci", 0, 30, NOW))
        .unwrap();
    assert_eq!(t.expires_at_ms, NOW + 30 * 86_400_000);
    let id = admin.id.clone();
    let e = s
        .run_sync(move |c| {
            identity::create_token(c, &Caller::system(), &id, "ci", 31 * 86_400, 30, NOW)
        })
        .unwrap_err();
    assert!(e.to_string().starts_with("ttl_seconds: "), "{e}");
    assert!(e.to_string().contains("30 days"), "{e}");
}

/// Token hashes, officials' personal data and user-data are readable by the
/// controller's user only, whatever the umask; so is the directory.
#[test]
fn the_store_files_are_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::config::ControllerConfig::with_data_dir(dir.path().join("data"));
    cfg.tls = None;
    let s = crate::server::open_store(&cfg).unwrap();
    register(&s, "a", 8);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg.data_dir), 0o700);
    assert_eq!(mode(&cfg.data_dir.join("betang.db")), 0o600);
    assert_eq!(mode(&cfg.data_dir.join("betang.db-wal")), 0o600);
}

/// A token's use is recorded (when, from where) without counting as a
/// change of who the caller is: cached callers stay, while a revocation
/// still empties the cache.
#[test]
fn a_tokens_use_is_recorded_and_keeps_the_callers_cached() {
    let s = Store::open_in_memory().unwrap();
    let (admin, secret) = s
        .run_sync(|c| identity::bootstrap_admin(c, "dc", "Data center", "root", NOW))
        .unwrap();
    let before = s.callers.generation();
    let hash = crate::auth::hash_secret(&secret);
    s.run_sync(move |c| identity::note_token_use(c, &hash, "192.0.2.7", NOW + 5))
        .unwrap();
    assert_eq!(s.callers.generation(), before, "the cache stays");
    let id = admin.id.clone();
    let tokens = s.run_sync(move |c| identity::list_tokens(c, &id)).unwrap();
    assert_eq!(
        (tokens[0].last_used_at_ms, tokens[0].last_used_from.as_str()),
        (NOW + 5, "192.0.2.7")
    );
    let token = tokens[0].id.clone();
    s.run_sync(move |c| identity::revoke_token(c, &Caller::system(), &token, NOW + 6))
        .unwrap();
    assert_ne!(s.callers.generation(), before, "a revocation empties it");
}
