//! Usage history: the usage agents report, kept as 1-minute points for a day
//! and hourly points for 90 days, and the per-institution usage report built
//! from it and from the allocation spans (migration 0006).

use betang_proto::v1::{InstitutionUsage, UsagePoint, VmUsage};
use rusqlite::{Connection, params};

use crate::error::ApiError;

pub const MINUTE_S: i64 = 60;
pub const HOUR_S: i64 = 3600;
const HOUR_MS: i64 = HOUR_S * 1000;
/// How long each resolution is kept.
pub const KEEP_MINUTES_MS: i64 = 24 * HOUR_MS;
pub const KEEP_HOURS_MS: i64 = 90 * 24 * HOUR_MS;

/// CPU time used between two readings of a VPS's CPU-time counter; a
/// counter that went down was reset (its QEMU started again) and counts from
/// zero. The first reading (no earlier one) counts nothing: what the guest
/// used before Betang heard of it is not known to fall in this period.
pub fn cpu_used_ns(prev_ns: u64, cur_ns: u64) -> u64 {
    match (prev_ns, cur_ns) {
        (0, _) => 0,
        (p, c) if c >= p => c - p,
        (_, c) => c,
    }
}

/// Adds one reported sample to its minute and its hour, with the CPU time
/// used since the last sample (`cpu_ns`).
pub fn record(c: &Connection, vps_id: &str, u: &VmUsage, cpu_ns: u64) -> Result<(), ApiError> {
    let mut q = c.prepare_cached(
        "INSERT INTO usage_points (vps_id, step_s, at_ms, samples, cpu_rate_sum, mem_used_max,
                                   mem_rss_max, last_at_ms, disk_read_bytes, disk_write_bytes,
                                   net_rx_bytes, net_tx_bytes, cpu_ns)
         VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (vps_id, step_s, at_ms) DO UPDATE SET
             samples = samples + 1,
             cpu_rate_sum = cpu_rate_sum + excluded.cpu_rate_sum,
             cpu_ns = cpu_ns + excluded.cpu_ns,
             mem_used_max = max(mem_used_max, excluded.mem_used_max),
             mem_rss_max = max(mem_rss_max, excluded.mem_rss_max),
             last_at_ms = excluded.last_at_ms,
             disk_read_bytes = excluded.disk_read_bytes,
             disk_write_bytes = excluded.disk_write_bytes,
             net_rx_bytes = excluded.net_rx_bytes,
             net_tx_bytes = excluded.net_tx_bytes
         WHERE excluded.last_at_ms > last_at_ms",
    )?;
    for step in [MINUTE_S, HOUR_S] {
        let at = u.sampled_at_ms - u.sampled_at_ms.rem_euclid(step * 1000);
        q.execute(params![
            vps_id,
            step,
            at,
            u.cpu_rate,
            u.memory_used_bytes as i64,
            u.memory_rss_bytes as i64,
            u.sampled_at_ms,
            u.disk_read_bytes as i64,
            u.disk_write_bytes as i64,
            u.net_rx_bytes as i64,
            u.net_tx_bytes as i64,
            cpu_ns as i64,
        ])?;
    }
    Ok(())
}

/// Drops points past their keeping time; returns how many went.
pub fn prune(c: &Connection, now_ms: i64) -> Result<usize, ApiError> {
    let mut q = c.prepare_cached("DELETE FROM usage_points WHERE step_s = ?1 AND at_ms < ?2")?;
    Ok(q.execute(params![MINUTE_S, now_ms - KEEP_MINUTES_MS])?
        + q.execute(params![HOUR_S, now_ms - KEEP_HOURS_MS])?)
}

/// The resolution that serves a look back of `minutes`: minutes for up to a
/// day, hours beyond.
pub fn step_for(minutes: u32) -> i64 {
    if i64::from(minutes) * 60_000 <= KEEP_MINUTES_MS {
        MINUTE_S
    } else {
        HOUR_S
    }
}

/// Per-second rate between two cumulative counters; a counter that went
/// down was reset (the guest's QEMU restarted) and counts from zero.
fn rate(prev: i64, cur: i64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    let delta = if cur >= prev { cur - prev } else { cur };
    delta as f64 / seconds
}

/// The points of one VPS since `since_ms`, oldest first, with rates.
pub fn points(
    c: &Connection,
    vps_id: &str,
    since_ms: i64,
    step_s: i64,
) -> Result<Vec<UsagePoint>, ApiError> {
    let mut q = c.prepare_cached(
        "SELECT at_ms, samples, cpu_rate_sum, mem_used_max, mem_rss_max, last_at_ms,
                disk_read_bytes, disk_write_bytes, net_rx_bytes, net_tx_bytes
         FROM usage_points WHERE vps_id = ?1 AND step_s = ?2 AND at_ms >= ?3 ORDER BY at_ms",
    )?;
    // One point before the window gives the first point its rates.
    let rows: Vec<[i64; 10]> = q
        .query_map(params![vps_id, step_s, since_ms - step_s * 1000], |r| {
            let mut a = [0i64; 10];
            for (i, v) in a.iter_mut().enumerate() {
                *v = if i == 2 {
                    // cpu_rate_sum is REAL; kept as micro-vCPUs here.
                    (r.get::<_, f64>(i)? * 1e6) as i64
                } else {
                    r.get(i)?
                };
            }
            Ok(a)
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (i, p) in rows.iter().enumerate() {
        if p[0] < since_ms {
            continue;
        }
        let prev = i.checked_sub(1).map(|j| rows[j]);
        let secs = prev.map_or(0.0, |q| (p[5] - q[5]) as f64 / 1000.0);
        let r = |k: usize| prev.map_or(0.0, |q| rate(q[k], p[k], secs));
        out.push(UsagePoint {
            at_ms: p[0],
            step_seconds: step_s as u32,
            cpu_rate: p[2] as f64 / 1e6 / p[1].max(1) as f64,
            memory_used_bytes: p[3].max(0) as u64,
            memory_rss_bytes: p[4].max(0) as u64,
            disk_read_bytes_per_second: r(6),
            disk_write_bytes_per_second: r(7),
            net_rx_bytes_per_second: r(8),
            net_tx_bytes_per_second: r(9),
        });
    }
    Ok(out)
}

/// vCPU-hours, GiB-hours and CPU-hours used per institution in
/// [`from_ms`, `to_ms`), for every institution or one. Allocation counts
/// while a VPS holds quota; spans still open end at `now_ms`. CPU-hours used
/// add up the hourly points that start in the period.
pub fn report(
    c: &Connection,
    from_ms: i64,
    to_ms: i64,
    institution: Option<&str>,
    now_ms: i64,
) -> Result<Vec<InstitutionUsage>, ApiError> {
    let mut rows: Vec<InstitutionUsage> = {
        let mut q = c.prepare_cached(
            "SELECT id, code, name FROM institutions WHERE ?1 IS NULL OR id = ?1 ORDER BY code",
        )?;
        q.query_map([institution], |r| {
            Ok(InstitutionUsage {
                institution_id: r.get(0)?,
                code: r.get(1)?,
                name: r.get(2)?,
                ..Default::default()
            })
        })?
        .collect::<Result<_, _>>()?
    };
    let end = to_ms.min(now_ms);
    let mut spans = c.prepare_cached(
        "SELECT count(DISTINCT vps_id),
                coalesce(sum(vcpus * (min(coalesce(to_ms, ?3), ?3) - max(from_ms, ?2))), 0),
                coalesce(sum(memory_mib * (min(coalesce(to_ms, ?3), ?3) - max(from_ms, ?2))), 0),
                coalesce(sum(disk_gib * (min(coalesce(to_ms, ?3), ?3) - max(from_ms, ?2))), 0)
         FROM allocation_spans
         WHERE institution_id = ?1 AND from_ms < ?3 AND coalesce(to_ms, ?3) > ?2",
    )?;
    let mut cpu = c.prepare_cached(
        "SELECT coalesce(sum(p.cpu_ns), 0) / 3.6e12
         FROM usage_points p JOIN vps v ON v.id = p.vps_id
         WHERE v.institution_id = ?1 AND p.step_s = 3600 AND p.at_ms >= ?2 AND p.at_ms < ?3",
    )?;
    let hours = |ms: f64| ms / HOUR_MS as f64;
    for row in &mut rows {
        let (n, vcpu_ms, mib_ms, gib_ms): (i64, f64, f64, f64) = spans
            .query_row(params![row.institution_id, from_ms, end], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
        row.vps_count = n as u32;
        row.vcpu_hours = hours(vcpu_ms);
        row.memory_gib_hours = hours(mib_ms) / 1024.0;
        row.disk_gib_hours = hours(gib_ms);
        row.cpu_used_hours =
            cpu.query_row(params![row.institution_id, from_ms, to_ms], |r| r.get(0))?;
    }
    Ok(rows)
}
