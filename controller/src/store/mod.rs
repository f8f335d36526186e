//! The controller's store: one SQLite file (WAL) with embedded migrations.
//! A single connection behind a mutex makes every transaction serial, which
//! is what makes placement claims atomic. Calls queue for a thread of the
//! store's own, which commits whatever queued while it was busy in one
//! transaction (group commit, `batch.rs`). Beside the connection, under the
//! same mutex, the scheduler's in-memory view of the hosts (`host_index`).

mod batch;
mod caller_cache;
mod checkpoint;
pub mod history;
pub mod host_index;
pub mod hosts;
pub mod identity;
pub mod moves;
pub mod networks;
pub mod portal;
pub mod totals;
pub mod transitions;
pub mod vps;

use std::{
    collections::HashMap,
    ops::{Deref, DerefMut},
    path::Path,
    sync::{Arc, Mutex},
};

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use crate::{
    auth::Caller,
    error::{ApiError, StoreError},
};

const MIGRATIONS: &[M<'static>] = &[
    M::up(include_str!("../../migrations/0001_initial.sql")),
    M::up(include_str!("../../migrations/0002_institutions.sql")),
    M::up(include_str!("../../migrations/0003_placement.sql")),
    M::up(include_str!("../../migrations/0004_host_down.sql")),
    M::up(include_str!("../../migrations/0005_allocation_totals.sql")),
    M::up(include_str!("../../migrations/0006_usage_history.sql")),
    M::up(include_str!("../../migrations/0007_durable_moves.sql")),
    M::up(include_str!("../../migrations/0008_hung_guests.sql")),
    M::up(include_str!("../../migrations/0009_token_use.sql")),
    M::up(include_str!("../../migrations/0010_networks.sql")),
    M::up(include_str!("../../migrations/0011_portal.sql")),
];

/// The connection and what is kept in memory beside it. Derefs to the
/// connection, so store functions that only need SQL take `&Connection`.
pub struct Db {
    pub conn: Connection,
    pub hosts: host_index::HostIndex,
    /// Set when a unit's writes could not be taken back (`ROLLBACK TO`
    /// failed: disk full, I/O error): the transaction then holds writes of a
    /// call that failed, so nothing more runs in it and none of it commits.
    poisoned: Option<String>,
    /// The write-ahead log, flushed before a durable call is answered; none
    /// for a store in memory. Opened once: SQLite truncates the log but
    /// never replaces the file while the connection is open.
    wal: Option<(std::path::PathBuf, Option<std::fs::File>)>,
    /// Flushes of the log so far.
    log_flushes: u64,
}

impl Deref for Db {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl DerefMut for Db {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Db {
    /// Flushes the write-ahead log to disk: every commit made so far
    /// survives a power cut from now on (the log is written in order).
    fn sync_log(&mut self) -> Result<(), ApiError> {
        self.log_flushes += 1;
        let Some((path, file)) = &mut self.wal else {
            return Ok(());
        };
        let flushed = match file {
            Some(f) => f.sync_data(),
            None => std::fs::File::open(&*path).and_then(|f| {
                f.sync_data()?;
                *file = Some(f);
                Ok(())
            }),
        };
        flushed.map_err(|e| {
            ApiError::Store(StoreError::Task(format!(
                "flushing {} to disk: {e}",
                path.display()
            )))
        })
    }

    /// Runs one unit of work inside the batch's transaction, under a
    /// savepoint of its own: a unit that fails (or panics) takes back its
    /// own writes and no one else's. Then the host index catches up with
    /// whatever the unit changed, so the next unit places against it.
    fn work<T>(&mut self, f: impl FnOnce(&mut Db) -> Result<T, ApiError>) -> Result<T, ApiError> {
        if let Some(why) = &self.poisoned {
            return Err(ApiError::Store(StoreError::Task(format!(
                "the transaction was abandoned: {why}"
            ))));
        }
        if let Err(e) = self
            .conn
            .prepare_cached("SAVEPOINT betang_work")
            .and_then(|mut s| s.execute([]))
        {
            self.poisoned = Some(e.to_string());
            return Err(e.into());
        }
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)))
            .unwrap_or_else(|p| Err(ApiError::Store(StoreError::Task(batch::panic_text(&p)))));
        if out.is_err()
            && let Err(e) = self
                .conn
                .prepare_cached("ROLLBACK TO betang_work")
                .and_then(|mut s| s.execute([]))
        {
            self.poisoned = Some(format!("a failed call's writes could not be undone: {e}"));
            return out;
        }
        if let Err(e) = self
            .conn
            .prepare_cached("RELEASE betang_work")
            .and_then(|mut s| s.execute([]))
        {
            self.poisoned = Some(e.to_string());
            return Err(e.into());
        }
        if let Err(e) = self.hosts.sync(&self.conn) {
            tracing::warn!(error = %e, "host index out of step; reloading it");
            self.hosts.invalidate();
        }
        out
    }
}

/// Enough for a data center's people signing in at the same moment; a
/// flood of made-up tokens holds no more of the store than this.
const SIGN_INS_AT_ONCE: usize = 8;
/// How often a token's use is written at most.
const TOKEN_USE_EVERY_MS: i64 = 60_000;
/// How long a sign-in waits for its turn before it is refused.
const SIGN_IN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone)]
pub struct Store {
    db: Arc<Mutex<Db>>,
    queue: batch::Queue,
    callers: caller_cache::CallerCache,
    /// Store lookups of secrets the cache does not know, at once.
    sign_ins: Arc<tokio::sync::Semaphore>,
    /// When and from where each token's use was last written.
    token_use: Arc<Mutex<HashMap<String, (i64, String)>>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        // Token hashes, officials' personal data and user-data: the owner's
        // alone, whatever the umask (SQLite gives the WAL and shared-memory
        // files the database file's mode).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::File(format!("{}: {e}", path.display())))?;
            // Journal files an older version left with the umask's mode.
            for side in ["-wal", "-shm"] {
                let mut p = path.as_os_str().to_owned();
                p.push(side);
                match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::File(format!("{}: {e}", p.display()))),
                }
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durability is the batch's job (`batch.rs`): a commit holding an
        // acknowledged write is flushed to disk before anyone hears of it,
        // as FULL would do, while heartbeats and agents' answers, which are
        // sent again anyway, ride along with the next flush.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints (copying the WAL into the file, with an fsync) are
        // left to a thread of their own, so no request waits for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        let store = Self::init(conn)?;
        {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            store.db.lock().unwrap_or_else(|p| p.into_inner()).wal = Some((wal.into(), None));
        }
        checkpoint::spawn(path, Arc::downgrade(&store.db))?;
        Ok(store)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the controller runs stays prepared (the default keeps 16).
        conn.set_prepared_statement_cache_capacity(256);
        // The host index's change list (a temporary table) never touches a file.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.pragma_update(None, "mmap_size", 256i64 << 20)?;
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        if totals::install(&mut conn).map_err(|e| StoreError::Task(e.to_string()))? {
            tracing::info!(
                "allocation totals' triggers written from the lifecycle; totals recounted"
            );
        }
        transitions::install(&conn).map_err(|e| StoreError::Task(e.to_string()))?;
        conn.execute_batch(host_index::DIRTY_TRACKING)?;
        let callers = caller_cache::CallerCache::default();
        callers.track(&conn)?;
        let db = Arc::new(Mutex::new(Db {
            conn,
            hosts: host_index::HostIndex::default(),
            poisoned: None,
            wal: None,
            log_flushes: 0,
        }));
        Ok(Store {
            queue: batch::spawn(db.clone())?,
            db,
            callers,
            sign_ins: Arc::new(tokio::sync::Semaphore::new(SIGN_INS_AT_ONCE)),
            token_use: Arc::default(),
        })
    }

    /// Runs `f` with the connection on the store's thread, in a transaction
    /// it may share with other calls; the answer comes once that is committed.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, ApiError> + Send + 'static,
    {
        self.queue.run(batch::Durability::Durable, f).await
    }

    /// The same for writes that may be lost in a power cut without harm,
    /// because their sender brings them again (a heartbeat, an agent's
    /// answer): they are answered after the commit without a flush of their
    /// own. Never for anything a person or a later irreversible step relies on.
    pub async fn run_relaxed<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, ApiError> + Send + 'static,
    {
        self.queue.run(batch::Durability::Relaxed, f).await
    }

    /// The caller behind a token's secret; from the cache when the token and
    /// its user are unchanged since it was last read.
    pub async fn caller(&self, secret: &str, now_ms: i64) -> Result<Caller, ApiError> {
        let hash = crate::auth::hash_secret(secret);
        let cached = |callers: &caller_cache::CallerCache| match callers.get(&hash, now_ms) {
            Some(Ok(caller)) => Some(Ok(caller)),
            Some(Err(why)) => Some(Err(ApiError::Unauthenticated(why))),
            None => None,
        };
        if let Some(answer) = cached(&self.callers) {
            return answer;
        }
        // Secrets not in the cache (mostly made-up ones in a flood) reach
        // the store a few at a time, so they never queue in front of
        // everyone's real work; the others wait a moment, then are refused.
        let _permit = tokio::time::timeout(SIGN_IN_WAIT, self.sign_ins.acquire())
            .await
            .map_err(|_| ApiError::SignInsBusy)?
            .map_err(|_| ApiError::SignInsBusy)?;
        // The same token's other calls, made at once, were waiting too.
        if let Some(answer) = cached(&self.callers) {
            return answer;
        }
        let seen = self.callers.generation();
        let key = hash.clone();
        match self
            .run(move |c| identity::caller_for_hash(c, &key, now_ms))
            .await
        {
            Ok((caller, expires)) => {
                self.callers
                    .insert(hash, caller.clone(), expires, seen, now_ms);
                Ok(caller)
            }
            Err(ApiError::Unauthenticated(why)) => {
                self.callers.refuse(hash, why.clone(), seen, now_ms);
                Err(ApiError::Unauthenticated(why))
            }
            Err(e) => Err(e),
        }
    }

    /// Records a token's use (when, from which address) without holding up
    /// the call: written at most once a minute per token, or when the
    /// address changes, with the next batch's relaxed writes.
    pub fn note_token_use(&self, secret_hash: String, from: String, now_ms: i64) {
        {
            let mut seen = self.token_use.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, addr)) = seen.get(&secret_hash)
                && now_ms - at < TOKEN_USE_EVERY_MS
                && *addr == from
            {
                return;
            }
            if seen.len() >= 10_000 {
                seen.clear();
            }
            seen.insert(secret_hash.clone(), (now_ms, from.clone()));
        }
        let store = self.clone();
        tokio::spawn(async move {
            let written = store
                .run_relaxed(move |c| identity::note_token_use(c, &secret_hash, &from, now_ms))
                .await;
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot record a token's use");
            }
        });
    }

    /// Flushes of the write-ahead log so far: one per commit that held a
    /// durable write.
    pub fn log_flushes(&self) -> u64 {
        self.db
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log_flushes
    }

    /// Transactions committed for `run` calls so far (fewer than the calls
    /// when they came together).
    pub fn commits(&self) -> u64 {
        self.queue.commits()
    }

    /// The same, in a transaction of its own, for code that is already on
    /// a blocking thread (and tests).
    pub fn run_sync<T>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        batch::in_transaction(&mut db, |db| db.work(f))?
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::Store(StoreError::Sqlite(e))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod store_file_tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        Migrations::from_slice(MIGRATIONS).validate().unwrap();
    }

    #[test]
    fn a_file_store_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("betang.db");
        Store::open(&path).unwrap();
        let s = Store::open(&path).unwrap();
        let mode: String = s
            .run_sync(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
