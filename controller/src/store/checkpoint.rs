//! The WAL checkpointer: a second connection that copies the write-ahead log
//! into the database file once a second. Passive checkpoints never block the
//! store's connection, so the fsync they end with is off every request's path.

use std::{
    path::Path,
    sync::{Mutex, Weak},
    time::Duration,
};

use rusqlite::Connection;

use crate::error::StoreError;

const EVERY: Duration = Duration::from_secs(1);

/// Runs until the store it serves (`alive`) is dropped.
pub fn spawn<T: Send + 'static>(path: &Path, alive: Weak<Mutex<T>>) -> Result<(), StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    std::thread::Builder::new()
        .name("betang-checkpoint".into())
        .spawn(move || {
            while alive.strong_count() > 0 {
                std::thread::sleep(EVERY);
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
            // The last word: whatever is left goes into the file.
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        })
        .map_err(|e| StoreError::Task(e.to_string()))?;
    Ok(())
}
