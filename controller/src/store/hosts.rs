//! Hosts, their images, their heartbeats and the VM reports they carry.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use betang_proto::v1::{
    HeartbeatRequest, Host, HostCapacity, HostInfoResponse, HostState, HostUsage, Image, Leftover,
    PowerState, VmStatus,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    auth::Caller,
    error::ApiError,
    ids::HostId,
    lifecycle::{DesiredPower, VpsState},
    scheduler::{HostView, Resources},
};

/// Records a host (again). Capacity and images are replaced by what the agent says now.
pub fn register(
    c: &mut Connection,
    info: &HostInfoResponse,
    endpoint: &str,
    now_ms: i64,
) -> Result<(), ApiError> {
    let id = HostId::parse(&info.host_id)?;
    let cap = info.capacity.unwrap_or_default();
    let labels: BTreeMap<&String, &String> = info.labels.iter().collect();
    let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
    let tx = c.savepoint()?;
    tx.prepare_cached(
        "INSERT INTO hosts (id, hostname, agent_endpoint, domain_type, vcpus, memory_mib, disk_gib,
                            registered_at_ms, last_heartbeat_ms, zone, labels)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)
         ON CONFLICT(id) DO UPDATE SET hostname = ?2, agent_endpoint = ?3, domain_type = ?4,
             vcpus = ?5, memory_mib = ?6, disk_gib = ?7, last_heartbeat_ms = ?8, zone = ?9,
             labels = ?10",
    )?
    .execute(params![
        id.as_str(),
        info.hostname,
        endpoint,
        info.domain_type,
        cap.vcpus,
        cap.memory_mib as i64,
        cap.disk_gib as i64,
        now_ms,
        info.zone,
        labels
    ])?;
    tx.prepare_cached("DELETE FROM host_images WHERE host_id = ?1")?
        .execute([id.as_str()])?;
    for img in &info.images {
        tx.prepare_cached(
            "INSERT INTO host_images (host_id, name, description, os, min_disk_gib, size_bytes,
                 digest, min_memory_mib)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            id.as_str(),
            img.name,
            img.description,
            img.os,
            img.min_disk_gib as i64,
            img.size_bytes as i64,
            img.digest,
            img.min_memory_mib as i64
        ])?;
    }
    let down_since =
        record_beat(&tx, &id, now_ms, info.usage.as_ref())?.map_or(0, |b| b.down_since_ms);
    record_back(&tx, &id, down_since, now_ms)?;
    tx.commit()?;
    Ok(())
}

/// What a host's row said before a heartbeat: since when it was DOWN (0: it
/// was not), and what of its hypervisor did not answer, since when.
struct Before {
    down_since_ms: i64,
    problem: String,
    degraded_since_ms: i64,
}

/// A heartbeat's time and, when it brings them, the host's figures, in one
/// statement that also tells what the row said of the host's health; `None`
/// for a host that is not registered. 500 heartbeats a second come to a
/// controller of 1,000 hosts.
fn record_beat(
    c: &Connection,
    id: &HostId,
    now_ms: i64,
    usage: Option<&HostUsage>,
) -> Result<Option<Before>, ApiError> {
    let before = |r: &rusqlite::Row| {
        Ok(Before {
            down_since_ms: r.get(0)?,
            problem: r.get(1)?,
            degraded_since_ms: r.get(2)?,
        })
    };
    let Some(u) = usage else {
        return Ok(c
            .prepare_cached(
                "UPDATE hosts SET last_heartbeat_ms = ?2 WHERE id = ?1
                 RETURNING down_since_ms, hypervisor_problem, degraded_since_ms",
            )?
            .query_row(params![id.as_str(), now_ms], before)
            .optional()?);
    };
    Ok(c.prepare_cached(
        "UPDATE hosts SET last_heartbeat_ms = ?2, cpu_percent = ?3, mem_used_bytes = ?4,
                 mem_total_bytes = ?5, disk_used_bytes = ?6, disk_total_bytes = ?7,
                 load_1m = ?8, load_5m = ?9, load_15m = ?10, usage_at_ms = ?11
             WHERE id = ?1 RETURNING down_since_ms, hypervisor_problem, degraded_since_ms",
    )?
    .query_row(
        params![
            id.as_str(),
            now_ms,
            u.cpu_percent,
            u.memory_used_bytes as i64,
            u.memory_total_bytes as i64,
            u.disk_used_bytes as i64,
            u.disk_total_bytes as i64,
            u.load_1m,
            u.load_5m,
            u.load_15m,
            u.sampled_at_ms
        ],
        before,
    )
    .optional()?)
}

struct VpsOnHost {
    id: String,
    state: VpsState,
    desired: DesiredPower,
    generation: u64,
    observed: String,
    usage_at_ms: i64,
    cpu_time_ns: u64,
    unresponsive_since_ms: i64,
}

/// Applies a heartbeat: host usage, whether its hypervisor answers, and each
/// VM's usage, power and whether its guest answers. A report older than the
/// VPS's generation changes no state.
/// Only what changed is written: a VM's usage once per `usage_every_ms`, its
/// power when it differs from what is recorded. `vm_dirs`, when the agent
/// sent them, are checked for leftovers.
pub fn heartbeat(
    c: &mut Connection,
    host_id: &HostId,
    beat: &HeartbeatRequest,
    usage_every_ms: i64,
    now_ms: i64,
) -> Result<(), ApiError> {
    let (usage, vms, vms_listed) = (beat.usage.as_ref(), &beat.vms, beat.vms_listed);
    let vm_dirs = beat.vm_dirs_listed.then_some(beat.vm_dirs.as_slice());
    let tx = c.savepoint()?;
    let Some(before) = record_beat(&tx, host_id, now_ms, usage)? else {
        return Err(ApiError::HostNotFound(host_id.to_string()));
    };
    record_back(&tx, host_id, before.down_since_ms, now_ms)?;
    record_hypervisor(&tx, host_id, &before, beat, now_ms)?;
    let mut placed: HashMap<String, VpsOnHost> = HashMap::new();
    {
        let mut q = tx.prepare_cached(
            "SELECT id, state, desired_power, generation, observed_power, usage_at_ms, cpu_time_ns,
                    unresponsive_since_ms
             FROM vps WHERE host_id = ?1 AND state <> 'DELETED'",
        )?;
        let rows = q.query_map([host_id.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (id, state, desired, generation, observed, usage_at_ms, cpu_time_ns, unresponsive) =
                row?;
            let (Some(state), Some(desired)) =
                (VpsState::parse(&state), DesiredPower::parse(&desired))
            else {
                continue;
            };
            placed.insert(
                id.clone(),
                VpsOnHost {
                    id,
                    state,
                    desired,
                    generation: generation as u64,
                    observed,
                    usage_at_ms,
                    cpu_time_ns: cpu_time_ns as u64,
                    unresponsive_since_ms: unresponsive,
                },
            );
        }
    }
    let mut seen = BTreeSet::new();
    for vm in vms {
        let Some(v) = placed.get(&vm.vps_id) else {
            continue;
        };
        seen.insert(v.id.clone());
        if vm.unresponsive_since_ms != v.unresponsive_since_ms {
            tx.prepare_cached("UPDATE vps SET unresponsive_since_ms = ?2 WHERE id = ?1")?
                .execute(params![v.id, vm.unresponsive_since_ms])?;
            if vm.unresponsive_since_ms != 0 {
                tracing::warn!(vps_id = %v.id, host_id = %host_id, "the guest does not answer");
            } else {
                tracing::info!(vps_id = %v.id, host_id = %host_id, "the guest answers again");
            }
        }
        if let Some(mut u) = vm
            .usage
            .filter(|u| u.sampled_at_ms - v.usage_at_ms >= usage_every_ms)
        {
            // A guest that is not running uses no CPU, whatever rate its
            // last samples left behind.
            if vm.power != PowerState::Running as i32 {
                u.cpu_rate = 0.0;
            }
            let u = &u;
            tx.prepare_cached(
                "UPDATE vps SET cpu_rate = ?2, cpu_time_ns = ?3, mem_max_bytes = ?4,
                     mem_used_bytes = ?5, disk_read_bytes = ?6, disk_write_bytes = ?7,
                     net_rx_bytes = ?8, net_tx_bytes = ?9, usage_at_ms = ?10, mem_rss_bytes = ?11
                 WHERE id = ?1",
            )?
            .execute(params![
                v.id,
                u.cpu_rate,
                u.cpu_time_ns as i64,
                u.memory_max_bytes as i64,
                u.memory_used_bytes as i64,
                u.disk_read_bytes as i64,
                u.disk_write_bytes as i64,
                u.net_rx_bytes as i64,
                u.net_tx_bytes as i64,
                u.sampled_at_ms,
                u.memory_rss_bytes as i64
            ])?;
            let used = super::history::cpu_used_ns(v.cpu_time_ns, u.cpu_time_ns);
            super::history::record(&tx, &v.id, u, used)?;
        }
        if vm.generation < v.generation || !matches!(v.state, VpsState::Running | VpsState::Stopped)
        {
            continue;
        }
        let power = PowerState::try_from(vm.power).unwrap_or(PowerState::Unspecified);
        let observed = power_name(power);
        match (v.desired, power) {
            // The guest powered itself off: that is now what its owner wants.
            (DesiredPower::Running, PowerState::Stopped) => {
                tx.prepare_cached(
                    "UPDATE vps SET state = 'STOPPED', desired_power = 'stopped',
                         generation = generation + 1, observed_power = ?2, updated_at_ms = ?3,
                         state_reason = 'the guest powered itself off'
                     WHERE id = ?1",
                )?
                .execute(params![v.id, observed, now_ms])?;
            }
            _ => {
                let state = if power == PowerState::Running {
                    VpsState::Running
                } else {
                    VpsState::Stopped
                };
                if state == v.state && observed == v.observed {
                    continue;
                }
                tx.prepare_cached(
                    "UPDATE vps SET observed_power = ?2,
                         state = ?3,
                         updated_at_ms = CASE WHEN state = ?3 THEN updated_at_ms ELSE ?4 END
                     WHERE id = ?1",
                )?
                .execute(params![v.id, observed, state.as_str(), now_ms])?;
            }
        }
    }
    if vms_listed {
        for v in placed.values() {
            if !seen.contains(&v.id)
                && v.observed != "absent"
                && matches!(v.state, VpsState::Running | VpsState::Stopped)
            {
                tx.prepare_cached("UPDATE vps SET observed_power = 'absent' WHERE id = ?1")?
                    .execute([&v.id])?;
            }
        }
        if let Some(dirs) = vm_dirs {
            record_leftovers(
                &tx,
                host_id,
                vms,
                dirs,
                &|id| placed.contains_key(id),
                now_ms,
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Records whether the host's hypervisor answers, writing only when that
/// changes: DEGRADED and back are each recorded once in the audit trail.
fn record_hypervisor(
    c: &Connection,
    id: &HostId,
    before: &Before,
    beat: &HeartbeatRequest,
    now_ms: i64,
) -> Result<(), ApiError> {
    let since = before.degraded_since_ms;
    let now_problem = beat.hypervisor_problem.as_str();
    if now_problem == before.problem {
        return Ok(());
    }
    let started = match beat.hypervisor_problem_since_ms {
        0 => now_ms,
        t => t.min(now_ms),
    };
    let (new_since, action, result) = match (now_problem.is_empty(), since) {
        (true, _) => (
            0,
            Some("host.recovered"),
            format!(
                "the hypervisor answers again after {} s",
                (now_ms - since).max(0) / 1000
            ),
        ),
        (false, 0) => (started, Some("host.degraded"), now_problem.to_owned()),
        // Still degraded, for another reason.
        (false, s) => (s, None, now_problem.to_owned()),
    };
    c.prepare_cached(
        "UPDATE hosts SET hypervisor_problem = ?2, degraded_since_ms = ?3 WHERE id = ?1",
    )?
    .execute(params![id.as_str(), now_problem, new_since])?;
    if let Some(action) = action {
        tracing::warn!(host_id = %id, %result, action, "hypervisor");
        super::identity::audit(
            c,
            &Caller::system(),
            "",
            action,
            id.as_str(),
            &result,
            now_ms,
        )?;
    }
    Ok(())
}

/// Records what the host holds that no live VPS owns: a domain or a VM
/// directory named after a VPS that is not placed there (`placed_here`), nor
/// moving there, nor being cleaned up there. Runs with every heartbeat, so
/// the usual case (everything placed here) costs one statement.
fn record_leftovers(
    c: &Connection,
    host: &HostId,
    vms: &[VmStatus],
    dirs: &[String],
    placed_here: &dyn Fn(&str) -> bool,
    now_ms: i64,
) -> Result<(), ApiError> {
    let mut found: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for v in vms.iter().filter(|v| !placed_here(&v.vps_id)) {
        found.entry(v.vps_id.as_str()).or_default().0 = true;
    }
    for d in dirs.iter().filter(|d| !placed_here(d)) {
        found.entry(d.as_str()).or_default().1 = true;
    }
    if found.is_empty() {
        c.prepare_cached("DELETE FROM host_orphans WHERE host_id = ?1")?
            .execute([host.as_str()])?;
        return Ok(());
    }
    {
        let mut owned = c.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM vps WHERE id = ?1 AND (
                 (host_id = ?2 AND state <> 'DELETED')
                 OR (move_target = ?2 AND state = 'MIGRATING')))
             OR EXISTS (SELECT 1 FROM moves WHERE vps_id = ?1 AND (
                 (source = ?2 AND step = 'cleanup') OR (target = ?2 AND step IN ('copy', 'undo'))))",
        )?;
        let mut keep = BTreeMap::new();
        for (id, what) in found {
            if !owned.query_row(params![id, host.as_str()], |r| r.get::<_, bool>(0))? {
                keep.insert(id, what);
            }
        }
        found = keep;
    }
    let known: BTreeMap<String, String> = {
        let mut q = c.prepare_cached("SELECT vps_id, what FROM host_orphans WHERE host_id = ?1")?;
        q.query_map([host.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    let describe = |(domain, files): (bool, bool)| match (domain, files) {
        (true, true) => "domain and files",
        (true, false) => "domain",
        _ => "files",
    };
    for (id, what) in &known {
        if found.get(id.as_str()).map(|w| describe(*w)) != Some(what.as_str()) {
            c.prepare_cached("DELETE FROM host_orphans WHERE host_id = ?1 AND vps_id = ?2")?
                .execute(params![host.as_str(), id])?;
        }
    }
    for (id, w) in found {
        let what = describe(w);
        if known.get(id).map(String::as_str) != Some(what) {
            c.prepare_cached(
                "INSERT INTO host_orphans (host_id, vps_id, what, seen_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![host.as_str(), id, what, now_ms])?;
            tracing::warn!(host_id = %host, vps_id = id, what,
                "the host holds something no VPS owns; left for an operator");
        }
    }
    Ok(())
}

fn leftovers(
    c: &Connection,
    one: Option<&HostId>,
) -> Result<HashMap<String, Vec<Leftover>>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT host_id, vps_id, what, seen_ms FROM host_orphans {} ORDER BY host_id, vps_id",
        one_host(one, "host_id")
    ))?;
    let rows = q.query_map(rusqlite::params_from_iter(host_param(one)), |r| {
        Ok((
            r.get::<_, String>(0)?,
            Leftover {
                vps_id: r.get(1)?,
                what: r.get(2)?,
                since_ms: r.get(3)?,
            },
        ))
    })?;
    let mut out: HashMap<String, Vec<Leftover>> = HashMap::new();
    for row in rows {
        let (h, l) = row?;
        out.entry(h).or_default().push(l);
    }
    Ok(out)
}

/// Whether the host has been marked DOWN (silent for too long).
pub fn is_down(c: &Connection, id: &HostId) -> Result<bool, ApiError> {
    Ok(
        c.prepare_cached("SELECT down_since_ms <> 0 FROM hosts WHERE id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?
            .unwrap_or(false),
    )
}

/// A host that had been marked DOWN (at `since`; 0 when it was not) reports
/// again: record that it is back.
fn record_back(c: &Connection, id: &HostId, since: i64, now_ms: i64) -> Result<(), ApiError> {
    if since != 0 {
        c.prepare_cached("UPDATE hosts SET down_since_ms = 0 WHERE id = ?1")?
            .execute([id.as_str()])?;
        // The build clock of what waits for this host stood still meanwhile.
        c.prepare_cached(
            "UPDATE vps SET build_since_ms = build_since_ms + ?2
             WHERE host_id = ?1 AND state IN ('SCHEDULED', 'PROVISIONING')",
        )?
        .execute(params![id.as_str(), (now_ms - since).max(0)])?;
        let result = format!("back after {} s", (now_ms - since).max(0) / 1000);
        tracing::info!(host_id = %id, %result, "host is back");
        super::identity::audit(
            c,
            &Caller::system(),
            "",
            "host.up",
            id.as_str(),
            &result,
            now_ms,
        )?;
    }
    Ok(())
}

/// Marks hosts whose heartbeats stopped as DOWN, once each, in the audit
/// trail. (Whether a host is down is always derived from its last heartbeat;
/// this only records the change.)
pub fn mark_down(
    c: &mut Connection,
    now_ms: i64,
    down_after_ms: i64,
) -> Result<Vec<String>, ApiError> {
    let tx = c.savepoint()?;
    let silent: Vec<(String, i64)> = {
        let mut q = tx.prepare_cached(
            "SELECT id, last_heartbeat_ms FROM hosts WHERE last_heartbeat_ms < ?1 AND down_since_ms = 0",
        )?;
        let rows = q.query_map([now_ms - down_after_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (id, last) in &silent {
        tx.prepare_cached("UPDATE hosts SET down_since_ms = ?2 WHERE id = ?1")?
            .execute(params![id, now_ms])?;
        let result = format!("no heartbeat for {} ms", now_ms - last);
        tracing::warn!(host_id = %id, %result, "host is DOWN");
        super::identity::audit(&tx, &Caller::system(), "", "host.down", id, &result, now_ms)?;
    }
    tx.commit()?;
    Ok(silent.into_iter().map(|(id, _)| id).collect())
}

pub fn power_name(p: PowerState) -> &'static str {
    match p {
        PowerState::Running => "running",
        PowerState::Stopped => "stopped",
        PowerState::Paused => "paused",
        PowerState::Crashed => "crashed",
        PowerState::Absent => "absent",
        PowerState::Unspecified => "unknown",
    }
}

pub fn endpoint(c: &Connection, id: &HostId) -> Result<String, ApiError> {
    c.prepare_cached("SELECT agent_endpoint FROM hosts WHERE id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?
        .ok_or_else(|| ApiError::HostNotFound(id.to_string()))
}

/// What each host holds, from the totals the triggers keep.
fn allocations(
    c: &Connection,
    one: Option<&HostId>,
) -> Result<HashMap<String, (Resources, u32)>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT host_id, vcpus, memory_mib, disk_gib, vps_count FROM host_allocation {}",
        one_host(one, "host_id")
    ))?;
    let rows = q.query_map(rusqlite::params_from_iter(host_param(one)), |r| {
        Ok((
            r.get::<_, String>(0)?,
            Resources {
                vcpus: r.get::<_, i64>(1)? as u64,
                memory_mib: r.get::<_, i64>(2)? as u64,
                disk_gib: r.get::<_, i64>(3)? as u64,
            },
            r.get::<_, i64>(4)? as u32,
        ))
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let (h, res, n) = row?;
        out.insert(h, (res, n));
    }
    Ok(out)
}

/// `WHERE` for queries over every host, or over one (`?1`).
fn one_host(one: Option<&HostId>, column: &str) -> String {
    match one {
        Some(_) => format!("WHERE {column} = ?1"),
        None => String::new(),
    }
}

fn host_param(one: Option<&HostId>) -> Vec<String> {
    one.map(|h| h.as_str().to_owned()).into_iter().collect()
}

fn images(c: &Connection, one: Option<&HostId>) -> Result<HashMap<String, Vec<Image>>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT host_id, name, description, os, min_disk_gib, size_bytes, digest, min_memory_mib
         FROM host_images {}
         ORDER BY host_id, name",
        one_host(one, "host_id")
    ))?;
    let rows = q.query_map(rusqlite::params_from_iter(host_param(one)), |r| {
        Ok((
            r.get::<_, String>(0)?,
            Image {
                name: r.get(1)?,
                description: r.get(2)?,
                os: r.get(3)?,
                min_disk_gib: r.get::<_, i64>(4)? as u64,
                size_bytes: r.get::<_, i64>(5)? as u64,
                digest: r.get(6)?,
                min_memory_mib: r.get::<_, i64>(7)? as u64,
                ..Image::default()
            },
        ))
    })?;
    let mut out: HashMap<String, Vec<Image>> = HashMap::new();
    for row in rows {
        let (h, img) = row?;
        out.entry(h).or_default().push(img);
    }
    Ok(out)
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    serde_json::from_str(s).unwrap_or_default()
}

/// Anti-affinity groups (as "<institution>/<group>") with a VPS on each host.
fn groups(
    c: &Connection,
    one: Option<&HostId>,
) -> Result<HashMap<String, BTreeSet<String>>, ApiError> {
    let mut q = c.prepare_cached(&format!(
        "SELECT host_id, COALESCE(institution_id, '') || '/' || anti_affinity_group FROM vps
         WHERE anti_affinity_group <> '' AND host_id IS NOT NULL AND state <> 'DELETED' {}",
        match one {
            Some(_) => "AND host_id = ?1",
            None => "",
        }
    ))?;
    let rows = q.query_map(rusqlite::params_from_iter(host_param(one)), |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for row in rows {
        let (h, g) = row?;
        out.entry(h).or_default().insert(g);
    }
    Ok(out)
}

/// vCPUs, MiB and GiB as stored.
pub(super) fn resources(v: [i64; 3]) -> Resources {
    Resources {
        vcpus: v[0].max(0) as u64,
        memory_mib: v[1].max(0) as u64,
        disk_gib: v[2].max(0) as u64,
    }
}

/// Hosts as the scheduler sees them (every host, or one), each with its last
/// heartbeat; `up` is left for the caller to judge against the clock.
pub fn read_views(c: &Connection, one: Option<&HostId>) -> Result<Vec<(HostView, i64)>, ApiError> {
    let mut imgs = images(c, one)?;
    let mut grps = groups(c, one)?;
    let mut q = c.prepare_cached(&format!(
        "SELECT h.id, h.vcpus, h.memory_mib, h.disk_gib, h.last_heartbeat_ms, h.zone, h.labels,
                h.weight, h.cordoned, COALESCE(a.vcpus, 0), COALESCE(a.memory_mib, 0),
                COALESCE(a.disk_gib, 0), h.degraded_since_ms <> 0
         FROM hosts h LEFT JOIN host_allocation a ON a.host_id = h.id {} ORDER BY h.id",
        one_host(one, "h.id")
    ))?;
    let rows = q.query_map(rusqlite::params_from_iter(host_param(one)), |r| {
        Ok((
            r.get::<_, String>(0)?,
            [
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ],
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, f64>(7)?,
            r.get::<_, bool>(8)?,
            [
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
                r.get::<_, i64>(11)?,
            ],
            r.get::<_, bool>(12)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, cap, hb, zone, labels, weight, cordoned, alloc, degraded) = row?;
        out.push((
            HostView {
                id: HostId::parse(&id)?,
                up: true,
                degraded,
                schedulable: !cordoned,
                capacity: resources(cap),
                allocated: resources(alloc),
                images: imgs
                    .remove(&id)
                    .map(|v| {
                        v.into_iter()
                            .flat_map(|i| {
                                let versioned = crate::scheduler::image_key(&i.name, &i.digest);
                                [i.name, versioned]
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                zone,
                labels: parse_labels(&labels),
                weight,
                groups: grps.remove(&id).unwrap_or_default(),
            },
            hb,
        ));
    }
    Ok(out)
}

/// Every host as the scheduler sees it now, straight from the rows: what the
/// in-memory index must agree with.
#[cfg(test)]
pub fn views(c: &Connection, now_ms: i64, down_after_ms: i64) -> Result<Vec<HostView>, ApiError> {
    Ok(read_views(c, None)?
        .into_iter()
        .map(|(mut v, hb)| {
            v.up = now_ms - hb <= down_after_ms;
            v
        })
        .collect())
}

/// One host as the scheduler sees it now, read inside the caller's transaction.
pub fn view(
    c: &Connection,
    id: &HostId,
    now_ms: i64,
    down_after_ms: i64,
) -> Result<Option<HostView>, ApiError> {
    Ok(read_views(c, Some(id))?.pop().map(|(mut v, hb)| {
        v.up = now_ms - hb <= down_after_ms;
        v
    }))
}

/// An image of the catalogue by name, as one of the hosts offering it describes it.
pub fn catalogue_image(c: &Connection, name: &str) -> Result<Option<Image>, ApiError> {
    Ok(c.prepare_cached(
        "SELECT name, description, os, min_disk_gib, size_bytes, digest, min_memory_mib
         FROM host_images WHERE name = ?1 LIMIT 1",
    )?
    .query_row([name], |r| {
        Ok(Image {
            name: r.get(0)?,
            description: r.get(1)?,
            os: r.get(2)?,
            min_disk_gib: r.get::<_, i64>(3)? as u64,
            size_bytes: r.get::<_, i64>(4)? as u64,
            digest: r.get(5)?,
            min_memory_mib: r.get::<_, i64>(6)? as u64,
            ..Image::default()
        })
    })
    .optional()?)
}

/// The digest of the image `name` as `host` holds it ("" when the host does
/// not hold it, or its agent does not report digests).
pub fn image_digest(c: &Connection, host: &HostId, name: &str) -> Result<String, ApiError> {
    Ok(
        c.prepare_cached("SELECT digest FROM host_images WHERE host_id = ?1 AND name = ?2")?
            .query_row([host.as_str(), name], |r| r.get(0))
            .optional()?
            .unwrap_or_default(),
    )
}

/// Hosts whose last heartbeat is too old.
pub fn down_hosts(
    c: &Connection,
    now_ms: i64,
    down_after_ms: i64,
) -> Result<std::collections::HashSet<String>, ApiError> {
    let mut q = c.prepare_cached("SELECT id FROM hosts WHERE last_heartbeat_ms < ?1")?;
    let rows = q.query_map([now_ms - down_after_ms], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Cordon or uncordon a host, or set its weight; audited.
pub fn update(
    c: &mut Connection,
    actor: &Caller,
    id: &HostId,
    change: HostChange,
    now_ms: i64,
) -> Result<(), ApiError> {
    let tx = c.savepoint()?;
    let (action, result, n) = match change {
        HostChange::Cordon(on) => {
            let n = tx
                .prepare_cached("UPDATE hosts SET cordoned = ?2 WHERE id = ?1")?
                .execute(params![id.as_str(), on])?;
            let action = if on { "host.cordon" } else { "host.uncordon" };
            (
                action,
                if on { "cordoned" } else { "schedulable" }.to_owned(),
                n,
            )
        }
        HostChange::Weight(w) => {
            if !w.is_finite() || !(0.0..=100.0).contains(&w) {
                return Err(ApiError::invalid("weight", "must be between 0 and 100"));
            }
            let n = tx
                .prepare_cached("UPDATE hosts SET weight = ?2 WHERE id = ?1")?
                .execute(params![id.as_str(), w])?;
            ("host.set_weight", format!("{w}"), n)
        }
    };
    if n == 0 {
        return Err(ApiError::HostNotFound(id.to_string()));
    }
    super::identity::audit(&tx, actor, "", action, id.as_str(), &result, now_ms)?;
    tx.commit()?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub enum HostChange {
    Cordon(bool),
    Weight(f64),
}

/// One host for operators.
pub fn get(c: &Connection, id: &HostId, now_ms: i64, down_after_ms: i64) -> Result<Host, ApiError> {
    read(c, Some(id), now_ms, down_after_ms)?
        .pop()
        .ok_or_else(|| ApiError::HostNotFound(id.to_string()))
}

/// Hosts for operators, with allocation, usage and state.
pub fn list(c: &Connection, now_ms: i64, down_after_ms: i64) -> Result<Vec<Host>, ApiError> {
    read(c, None, now_ms, down_after_ms)
}

fn read(
    c: &Connection,
    one: Option<&HostId>,
    now_ms: i64,
    down_after_ms: i64,
) -> Result<Vec<Host>, ApiError> {
    let alloc = allocations(c, one)?;
    let mut imgs = images(c, one)?;
    let mut left = leftovers(c, one)?;
    let mut q = c.prepare_cached(&format!(
        "SELECT id, hostname, agent_endpoint, domain_type, vcpus, memory_mib, disk_gib,
                last_heartbeat_ms, cpu_percent, mem_used_bytes, mem_total_bytes,
                disk_used_bytes, disk_total_bytes, load_1m, load_5m, load_15m, usage_at_ms,
                zone, labels, weight, cordoned, hypervisor_problem, degraded_since_ms
         FROM hosts {} ORDER BY id",
        one_host(one, "id")
    ))?;
    let rows = q.query_map(rusqlite::params_from_iter(host_param(one)), |r| {
        let id: String = r.get(0)?;
        let hb: i64 = r.get(7)?;
        let degraded_since: i64 = r.get(22)?;
        Ok(Host {
            id,
            hostname: r.get(1)?,
            agent_endpoint: r.get(2)?,
            domain_type: r.get(3)?,
            state: if now_ms - hb > down_after_ms {
                HostState::Down as i32
            } else if degraded_since != 0 {
                HostState::Degraded as i32
            } else {
                HostState::Up as i32
            },
            state_reason: if degraded_since != 0 {
                r.get(21)?
            } else {
                String::new()
            },
            state_since_ms: degraded_since,
            capacity: Some(HostCapacity {
                vcpus: r.get::<_, i64>(4)? as u32,
                memory_mib: r.get::<_, i64>(5)? as u64,
                disk_gib: r.get::<_, i64>(6)? as u64,
            }),
            allocated: None,
            usage: Some(HostUsage {
                cpu_percent: r.get(8)?,
                memory_used_bytes: r.get::<_, i64>(9)? as u64,
                memory_total_bytes: r.get::<_, i64>(10)? as u64,
                disk_used_bytes: r.get::<_, i64>(11)? as u64,
                disk_total_bytes: r.get::<_, i64>(12)? as u64,
                load_1m: r.get(13)?,
                load_5m: r.get(14)?,
                load_15m: r.get(15)?,
                sampled_at_ms: r.get(16)?,
            }),
            last_heartbeat_ms: hb,
            vps_count: 0,
            images: Vec::new(),
            zone: r.get(17)?,
            labels: parse_labels(&r.get::<_, String>(18)?).into_iter().collect(),
            weight: r.get(19)?,
            cordoned: r.get(20)?,
            leftovers: Vec::new(),
            allocatable: None,
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        let mut h = row?;
        let (a, n) = alloc.get(&h.id).copied().unwrap_or_default();
        h.allocated = Some(HostCapacity {
            vcpus: a.vcpus as u32,
            memory_mib: a.memory_mib,
            disk_gib: a.disk_gib,
        });
        h.vps_count = n;
        h.images = imgs.remove(&h.id).unwrap_or_default();
        h.leftovers = left.remove(&h.id).unwrap_or_default();
        out.push(h);
    }
    Ok(out)
}

/// Every version of every image: those the hosts offer, with how many
/// hosts offer each, and those VPS stand on, with how many VPS (a version no
/// host offers any more shows while VPS still use it).
pub fn catalogue(c: &Connection) -> Result<Vec<Image>, ApiError> {
    let mut versions: BTreeMap<(String, String), Image> = BTreeMap::new();
    for (_, imgs) in images(c, None)? {
        for i in imgs {
            versions
                .entry((i.name.clone(), i.digest.clone()))
                .or_insert_with(|| i.clone())
                .host_count += 1;
        }
    }
    let mut q = c.prepare_cached(
        "SELECT image, image_digest, COUNT(*) FROM vps
         WHERE state NOT IN ('DELETED', 'REJECTED', 'CANCELLED', 'PENDING_APPROVAL')
         GROUP BY image, image_digest",
    )?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (name, digest, n) = row?;
        let v = versions
            .entry((name.clone(), digest.clone()))
            .or_insert_with(|| Image {
                name,
                digest,
                description: "no host offers this version any more".into(),
                ..Image::default()
            });
        v.vps_count = n as u32;
    }
    Ok(versions.into_values().collect())
}
