//! Callers already authenticated, so a request does not queue for the store
//! only to read its own token. Every write to the tables a caller is built
//! from (users, tokens, institutions) bumps `generation` through a trigger on
//! the store's one connection, which empties the cache at the next lookup:
//! a revoked token or a changed role takes effect with the very next request.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use rusqlite::{Connection, functions::FunctionFlags};

use crate::auth::Caller;

/// Far more tokens than a data center's people and robots hold at once; a
/// flood of made-up tokens cannot grow the cache past it.
const MAX_ENTRIES: usize = 10_000;

/// A cached caller is read again after this long, so a change made by
/// another process on the same file (`bootstrap-admin` revoking the tokens
/// before it), which no trigger here sees, takes effect within it.
pub const MAX_AGE_MS: i64 = 30_000;

pub const IDENTITY_TRACKING: &str = "
CREATE TEMP TRIGGER identity_user_changed AFTER UPDATE ON main.users BEGIN
    SELECT betang_identity_changed();
END;
CREATE TEMP TRIGGER identity_user_removed AFTER DELETE ON main.users BEGIN
    SELECT betang_identity_changed();
END;
CREATE TEMP TRIGGER identity_token_changed
AFTER UPDATE OF user_id, secret_sha256, expires_at_ms, revoked_at_ms ON main.tokens BEGIN
    SELECT betang_identity_changed();
END;
CREATE TEMP TRIGGER identity_token_removed AFTER DELETE ON main.tokens BEGIN
    SELECT betang_identity_changed();
END;
CREATE TEMP TRIGGER identity_institution_changed AFTER UPDATE ON main.institutions BEGIN
    SELECT betang_identity_changed();
END;
CREATE TEMP TRIGGER identity_institution_removed AFTER DELETE ON main.institutions BEGIN
    SELECT betang_identity_changed();
END;
";

struct Entry {
    caller: Caller,
    /// 0: never.
    expires_at_ms: i64,
    cached_at_ms: i64,
}

#[derive(Default)]
struct Cached {
    generation: u64,
    entries: HashMap<String, Entry>,
    /// Secrets the store refused (unknown, expired, revoked, disabled),
    /// with why and since when: asking again does not reach the store.
    refused: HashMap<String, (String, i64)>,
}

#[derive(Clone, Default)]
pub struct CallerCache {
    generation: Arc<AtomicU64>,
    cached: Arc<Mutex<Cached>>,
}

impl CallerCache {
    /// Registers the function the triggers call, then the triggers.
    pub fn track(&self, conn: &Connection) -> rusqlite::Result<()> {
        let generation = self.generation.clone();
        conn.create_scalar_function(
            "betang_identity_changed",
            0,
            FunctionFlags::SQLITE_UTF8,
            move |_| {
                generation.fetch_add(1, Ordering::SeqCst);
                Ok(0i64)
            },
        )?;
        conn.execute_batch(IDENTITY_TRACKING)
    }

    /// Read before a lookup in the store; `insert` is given it back, so a
    /// change that lands during the lookup keeps the answer out of the cache.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The cached answer for a secret: its caller, or why it was refused.
    pub fn get(&self, secret_hash: &str, now_ms: i64) -> Option<Result<Caller, String>> {
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.generation();
        if c.generation != current {
            c.entries.clear();
            c.refused.clear();
            c.generation = current;
            return None;
        }
        if let Some((why, at)) = c.refused.get(secret_hash)
            && now_ms - at <= MAX_AGE_MS
        {
            return Some(Err(why.clone()));
        }
        let e = c.entries.get(secret_hash)?;
        if e.expires_at_ms != 0 && e.expires_at_ms <= now_ms {
            return None;
        }
        if now_ms - e.cached_at_ms > MAX_AGE_MS {
            return None;
        }
        Some(Ok(e.caller.clone()))
    }

    /// Remembers that the store refused a secret, unless something changed
    /// since `seen`.
    pub fn refuse(&self, secret_hash: String, why: String, seen: u64, now_ms: i64) {
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if seen != self.generation() || c.generation != seen {
            return;
        }
        if c.refused.len() >= MAX_ENTRIES {
            c.refused.clear();
        }
        c.refused.insert(secret_hash, (why, now_ms));
    }

    pub fn insert(
        &self,
        secret_hash: String,
        caller: Caller,
        expires_at_ms: i64,
        seen: u64,
        now_ms: i64,
    ) {
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if seen != self.generation() {
            return;
        }
        if c.generation != seen || c.entries.len() >= MAX_ENTRIES {
            c.generation = seen;
            c.entries.clear();
            c.refused.clear();
        }
        c.entries.insert(
            secret_hash,
            Entry {
                caller,
                expires_at_ms,
                cached_at_ms: now_ms,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_caller_is_read_again_after_its_max_age() {
        let cache = CallerCache::default();
        let seen = cache.generation();
        cache.insert("h".into(), Caller::system(), 0, seen, 1_000);
        assert!(cache.get("h", 1_000 + MAX_AGE_MS).is_some());
        assert!(cache.get("h", 1_001 + MAX_AGE_MS).is_none());
    }

    #[test]
    fn a_refused_secret_is_answered_from_memory_until_something_changes() {
        let cache = CallerCache::default();
        let seen = cache.generation();
        cache.refuse("bad".into(), "unknown token".into(), seen, 1_000);
        assert_eq!(
            cache.get("bad", 1_500),
            Some(Err("unknown token".to_owned()))
        );
        assert!(cache.get("bad", 1_001 + MAX_AGE_MS).is_none());
        cache.generation.fetch_add(1, Ordering::SeqCst);
        assert!(cache.get("bad", 1_500).is_none());
    }
}
