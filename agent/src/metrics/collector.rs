//! The background stats collector. Every `interval` it takes one bulk pass
//! over the domains (and the host's own figures) on a blocking thread and
//! publishes a new snapshot. Scrapes and heartbeats read the last snapshot and
//! never wait for libvirt: a pass that hangs only makes the snapshot older,
//! which the collector's own health metrics show.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use betang_proto::v1::{HostUsage, VmUsage};
use tracing::warn;

use crate::{
    hypervisor::{DomainSample, DomainState, Hypervisor, Power},
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
    /// Counters of the last pass that answered for this domain; `None` until one has.
    pub usage: Option<VmUsage>,
    pub vcpus: u32,
    /// Did the last pass skip this domain (busy or hung)? Its counters are then older.
    pub stale: bool,
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
    power: Power,
    vcpus: u32,
}

impl Labels {
    fn of(s: &DomainState) -> Option<Labels> {
        let vps_id = names::vps_id_of_domain(&s.name)?.to_owned();
        let meta = s.metadata.as_ref();
        Some(Labels {
            vps_id,
            vps_name: meta.map(|m| m.name.clone()).unwrap_or_default(),
            institution: meta.map(|m| m.institution.clone()).unwrap_or_default(),
            power: s.power,
            vcpus: s.vcpus,
        })
    }
}

/// What one pass brings back from its blocking thread.
struct Pass {
    listed: Vec<DomainState>,
    samples: Vec<DomainSample>,
    sampled_at: Instant,
    host: HostUsage,
}

pub struct Collector {
    hv: Arc<dyn Hypervisor>,
    cache: Arc<StatsCache>,
    rates: CpuRates,
    host: Arc<HostSampler>,
    vm_dir: std::path::PathBuf,
    interval: Duration,
    deadline: Duration,
    busy: Arc<AtomicBool>,
}

impl Collector {
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        cache: Arc<StatsCache>,
        host: Arc<HostSampler>,
        vm_dir: std::path::PathBuf,
        interval: Duration,
        deadline: Duration,
    ) -> Self {
        Collector {
            hv,
            cache,
            rates: CpuRates::default(),
            host,
            vm_dir,
            interval,
            deadline,
            busy: Arc::default(),
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

    /// One pass, published; on failure the previous snapshot stays with its
    /// failure count raised.
    pub async fn pass_once(&self) {
        let started = Instant::now();
        match self.take_pass().await {
            Ok(pass) => {
                let next = self.merge(pass, started.elapsed());
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

    async fn take_pass(&self) -> Result<Pass, String> {
        // A pass still stuck in libvirt is not joined by a second one: the
        // blocking pool would fill with threads waiting on the same guest.
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err("the previous pass has not returned from libvirt yet".into());
        }
        let (hv, host, dir, busy) = (
            self.hv.clone(),
            self.host.clone(),
            self.vm_dir.clone(),
            self.busy.clone(),
        );
        let work = tokio::task::spawn_blocking(move || {
            let out = (|| -> crate::error::Result<Pass> {
                let samples = hv.bulk_stats()?;
                let sampled_at = Instant::now();
                let listed = hv.list_owned()?;
                Ok(Pass {
                    listed,
                    samples,
                    sampled_at,
                    host: host.sample(&dir),
                })
            })();
            busy.store(false, Ordering::SeqCst);
            out
        });
        match tokio::time::timeout(self.deadline, work).await {
            Ok(Ok(Ok(pass))) => Ok(pass),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "libvirt did not answer within {} ms",
                self.deadline.as_millis()
            )),
        }
    }

    fn merge(&self, pass: Pass, took: Duration) -> Snapshot {
        let prev = self.cache.snapshot();
        let mut samples: BTreeMap<String, DomainSample> = pass
            .samples
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let mut vms = BTreeMap::new();
        for state in &pass.listed {
            let Some(labels) = Labels::of(state) else {
                continue;
            };
            let entry = match samples.remove(&state.name) {
                Some(sample) => VmEntry {
                    domain: state.name.clone(),
                    usage: Some(self.rates.usage_at(
                        &labels.vps_id,
                        &sample.stats,
                        pass.sampled_at,
                    )),
                    vcpus: sample.stats.vcpus.max(labels.vcpus),
                    power: sample.power,
                    vps_id: labels.vps_id,
                    vps_name: labels.vps_name,
                    institution: labels.institution,
                    stale: false,
                },
                None => VmEntry {
                    domain: state.name.clone(),
                    usage: prev.vm(&state.name).and_then(|v| v.usage),
                    vcpus: labels.vcpus,
                    power: labels.power,
                    vps_id: labels.vps_id,
                    vps_name: labels.vps_name,
                    institution: labels.institution,
                    stale: true,
                },
            };
            vms.insert(state.name.clone(), entry);
        }
        for gone in prev.vms.values().filter(|v| !vms.contains_key(&v.domain)) {
            self.rates.forget(&gone.vps_id);
        }
        Snapshot {
            vms,
            host: Some(pass.host),
            host_cpus: self.host.cpus(),
            last_success_ms: now_ms(),
            last_duration_seconds: took.as_secs_f64(),
            passes_total: prev.passes_total + 1,
            failures_total: prev.failures_total,
        }
    }
}
