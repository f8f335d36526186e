//! The background stats collector. Every `interval` it publishes a new
//! snapshot from two bulk passes on blocking threads: a quick one (listing,
//! power, CPU time, network; nothing that waits on a guest) and a guest one
//! (memory, disks; asks each guest's monitor). A guest whose QEMU stops
//! answering can hold one guest pass; libvirt then reports its monitor busy,
//! the guest is marked as not answering, and later passes, which skip busy
//! monitors, go on for every other guest at the normal interval. Scrapes and
//! heartbeats read the last snapshot and never wait for libvirt.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use betang_proto::v1::{HostUsage, VmUsage};
use tracing::{info, warn};

use crate::{
    hypervisor::{Blocking, Control, DomainSample, DomainState, DomainStats, Power},
    names,
    usage::{CpuRates, HostSampler, now_ms},
};

/// What is known of one VM.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub domain: String,
    pub vps_id: String,
    pub vps_name: String,
    pub institution: String,
    pub power: Power,
    /// The domain as the last listing saw it.
    pub state: DomainState,
    /// Counters of the last pass that answered for this domain; `None` until one has.
    pub usage: Option<VmUsage>,
    pub vcpus: u32,
    /// Are some of its figures (memory, disks) older than the last pass,
    /// because its monitor was busy or hung? CPU and network stay current.
    pub stale: bool,
    /// Unix ms since which its monitor has not answered; `None` while it does.
    pub unresponsive_since_ms: Option<i64>,
}

/// One published view of the host and its VMs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub vms: BTreeMap<String, VmEntry>,
    pub host: Option<HostUsage>,
    pub host_cpus: usize,
    /// Unix milliseconds when the last pass finished; 0 before the first.
    pub last_success_ms: i64,
    pub last_duration_seconds: f64,
    pub passes_total: u64,
    pub failures_total: u64,
}

impl Snapshot {
    pub fn vm(&self, domain: &str) -> Option<&VmEntry> {
        self.vms.get(domain)
    }
}

/// The last snapshot. Readers clone an `Arc`, so a scrape holds no lock
/// while it renders.
#[derive(Debug, Default)]
pub struct StatsCache {
    current: RwLock<Arc<Snapshot>>,
}

impl StatsCache {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish(&self, s: Snapshot) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }
}

/// Labels of a domain, from its metadata (read by `list_owned`, which never
/// waits on a guest).
#[derive(Debug, Clone)]
struct Labels {
    vps_id: String,
    vps_name: String,
    institution: String,
}

impl Labels {
    fn of(s: &DomainState) -> Option<Labels> {
        let vps_id = names::vps_id_of_domain(&s.name)?.to_owned();
        let meta = s.metadata.as_ref();
        Some(Labels {
            vps_id,
            vps_name: meta.map(|m| m.name.clone()).unwrap_or_default(),
            institution: meta.map(|m| m.institution.clone()).unwrap_or_default(),
        })
    }
}

/// What the quick part of a pass brings back: nothing in it waits on a guest.
struct Quick {
    listed: Vec<DomainState>,
    samples: Vec<DomainSample>,
    sampled_at: Instant,
    /// The monitors that were asked about, and what libvirt said.
    controls: Vec<(String, Control)>,
    host: HostUsage,
}

/// Each domain's last figures from a guest pass, and when that pass started.
type GuestFigures = HashMap<String, (DomainStats, Instant)>;

pub struct Collector {
    hv: Blocking,
    cache: Arc<StatsCache>,
    rates: CpuRates,
    host: Arc<HostSampler>,
    vm_dir: std::path::PathBuf,
    interval: Duration,
    /// How long a monitor command may be outstanding before its guest counts
    /// as not answering.
    unresponsive_after: Duration,
    guest: Arc<Mutex<GuestFigures>>,
    /// Guest passes whose threads have not returned from libvirt.
    guest_passes: Arc<AtomicUsize>,
    /// Domains whose monitor does not answer, and since when (Unix ms).
    unresponsive: Mutex<HashMap<String, i64>>,
    /// When each running domain was first seen running, for one that has
    /// never answered a guest pass.
    first_seen: Mutex<HashMap<String, Instant>>,
}

impl Collector {
    pub fn new(
        hv: Blocking,
        cache: Arc<StatsCache>,
        host: Arc<HostSampler>,
        vm_dir: std::path::PathBuf,
        interval: Duration,
        unresponsive_after: Duration,
    ) -> Self {
        Collector {
            hv,
            cache,
            rates: CpuRates::default(),
            host,
            vm_dir,
            interval,
            unresponsive_after,
            guest: Arc::default(),
            guest_passes: Arc::default(),
            unresponsive: Mutex::default(),
            first_seen: Mutex::default(),
        }
    }

    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.pass_once().await;
        }
    }

    /// Guest passes whose threads are still in libvirt.
    pub fn guest_passes_running(&self) -> usize {
        self.guest_passes.load(Ordering::SeqCst)
    }

    /// One pass, published; on failure the previous snapshot stays with its
    /// failure count raised.
    pub async fn pass_once(&self) {
        let started = Instant::now();
        let guest = self.start_guest_pass();
        let suspects = self.suspects();
        let quick = self.quick_pass(suspects).await;
        if let Some(pass) = guest {
            // A short wait, so that usually this pass publishes fresh guest
            // figures; a guest that holds the pass only makes them older.
            let grace = (self.interval / 2).min(Duration::from_secs(2));
            let _ = tokio::time::timeout(grace, pass).await;
        }
        match quick {
            Ok(q) => {
                let next = self.merge(q, started.elapsed());
                self.cache.publish(next);
                // What the pass and the scrapes since the last one freed.
                crate::memory::give_back();
            }
            Err(why) => {
                warn!(%why, "stats collection failed");
                let mut s = (*self.cache.snapshot()).clone();
                s.failures_total += 1;
                for vm in s.vms.values_mut() {
                    vm.stale = true;
                }
                self.cache.publish(s);
            }
        }
    }

    /// Starts a guest pass. A pass held by a guest that stopped answering
    /// holds that guest's job in libvirt, so the next pass (no-wait) skips it
    /// and brings the other guests' figures at the normal interval: every
    /// pass left running is held by a different hung guest. Beyond those
    /// already known, one more pass may be running (one just held, or a slow
    /// libvirtd, which the watchdog soon stops), never a growing number.
    fn start_guest_pass(&self) -> Option<tokio::task::JoinHandle<()>> {
        let known = lock(&self.unresponsive).len();
        let running = self.guest_passes.load(Ordering::SeqCst);
        if running > known + 1 {
            return None;
        }
        self.guest_passes.fetch_add(1, Ordering::SeqCst);
        let (figures, passes) = (self.guest.clone(), self.guest_passes.clone());
        let started = Instant::now();
        let handle = self.hv.start(move |hv| {
            let out = hv.guest_stats();
            passes.fetch_sub(1, Ordering::SeqCst);
            out
        });
        match handle {
            Ok(h) => Some(tokio::spawn(async move {
                match h.await {
                    Ok(Ok(samples)) => {
                        tracing::debug!(took = ?started.elapsed(), domains = samples.len(), "guest stats pass");
                        let mut f = lock(&figures);
                        for s in samples {
                            let newer = f.get(&s.name).is_none_or(|(_, at)| *at < started);
                            if newer {
                                f.insert(s.name, (s.stats, started));
                            }
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "guest stats pass failed"),
                    Err(e) => warn!(error = %e, "guest stats task failed"),
                }
            })),
            Err(e) => {
                self.guest_passes.fetch_sub(1, Ordering::SeqCst);
                warn!(error = %e, "guest stats pass not started");
                None
            }
        }
    }

    /// Running domains whose monitor may not be answering: those marked so,
    /// and those no guest pass has answered for within `unresponsive_after`.
    fn suspects(&self) -> Vec<String> {
        let figures = lock(&self.guest);
        let first = lock(&self.first_seen);
        let mut out: Vec<String> = lock(&self.unresponsive).keys().cloned().collect();
        for (name, seen) in first.iter() {
            let answered = figures.get(name).map(|(_, at)| *at);
            let since = answered.map_or(*seen, |a| a.max(*seen));
            if since.elapsed() > self.unresponsive_after && !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }

    async fn quick_pass(&self, suspects: Vec<String>) -> Result<Quick, String> {
        let (host, dir) = (self.host.clone(), self.vm_dir.clone());
        self.hv
            .quick(move |hv| {
                let listed = hv.list_owned()?;
                let samples = hv.quick_stats()?;
                let sampled_at = Instant::now();
                let controls = suspects
                    .into_iter()
                    .filter_map(|n| hv.control(&n).ok().map(|c| (n, c)))
                    .collect();
                Ok(Quick {
                    listed,
                    samples,
                    sampled_at,
                    controls,
                    host: host.sample(&dir),
                })
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// Marks and clears the guests that do not answer, from what libvirt said
    /// of their monitors.
    fn judge(&self, controls: &[(String, Control)], running: &HashSet<&str>) {
        let mut marked = lock(&self.unresponsive);
        let now = now_ms();
        for (name, control) in controls {
            match control {
                Control::Busy(d) if *d >= self.unresponsive_after => {
                    let since = now - d.as_millis() as i64;
                    if !marked.contains_key(name) {
                        warn!(domain = %name, busy_for = ?d, "guest does not answer its monitor");
                    }
                    marked.entry(name.clone()).or_insert(since);
                }
                Control::Broken => {
                    marked.entry(name.clone()).or_insert(now);
                }
                _ => {
                    if marked.remove(name).is_some() {
                        info!(domain = %name, "guest answers again");
                    }
                }
            }
        }
        marked.retain(|name, _| running.contains(name.as_str()));
    }

    fn merge(&self, q: Quick, took: Duration) -> Snapshot {
        let prev = self.cache.snapshot();
        let running: HashSet<&str> = q
            .samples
            .iter()
            .filter(|s| s.power == Power::Running)
            .map(|s| s.name.as_str())
            .collect();
        self.judge(&q.controls, &running);
        {
            let mut first = lock(&self.first_seen);
            first.retain(|n, _| running.contains(n.as_str()));
            for n in &running {
                first.entry((*n).to_owned()).or_insert(q.sampled_at);
            }
        }
        let mut samples: BTreeMap<&str, &DomainSample> =
            q.samples.iter().map(|s| (s.name.as_str(), s)).collect();
        let figures = lock(&self.guest).clone();
        let marked = lock(&self.unresponsive).clone();
        let fresh_after = q.sampled_at.checked_sub(self.interval * 2);
        let mut vms = BTreeMap::new();
        for state in &q.listed {
            let Some(labels) = Labels::of(state) else {
                continue;
            };
            let guest = figures.get(&state.name);
            let (usage, power, stale) = match samples.remove(state.name.as_str()) {
                Some(sample) => {
                    let stats = match guest {
                        Some((g, _)) => sample.stats.clone().with_guest_figures(g),
                        None => sample.stats.clone(),
                    };
                    let current = sample.power != Power::Running
                        || guest.is_some_and(|(_, at)| fresh_after.is_none_or(|f| *at >= f));
                    let usage = self.rates.usage_at(&labels.vps_id, &stats, q.sampled_at);
                    (Some(usage), sample.power, !current)
                }
                None => (
                    prev.vm(&state.name).and_then(|v| v.usage),
                    state.power,
                    true,
                ),
            };
            let vcpus = guest.map_or(state.vcpus, |(g, _)| g.vcpus.max(state.vcpus));
            vms.insert(
                state.name.clone(),
                VmEntry {
                    domain: state.name.clone(),
                    vps_id: labels.vps_id,
                    vps_name: labels.vps_name,
                    institution: labels.institution,
                    power,
                    state: state.clone(),
                    usage,
                    vcpus,
                    stale,
                    unresponsive_since_ms: marked.get(&state.name).copied(),
                },
            );
        }
        for gone in prev.vms.values().filter(|v| !vms.contains_key(&v.domain)) {
            self.rates.forget(&gone.vps_id);
            lock(&self.guest).remove(&gone.domain);
        }
        Snapshot {
            vms,
            host: Some(q.host),
            host_cpus: self.host.cpus(),
            last_success_ms: now_ms(),
            last_duration_seconds: took.as_secs_f64(),
            passes_total: prev.passes_total + 1,
            failures_total: prev.failures_total,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Hypervisor, NodeFacts, SimulatedHypervisor, Watchdog};

    const HUNG: &str = "6f1c1c7e-0000-4000-8000-000000000001";
    const FINE: &str = "6f1c1c7e-0000-4000-8000-000000000002";

    fn host_with_two_guests() -> (Arc<SimulatedHypervisor>, Blocking, Collector) {
        let hv = Arc::new(SimulatedHypervisor::new(NodeFacts {
            cpus: 4,
            memory_kib: 8 << 20,
        }));
        for id in [HUNG, FINE] {
            let name = names::domain_name(id);
            hv.define(&format!(
                "<domain><name>{name}</name><vcpu>1</vcpu><memory unit='MiB'>64</memory></domain>"
            ))
            .unwrap();
            hv.start(&name).unwrap();
        }
        let dyn_hv: Arc<dyn Hypervisor> = hv.clone();
        let blocking = Blocking::new(
            dyn_hv,
            Duration::from_secs(5),
            Watchdog::new(Duration::from_millis(300)),
        );
        let collector = Collector::new(
            blocking.clone(),
            Arc::default(),
            Arc::new(HostSampler::default()),
            std::env::temp_dir(),
            Duration::from_millis(50),
            Duration::from_millis(200),
        );
        (hv, blocking, collector)
    }

    fn entry(c: &Collector, id: &str) -> VmEntry {
        c.cache
            .snapshot()
            .vm(&names::domain_name(id))
            .cloned()
            .unwrap()
    }

    /// Lets every stuck call go when the test ends, passed or failed: the
    /// runtime waits for its blocking threads, and a test that failed while
    /// a call was stuck would otherwise never end.
    struct Unstick(Arc<SimulatedHypervisor>);

    impl Drop for Unstick {
        fn drop(&mut self) {
            self.0.answer_again();
            self.0.release(&names::domain_name(HUNG));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_guest_is_marked_and_holds_one_thread_while_the_other_goes_on() {
        let (hv, blocking, c) = host_with_two_guests();
        let _unstick = Unstick(hv.clone());
        c.pass_once().await;
        assert!(entry(&c, FINE).usage.is_some());
        hv.hang(&names::domain_name(HUNG));
        let hung_at = now_ms();
        let mut last_cpu = entry(&c, FINE).usage.unwrap().cpu_time_ns;
        let mut marked_after = None;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.pass_once().await;
            let fine = entry(&c, FINE);
            let cpu = fine.usage.unwrap().cpu_time_ns;
            assert!(
                cpu > last_cpu,
                "the other guest's CPU time must rise every pass"
            );
            last_cpu = cpu;
            assert_eq!(fine.unresponsive_since_ms, None);
            assert!(
                !fine.stale,
                "the other guest's memory and disk figures stay current"
            );
            assert!(
                blocking.watchdog().running() <= 1,
                "a hung guest holds at most one thread, not {}",
                blocking.watchdog().running()
            );
            if marked_after.is_none() && entry(&c, HUNG).unresponsive_since_ms.is_some() {
                marked_after = Some(now_ms() - hung_at);
            }
        }
        let marked_after = marked_after.expect("the hung guest is marked as not answering");
        // One pass to meet the hang, `unresponsive_after` (200 ms), one pass
        // to ask: about 300 ms, with room for a loaded machine.
        assert!(marked_after < 1_800, "marked after {marked_after} ms");
        assert_eq!(c.guest_passes_running(), 1);
        // The other guest's memory and disk figures stay current too.
        assert!(!entry(&c, FINE).stale);
        assert!(entry(&c, HUNG).stale);

        hv.release(&names::domain_name(HUNG));
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.pass_once().await;
        c.pass_once().await;
        assert_eq!(entry(&c, HUNG).unresponsive_since_ms, None);
        assert_eq!(c.guest_passes_running(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_libvirt_is_told_within_patience_and_refused_after() {
        let (hv, blocking, c) = host_with_two_guests();
        let _unstick = Unstick(hv.clone());
        c.pass_once().await;
        hv.fall_silent();
        let t = Instant::now();
        let first = blocking.quick(|hv| hv.list_owned()).await;
        assert!(matches!(
            first,
            Err(crate::error::AgentError::HypervisorSilent(_))
        ));
        // Told after the watchdog's patience (300 ms), not the call's
        // 5 s limit; the room is for a loaded machine.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Now refused at once, adding no thread.
        let t = Instant::now();
        let running = blocking.watchdog().running();
        for _ in 0..20 {
            assert!(blocking.quick(|hv| hv.list_owned()).await.is_err());
            c.pass_once().await;
        }
        // Twenty waits for patience would take 6 s.
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(blocking.watchdog().running(), running);
        assert!(c.cache.snapshot().failures_total >= 20);
        hv.answer_again();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(blocking.quick(|hv| hv.list_owned()).await.unwrap().len(), 2);
        assert_eq!(blocking.watchdog().silent_for(), None);
    }
}
