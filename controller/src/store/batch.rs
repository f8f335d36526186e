//! Group commit. Every call to the store queues here; one thread takes
//! whatever has queued, runs each call under a savepoint of its own inside one
//! `BEGIN IMMEDIATE` transaction, commits once, and only then answers them
//! all. Under load a commit (its WAL frames, its locks) and a thread handoff
//! are shared by many calls; when calls come one at a time each gets its own
//! transaction at once, as before. A call that fails takes back only its own
//! writes (`Db::work`); a commit that fails fails every call in it.
//!
//! Acknowledged means durable: when a call that wrote something is to be
//! answered, the write-ahead log is flushed to disk (fsync) after the commit
//! and before any answer, as `synchronous = FULL` would. Calls whose writes
//! may be lost in a power cut without harm — a heartbeat, an agent's answer,
//! which the next heartbeat or ensure brings again — are run `relaxed`: they
//! pay no flush of their own, and the next durable commit carries them too,
//! since the log is written in order.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
    mpsc,
};

use tokio::sync::oneshot;

use super::Db;
use crate::error::{ApiError, StoreError};

/// At most this many calls share one transaction, so the first of them is
/// never kept waiting long for the last.
const MAX_PER_COMMIT: usize = 64;

/// Called once the transaction a call ran in is over: `None` when it was
/// committed, else why not.
type Reply = Box<dyn FnOnce(Option<&str>) + Send>;
/// A call: run on the connection, or told why the transaction never began.
type Job = Box<dyn for<'a> FnOnce(Result<&'a mut Db, &'a str>) -> Reply + Send>;

/// Whether a call's writes must be on disk before it is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    Durable,
    Relaxed,
}

#[derive(Clone)]
pub(super) struct Queue {
    jobs: mpsc::Sender<(Durability, Job)>,
    /// Transactions committed for queued calls.
    commits: Arc<AtomicU64>,
}

fn gone() -> ApiError {
    ApiError::Store(StoreError::Task("the store has stopped".into()))
}

fn not_committed(why: &str) -> ApiError {
    ApiError::Store(StoreError::Task(format!(
        "the transaction was not committed: {why}"
    )))
}

impl Queue {
    pub(super) async fn run<T, F>(&self, durability: Durability, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, ApiError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let out = match db {
                Ok(db) => db.work(f),
                Err(why) => Err(not_committed(why)),
            };
            Box::new(move |failed: Option<&str>| {
                let _ = tx.send(match failed {
                    Some(why) => Err(not_committed(why)),
                    None => out,
                });
            })
        });
        self.jobs.send((durability, job)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// The store's thread. It ends when the last `Store` (and so the last
/// sender) is dropped, and with it its hold on the connection.
pub(super) fn spawn(db: Arc<Mutex<Db>>) -> Result<Queue, StoreError> {
    let (jobs, rx) = mpsc::channel::<(Durability, Job)>();
    let commits = Arc::new(AtomicU64::new(0));
    let counted = commits.clone();
    std::thread::Builder::new()
        .name("betang-store".into())
        .spawn(move || serve(&db, &rx, &counted))
        .map_err(|e| StoreError::Task(e.to_string()))?;
    Ok(Queue { jobs, commits })
}

fn serve(db: &Mutex<Db>, rx: &mpsc::Receiver<(Durability, Job)>, commits: &AtomicU64) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_PER_COMMIT {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (replies, failed): (Vec<Reply>, Option<String>) = {
            let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
            match begin(&mut db) {
                Ok(()) => {
                    let mut must_sync = false;
                    let replies = jobs
                        .into_iter()
                        .map(|(durability, j)| {
                            let before = db.conn.total_changes();
                            let reply = j(Ok(&mut db));
                            must_sync |= durability == Durability::Durable
                                && db.conn.total_changes() != before;
                            reply
                        })
                        .collect();
                    let failed = commit(&mut db)
                        .and_then(|()| if must_sync { db.sync_log() } else { Ok(()) })
                        .err()
                        .map(|e| e.to_string());
                    if failed.is_none() {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    (replies, failed)
                }
                Err(e) => {
                    let why = e.to_string();
                    (jobs.into_iter().map(|(_, j)| j(Err(&why))).collect(), None)
                }
            }
        };
        // Answered only now, after the lock is let go.
        for reply in replies {
            reply(failed.as_deref());
        }
    }
}

fn begin(db: &mut Db) -> Result<(), ApiError> {
    db.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

/// When the commit fails, or a call's writes could not be taken back (the
/// transaction is poisoned), everything is rolled back and the host index,
/// which followed the uncommitted writes, is thrown away.
fn commit(db: &mut Db) -> Result<(), ApiError> {
    let committed = match db.poisoned.take() {
        Some(why) => Err(ApiError::Store(StoreError::Task(why))),
        None => db
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]))
            .map_err(ApiError::from),
    };
    if let Err(e) = committed {
        if !db.conn.is_autocommit() {
            let _ = db.conn.execute_batch("ROLLBACK");
        }
        db.hosts.invalidate();
        return Err(e);
    }
    Ok(())
}

/// Runs `f` in a transaction of its own, durably.
pub(super) fn in_transaction<T>(db: &mut Db, f: impl FnOnce(&mut Db) -> T) -> Result<T, ApiError> {
    begin(db)?;
    let before = db.conn.total_changes();
    let out = f(db);
    let wrote = db.conn.total_changes() != before;
    commit(db)?;
    if wrote {
        db.sync_log()?;
    }
    Ok(out)
}

pub(super) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    format!("a store call panicked: {what}")
}
