//! Every change of a VPS's state goes through the lifecycle's table
//! (`VpsState::can_become`), whichever statement makes it: a trigger written
//! from that table refuses any other change inside the same transaction.
//! The store's functions check the table themselves to give a person a
//! reason; the trigger is the guarantee that none of them, nor a later one,
//! slips past it.

use rusqlite::Connection;

#[cfg(test)]
use crate::lifecycle::VpsState;
use crate::{error::ApiError, lifecycle::ALL_STATES};

const NAME: &str = "vps_state_follows_the_lifecycle";

/// The trigger: a change of state must be a row of `vps_transitions`.
pub fn trigger_sql() -> String {
    format!(
        "CREATE TRIGGER {NAME} BEFORE UPDATE OF state ON vps
WHEN NEW.state <> OLD.state AND NOT EXISTS (
    SELECT 1 FROM vps_transitions WHERE from_state = OLD.state AND to_state = NEW.state)
BEGIN
    SELECT RAISE(ABORT, 'a VPS state change the lifecycle does not allow');
END"
    )
}

/// Writes the lifecycle's table into `vps_transitions` (a lookup by its key
/// is cheaper than a list in the trigger) and puts the trigger in place.
pub fn install(c: &Connection) -> Result<(), ApiError> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS vps_transitions (
             from_state TEXT NOT NULL, to_state TEXT NOT NULL,
             PRIMARY KEY (from_state, to_state)) WITHOUT ROWID;
         DELETE FROM vps_transitions;",
    )?;
    {
        let mut q = c.prepare("INSERT INTO vps_transitions VALUES (?1, ?2)")?;
        for from in ALL_STATES {
            for to in ALL_STATES.into_iter().filter(|to| from.can_become(*to)) {
                q.execute([from.as_str(), to.as_str()])?;
            }
        }
    }
    let wanted = trigger_sql();
    let have: Option<String> = c
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
            [NAME],
            |r| r.get(0),
        )
        .ok();
    if have.as_deref() != Some(wanted.as_str()) {
        c.execute_batch(&format!("DROP TRIGGER IF EXISTS {NAME}; {wanted};"))?;
    }
    Ok(())
}

/// Whether the store lets `from` become `to`.
#[cfg(test)]
pub fn allowed(c: &Connection, from: VpsState, to: VpsState) -> Result<bool, ApiError> {
    c.execute_batch("SAVEPOINT probe")?;
    let outcome = c.execute(
        "INSERT INTO vps (id, request_id, name, vcpus, memory_mib, disk_gib, image,
             ssh_public_key, user_data, state, desired_power, created_at_ms, updated_at_ms)
         VALUES ('probe', 'probe', 'p', 1, 1, 1, 'i', '', '', ?1, 'running', 0, 0)",
        [from.as_str()],
    );
    let updated = outcome.and_then(|_| {
        c.execute(
            "UPDATE vps SET state = ?1 WHERE id = 'probe'",
            [to.as_str()],
        )
    });
    c.execute_batch("ROLLBACK TO probe; RELEASE probe")?;
    Ok(updated.is_ok())
}
