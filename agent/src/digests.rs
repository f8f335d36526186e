//! SHA-256 of image files. Images are known by content, never by file name
//! alone: a VPS records the digest of the image it was built on, and its disk
//! is used again only on a base with that digest. Hashing a cloud image takes
//! seconds, so each digest is kept, keyed by the file's device, inode, size
//! and modification time, in memory and in a small JSON file beside the VMs,
//! and computed again only when one of those changes.

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    disks::DiskTool,
    error::{AgentError, Result},
};

/// Where the cache is kept, in the agent's `vm_dir`.
pub const CACHE_FILE: &str = ".image-digests.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    sha256: String,
}

pub struct DigestCache {
    file: Option<PathBuf>,
    entries: Mutex<BTreeMap<PathBuf, Entry>>,
    /// Files hashed (not answered from the cache) so far; for tests.
    hashed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for DigestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestCache")
            .field("file", &self.file)
            .finish()
    }
}

fn stamp(path: &Path) -> Result<Stamp> {
    let m = std::fs::metadata(path).map_err(|e| AgentError::io(path, e))?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// The SHA-256 of a file, lower-case hex, read 1 MiB at a time.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| AgentError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

impl DigestCache {
    /// A cache kept in memory only.
    pub fn in_memory() -> Self {
        DigestCache {
            file: None,
            entries: Mutex::default(),
            hashed: Default::default(),
        }
    }

    /// A cache kept in `file` too (read now; a missing or unreadable file is
    /// an empty cache, since every entry can be computed again).
    pub fn open(file: PathBuf) -> Self {
        let entries = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        DigestCache {
            file: Some(file),
            entries: Mutex::new(entries),
            hashed: Default::default(),
        }
    }

    /// The digest of `path`, from the cache while the file is unchanged;
    /// otherwise `disks` hashes it (a simulated host's files are small).
    pub fn digest(&self, disks: &dyn DiskTool, path: &Path) -> Result<String> {
        let now = stamp(path)?;
        if let Some(e) = self.lock().get(path)
            && e.stamp == now
        {
            return Ok(e.sha256.clone());
        }
        let sha256 = disks.digest(path)?;
        self.hashed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Stamped again after hashing: a file that changed meanwhile is not
        // cached under a digest it no longer has.
        if stamp(path)? == now {
            let mut entries = self.lock();
            entries.insert(
                path.to_path_buf(),
                Entry {
                    stamp: now,
                    sha256: sha256.clone(),
                },
            );
            self.save(&entries);
        }
        Ok(sha256)
    }

    pub fn hashed(&self) -> u64 {
        self.hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Best effort: a cache that cannot be written only costs a rehash.
    fn save(&self, entries: &BTreeMap<PathBuf, Entry>) {
        let Some(file) = &self.file else { return };
        let Ok(text) = serde_json::to_vec(entries) else {
            return;
        };
        let tmp = file.with_extension("json.part");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, file);
        }
    }
}

/// The first 12 hex digits, enough to tell versions apart in a message.
pub fn short(d: &str) -> &str {
    d.get(..12).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_computed_once_per_version_of_a_file() {
        let disks = &crate::disks::QemuImg;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"first").unwrap();
        let cache_file = dir.path().join(CACHE_FILE);
        let c = DigestCache::open(cache_file.clone());
        let first = c.digest(disks, &img).unwrap();
        assert_eq!(
            first,
            "a7937b64b8caa58f03721bb6bacf5c78cb235febe0e70b1b84cd99541461a08e"
        );
        assert_eq!(c.digest(disks, &img).unwrap(), first);
        assert_eq!(c.hashed(), 1, "the second answer came from the cache");
        let kept = std::fs::read_to_string(&cache_file).unwrap();
        assert!(kept.contains(&first), "{kept}");
        // A restarted agent reads the cache file instead of hashing again.
        let again = DigestCache::open(cache_file.clone());
        assert_eq!(again.digest(disks, &img).unwrap(), first);
        assert_eq!(again.hashed(), 0);
        // A file overwritten in place gets its new digest.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&img, b"second, longer").unwrap();
        let second = again.digest(disks, &img).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, sha256_file(&img).unwrap());
        assert_eq!(again.hashed(), 1);
        // Same size, only a new modification time: hashed again, since
        // nothing cheaper tells what changed.
        std::fs::write(&img, b"third, samelen").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let third = again.digest(disks, &img).unwrap();
        assert_eq!(third, sha256_file(&img).unwrap());
        assert_ne!(third, second);
        assert_eq!(again.hashed(), 2);
        // A replaced file (a new inode, as `cp` then `mv` makes) too.
        let copy = dir.path().join("copy");
        std::fs::write(&copy, b"fourth").unwrap();
        std::fs::rename(&copy, &img).unwrap();
        assert_eq!(
            again.digest(disks, &img).unwrap(),
            sha256_file(&img).unwrap()
        );
        assert_eq!(again.hashed(), 3);
        // A cache file that cannot be read is an empty cache, not an error.
        std::fs::write(&cache_file, b"{not json").unwrap();
        let fresh = DigestCache::open(cache_file);
        assert_eq!(
            fresh.digest(disks, &img).unwrap(),
            sha256_file(&img).unwrap()
        );
        assert_eq!(fresh.hashed(), 1);
        assert!(
            DigestCache::in_memory()
                .digest(disks, &dir.path().join("missing"))
                .is_err()
        );
    }

    #[test]
    fn a_simulated_host_hashes_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"first").unwrap();
        let c = DigestCache::in_memory();
        let sim = &crate::hypervisor::SimulatedDisks;
        assert_eq!(c.digest(sim, &img).unwrap(), sha256_file(&img).unwrap());
        assert_eq!(c.hashed(), 1);
    }
}
