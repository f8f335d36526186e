//! Whether libvirt itself answers, told apart from a guest that does not.
//! Every hypervisor call is counted while its thread runs; the calls that
//! never wait on a guest (listing, looking a domain up, the quick stats) are
//! also timed. One of those still running after `patience` means libvirtd
//! has stopped answering, whatever the guests do.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct Watchdog {
    patience: Duration,
    /// Start of each call that never waits on a guest, while it runs.
    quick: Mutex<BTreeMap<u64, Instant>>,
    next: AtomicU64,
    running: AtomicUsize,
}

impl Watchdog {
    pub fn new(patience: Duration) -> Arc<Self> {
        Arc::new(Watchdog {
            patience,
            quick: Mutex::default(),
            next: AtomicU64::new(0),
            running: AtomicUsize::new(0),
        })
    }

    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// Registers a call for as long as the returned guard lives (on the
    /// call's own thread, so a call that hangs stays counted).
    pub fn enter(self: &Arc<Self>, quick: bool) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        let id = quick.then(|| {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.lock().insert(id, Instant::now());
            id
        });
        Running {
            dog: self.clone(),
            id,
        }
    }

    /// How long libvirt has not answered: the age of the oldest quick call
    /// still running, once it is past `patience`.
    pub fn silent_for(&self) -> Option<Duration> {
        let oldest = self.lock().values().min().copied()?;
        let age = oldest.elapsed();
        (age > self.patience).then_some(age)
    }

    /// Hypervisor calls whose threads are running now, stuck or not.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.quick.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Running {
    dog: Arc<Watchdog>,
    id: Option<u64>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.dog.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(id) = self.id {
            self.dog.lock().remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_call_past_patience_means_libvirt_is_silent() {
        let dog = Watchdog::new(Duration::from_millis(30));
        let slow = dog.enter(false);
        let quick = dog.enter(true);
        assert_eq!(dog.running(), 2);
        assert_eq!(dog.silent_for(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            dog.silent_for()
                .is_some_and(|d| d >= Duration::from_millis(30))
        );
        drop(quick);
        // A call that may wait on a guest says nothing about libvirt.
        assert_eq!(dog.silent_for(), None);
        drop(slow);
        assert_eq!(dog.running(), 0);
    }
}
