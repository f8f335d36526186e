//! The scheduler's view of every host, kept in memory beside the store's one
//! connection so that placing a VPS reads no host rows at all.
//!
//! It never decides alone: it is a cache of the hosts tables, refreshed host
//! by host from the rows that temporary triggers mark as changed (whatever
//! statement changed them), thrown away when another connection has written
//! to the file (`PRAGMA data_version`), and the host it picks is checked
//! again against its rows inside the claiming transaction.

use std::collections::HashMap;

use rusqlite::Connection;

use super::hosts;
use crate::{error::ApiError, ids::HostId, scheduler::HostView};

/// Created on every connection: a temporary table of changed host ids, and
/// triggers that fill it. Temporary objects live only in this connection, and
/// rows written by a transaction that rolls back go with it. `whole` is 0
/// when only the host's allocation totals moved (every placement), which is
/// caught up from one row; 1 when anything else the scheduler sees changed.
pub const DIRTY_TRACKING: &str = "
CREATE TEMP TABLE dirty_hosts (host_id TEXT PRIMARY KEY, whole INTEGER NOT NULL) WITHOUT ROWID;
CREATE TEMP TRIGGER dirty_host_new AFTER INSERT ON main.hosts BEGIN
    INSERT INTO dirty_hosts VALUES (NEW.id, 1) ON CONFLICT DO UPDATE SET whole = 1;
END;
CREATE TEMP TRIGGER dirty_host_changed AFTER UPDATE OF vcpus, memory_mib, disk_gib, zone,
    labels, weight, cordoned, degraded_since_ms ON main.hosts BEGIN
    INSERT INTO dirty_hosts VALUES (NEW.id, 1) ON CONFLICT DO UPDATE SET whole = 1;
END;
CREATE TEMP TRIGGER dirty_host_allocation AFTER UPDATE ON main.host_allocation BEGIN
    INSERT OR IGNORE INTO dirty_hosts VALUES (NEW.host_id, 0);
END;
CREATE TEMP TRIGGER dirty_host_image_added AFTER INSERT ON main.host_images BEGIN
    INSERT INTO dirty_hosts VALUES (NEW.host_id, 1) ON CONFLICT DO UPDATE SET whole = 1;
END;
CREATE TEMP TRIGGER dirty_host_image_removed AFTER DELETE ON main.host_images BEGIN
    INSERT INTO dirty_hosts VALUES (OLD.host_id, 1) ON CONFLICT DO UPDATE SET whole = 1;
END;
CREATE TEMP TRIGGER dirty_host_group_new AFTER INSERT ON main.vps
WHEN NEW.anti_affinity_group <> '' AND NEW.host_id IS NOT NULL BEGIN
    INSERT INTO dirty_hosts VALUES (NEW.host_id, 1) ON CONFLICT DO UPDATE SET whole = 1;
END;
CREATE TEMP TRIGGER dirty_host_group_changed AFTER UPDATE OF host_id, state, anti_affinity_group
    ON main.vps WHEN OLD.anti_affinity_group <> '' OR NEW.anti_affinity_group <> '' BEGIN
    INSERT INTO dirty_hosts SELECT OLD.host_id, 1 WHERE OLD.host_id IS NOT NULL
        ON CONFLICT DO UPDATE SET whole = 1;
    INSERT INTO dirty_hosts SELECT NEW.host_id, 1 WHERE NEW.host_id IS NOT NULL
        ON CONFLICT DO UPDATE SET whole = 1;
END;
CREATE TEMP TRIGGER dirty_host_group_gone AFTER DELETE ON main.vps
WHEN OLD.anti_affinity_group <> '' AND OLD.host_id IS NOT NULL BEGIN
    INSERT INTO dirty_hosts VALUES (OLD.host_id, 1) ON CONFLICT DO UPDATE SET whole = 1;
END;
";

#[derive(Default)]
pub struct HostIndex {
    views: Vec<HostView>,
    heartbeats: Vec<i64>,
    pos: HashMap<HostId, usize>,
    loaded: bool,
    /// `PRAGMA data_version` when last in step with the file.
    data_version: i64,
}

fn data_version(c: &Connection) -> Result<i64, ApiError> {
    Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?)
}

/// Has this connection changed a host since the index last caught up?
fn changed_here(c: &Connection) -> Result<bool, ApiError> {
    Ok(
        c.prepare_cached("SELECT EXISTS (SELECT 1 FROM temp.dirty_hosts)")?
            .query_row([], |r| r.get(0))?,
    )
}

impl HostIndex {
    /// Every host, with `up` judged against `now_ms`; loaded from `c` first
    /// if the index is empty or another connection has written meanwhile.
    pub fn hosts(
        &mut self,
        c: &Connection,
        now_ms: i64,
        down_after_ms: i64,
    ) -> Result<&[HostView], ApiError> {
        Ok(self.hosts_in_step(c, now_ms, down_after_ms)?.0)
    }

    /// The same, and whether they agree with the rows as this transaction
    /// sees them: they do when no other connection has written since the
    /// index was last in step (else it reloads first) and nothing in this
    /// one has changed a host since the last `sync` (the temporary triggers
    /// see every statement that could).
    pub fn hosts_in_step(
        &mut self,
        c: &Connection,
        now_ms: i64,
        down_after_ms: i64,
    ) -> Result<(&[HostView], bool), ApiError> {
        let in_step = if !self.loaded || data_version(c)? != self.data_version {
            self.reload(c)?;
            true
        } else {
            !changed_here(c)?
        };
        for (v, hb) in self.views.iter_mut().zip(&self.heartbeats) {
            v.up = now_ms - hb <= down_after_ms;
        }
        Ok((&self.views, in_step))
    }

    /// A heartbeat this connection just recorded: only the time moves, so
    /// the host's view is not read again (500 heartbeats a second at 1,000
    /// hosts).
    pub fn beat(&mut self, id: &HostId, at_ms: i64) {
        if let Some(&i) = self.pos.get(id) {
            self.heartbeats[i] = at_ms;
        }
    }

    pub fn reload(&mut self, c: &Connection) -> Result<(), ApiError> {
        let rows = hosts::read_views(c, None)?;
        self.views.clear();
        self.heartbeats.clear();
        self.pos.clear();
        for (v, hb) in rows {
            self.pos.insert(v.id.clone(), self.views.len());
            self.views.push(v);
            self.heartbeats.push(hb);
        }
        c.execute("DELETE FROM temp.dirty_hosts", [])?;
        self.data_version = data_version(c)?;
        self.loaded = true;
        Ok(())
    }

    /// Forget everything; the next placement loads the hosts again.
    pub fn invalidate(&mut self) {
        self.loaded = false;
    }

    /// Brings the hosts changed since the last call up to date. Run after
    /// every unit of work on the connection, outside any transaction.
    pub fn sync(&mut self, c: &Connection) -> Result<(), ApiError> {
        // The allocation comes with the list: for most changed hosts (a
        // claim or a release) it is all that moved.
        let dirty: Vec<(String, bool, [i64; 3])> = {
            let mut q = c.prepare_cached(
                "SELECT d.host_id, d.whole, COALESCE(a.vcpus, 0), COALESCE(a.memory_mib, 0),
                        COALESCE(a.disk_gib, 0)
                 FROM temp.dirty_hosts d LEFT JOIN main.host_allocation a ON a.host_id = d.host_id",
            )?;
            q.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, [r.get(2)?, r.get(3)?, r.get(4)?]))
            })?
            .collect::<Result<_, _>>()?
        };
        if dirty.is_empty() {
            return Ok(());
        }
        c.prepare_cached("DELETE FROM temp.dirty_hosts")?
            .execute([])?;
        if !self.loaded {
            return Ok(());
        }
        for (id, whole, alloc) in dirty {
            let Ok(id) = HostId::parse(&id) else {
                continue;
            };
            let Some(&i) = self.pos.get(&id) else {
                // A new host (placement breaks ties by host id, so the order
                // matters) or one gone: read them all again.
                return self.reload(c);
            };
            if !whole {
                self.views[i].allocated = hosts::resources(alloc);
                continue;
            }
            match hosts::read_views(c, Some(&id))?.pop() {
                Some((v, hb)) => {
                    self.views[i] = v;
                    self.heartbeats[i] = hb;
                }
                None => return self.reload(c),
            }
        }
        Ok(())
    }
}
