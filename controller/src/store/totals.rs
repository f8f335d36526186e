//! The running totals of what each host holds and each institution uses
//! (`host_allocation`, `institution_usage`), kept by triggers in the same
//! transaction as every change to a VPS, whichever statement or controller
//! made it. Which states count is decided in one place, the lifecycle
//! (`VpsState::holds_capacity`, `VpsState::holds_quota`): the triggers are
//! written from it when the store opens, and when they differ from the ones
//! in the file they are replaced and the totals counted again from the rows.

use rusqlite::Connection;

use crate::{
    error::ApiError,
    lifecycle::{ALL_STATES, VpsState},
};

/// `('A', 'B', …)` of the states for which `pred` holds.
pub(crate) fn states_where(pred: fn(VpsState) -> bool) -> String {
    let names: Vec<String> = ALL_STATES
        .into_iter()
        .filter(|s| pred(*s))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("({})", names.join(", "))
}

const TRIGGERS: [&str; 3] = [
    "vps_totals_insert",
    "vps_totals_update",
    "vps_totals_delete",
];

/// What a row adds to (`+`) or takes from (`-`) the totals, as `ROW` (NEW or
/// OLD) stands.
fn apply(row: &str, sign: char, capacity: &str, quota: &str) -> String {
    let set = format!(
        "SET vcpus = vcpus {sign} {row}.vcpus, memory_mib = memory_mib {sign} {row}.memory_mib,
           disk_gib = disk_gib {sign} {row}.disk_gib, vps_count = vps_count {sign} 1"
    );
    format!(
        "
    UPDATE host_allocation {set}
     WHERE host_id = {row}.host_id AND {row}.state IN {capacity};
    UPDATE host_allocation {set}
     WHERE host_id = {row}.move_target AND {row}.state = 'MIGRATING';
    UPDATE institution_usage {set}
     WHERE institution_id = {row}.institution_id AND {row}.state IN {quota};"
    )
}

/// The three triggers, written from the lifecycle.
pub fn trigger_sql() -> [String; 3] {
    let capacity = states_where(VpsState::holds_capacity);
    let quota = states_where(VpsState::holds_quota);
    let add = |row| apply(row, '+', &capacity, &quota);
    let sub = |row| apply(row, '-', &capacity, &quota);
    [
        format!(
            "CREATE TRIGGER vps_totals_insert AFTER INSERT ON vps BEGIN{}\nEND",
            add("NEW")
        ),
        format!(
            "CREATE TRIGGER vps_totals_update AFTER UPDATE OF host_id, move_target, state, vcpus,
    memory_mib, disk_gib, institution_id ON vps
WHEN OLD.host_id IS NOT NEW.host_id OR OLD.move_target IS NOT NEW.move_target
    OR OLD.vcpus <> NEW.vcpus OR OLD.memory_mib <> NEW.memory_mib
    OR OLD.disk_gib <> NEW.disk_gib OR OLD.institution_id IS NOT NEW.institution_id
    OR (OLD.state IN {capacity}) <> (NEW.state IN {capacity})
    OR (OLD.state IN {quota}) <> (NEW.state IN {quota})
    OR (OLD.state = 'MIGRATING') <> (NEW.state = 'MIGRATING')
BEGIN{}{}\nEND",
            sub("OLD"),
            add("NEW")
        ),
        format!(
            "CREATE TRIGGER vps_totals_delete AFTER DELETE ON vps BEGIN{}\nEND",
            sub("OLD")
        ),
    ]
}

/// The totals counted from every VPS row; what the triggers keep.
fn recount_sql() -> String {
    let capacity = states_where(VpsState::holds_capacity);
    let quota = states_where(VpsState::holds_quota);
    format!(
        "DELETE FROM host_allocation;
         INSERT INTO host_allocation (host_id, vcpus, memory_mib, disk_gib, vps_count)
         SELECT h.id, COALESCE(SUM(v.vcpus), 0), COALESCE(SUM(v.memory_mib), 0),
                COALESCE(SUM(v.disk_gib), 0), COUNT(v.id)
         FROM hosts h LEFT JOIN vps v ON (v.host_id = h.id AND v.state IN {capacity})
              OR (v.move_target = h.id AND v.state = 'MIGRATING')
         GROUP BY h.id;
         DELETE FROM institution_usage;
         INSERT INTO institution_usage (institution_id, vcpus, memory_mib, disk_gib, vps_count)
         SELECT i.id, COALESCE(SUM(v.vcpus), 0), COALESCE(SUM(v.memory_mib), 0),
                COALESCE(SUM(v.disk_gib), 0), COUNT(v.id)
         FROM institutions i LEFT JOIN vps v ON v.institution_id = i.id AND v.state IN {quota}
         GROUP BY i.id;"
    )
}

/// Puts the triggers the lifecycle asks for in place, and counts the totals
/// again when they were not already there. Returns whether it changed them.
pub fn install(c: &mut Connection) -> Result<bool, ApiError> {
    let wanted = trigger_sql();
    let mut same = true;
    for (name, sql) in TRIGGERS.iter().zip(&wanted) {
        let have: Option<String> = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                [name],
                |r| r.get(0),
            )
            .ok();
        same &= have.as_deref() == Some(sql.as_str());
    }
    if same {
        return Ok(false);
    }
    let tx = c.transaction()?;
    for name in TRIGGERS {
        tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {name}"))?;
    }
    for sql in &wanted {
        tx.execute_batch(sql)?;
    }
    tx.execute_batch(&recount_sql())?;
    tx.commit()?;
    Ok(true)
}

/// Per host, then per institution: rowid, vCPUs, memory, disk, VPS count.
pub type Totals = (Vec<[i64; 5]>, Vec<[i64; 5]>);

/// What the triggers should have counted, from the rows; for tests and for
/// checking a store's bookkeeping.
pub fn recounted(c: &Connection) -> Result<Totals, ApiError> {
    let capacity = states_where(VpsState::holds_capacity);
    let quota = states_where(VpsState::holds_quota);
    let rows = |sql: &str| five_columns(c, sql);
    let hosts = rows(&format!(
        "SELECT h.rowid, COALESCE(SUM(v.vcpus), 0), COALESCE(SUM(v.memory_mib), 0),
                COALESCE(SUM(v.disk_gib), 0), COUNT(v.id)
         FROM hosts h LEFT JOIN vps v ON (v.host_id = h.id AND v.state IN {capacity})
              OR (v.move_target = h.id AND v.state = 'MIGRATING')
         GROUP BY h.id ORDER BY h.id"
    ))?;
    let institutions = rows(&format!(
        "SELECT i.rowid, COALESCE(SUM(v.vcpus), 0), COALESCE(SUM(v.memory_mib), 0),
                COALESCE(SUM(v.disk_gib), 0), COUNT(v.id)
         FROM institutions i LEFT JOIN vps v ON v.institution_id = i.id AND v.state IN {quota}
         GROUP BY i.id ORDER BY i.id"
    ))?;
    Ok((hosts, institutions))
}

/// The totals as the triggers keep them, in the shape of `recounted`.
pub fn kept(c: &Connection) -> Result<Totals, ApiError> {
    let rows = |sql: &str| five_columns(c, sql);
    Ok((
        rows(
            "SELECT h.rowid, COALESCE(a.vcpus, 0), COALESCE(a.memory_mib, 0),
                    COALESCE(a.disk_gib, 0), COALESCE(a.vps_count, 0)
             FROM hosts h LEFT JOIN host_allocation a ON a.host_id = h.id ORDER BY h.id",
        )?,
        rows(
            "SELECT i.rowid, COALESCE(u.vcpus, 0), COALESCE(u.memory_mib, 0),
                    COALESCE(u.disk_gib, 0), COALESCE(u.vps_count, 0)
             FROM institutions i LEFT JOIN institution_usage u ON u.institution_id = i.id
             ORDER BY i.id",
        )?,
    ))
}

fn five_columns(c: &Connection, sql: &str) -> Result<Vec<[i64; 5]>, ApiError> {
    let mut q = c.prepare(sql)?;
    let out = q
        .query_map([], |r| {
            Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?])
        })?
        .collect::<Result<_, _>>()?;
    Ok(out)
}
