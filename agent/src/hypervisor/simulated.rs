//! A hypervisor that keeps its domains in memory, for scale runs of many hosts
//! on one machine and for tests that need a guest to misbehave on purpose.
//! It reads the same domain XML the agent gives libvirt, so a define that
//! libvirt would parse differently shows up here too. Disks are small text
//! files that record what `qemu-img` would have made.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Control, DomainSample, DomainState, DomainStats, Hypervisor, NodeFacts, Power};
use crate::{
    disks::{DiskTool, GIB, ImageFacts},
    domain_xml::VpsMetadata,
    error::{AgentError, Result},
    names,
    seed::SeedContent,
};

/// The share of each vCPU a simulated guest keeps busy, so CPU seconds rise
/// the way a lightly loaded guest's do.
const BUSY_SHARE: f64 = 0.25;

/// Where a persistent simulated host keeps its domains, in its `vm_dir`.
pub const SIMULATED_STATE_FILE: &str = ".simulated-domains.json";

pub struct SimulatedHypervisor {
    node: NodeFacts,
    domains: Mutex<BTreeMap<String, SimDomain>>,
    /// Domains whose monitor does not answer until released, like a QEMU
    /// stopped with SIGSTOP (and since when): what asks the guest blocks,
    /// what the host knows (listing, CPU time) does not, and the guest uses
    /// no CPU meanwhile.
    hung: Mutex<HashMap<String, Instant>>,
    /// Hung domains that a call is waiting on, and since when: as libvirt
    /// holds the domain's job, later no-wait passes skip them.
    occupied: Mutex<HashMap<String, Instant>>,
    /// Every call blocks while set, like a stopped libvirtd.
    silent: AtomicBool,
    /// Written after every change when set, so the domains outlive the
    /// agent's process as libvirt's persistent domains do.
    state_file: Option<PathBuf>,
}

/// A domain as the state file keeps it; a running guest stays running
/// across the agent's restart, as a QEMU process outlives its agent.
#[derive(Serialize, Deserialize)]
struct StoredDomain {
    metadata: Option<VpsMetadata>,
    autostart: bool,
    vcpus: u32,
    memory_kib: u64,
    cpu_ns: u64,
    running: bool,
}

#[derive(Debug, Clone)]
struct SimDomain {
    metadata: Option<VpsMetadata>,
    autostart: bool,
    vcpus: u32,
    memory_kib: u64,
    /// CPU time of earlier runs.
    cpu_ns: u64,
    running_since: Option<Instant>,
}

impl SimDomain {
    fn cpu_time_ns(&self) -> u64 {
        self.cpu_time_ns_at(Instant::now())
    }

    fn cpu_time_ns_at(&self, at: Instant) -> u64 {
        let run = self.running_since.map_or(0, |t| {
            let ran = at.saturating_duration_since(t).as_secs_f64();
            (ran * f64::from(self.vcpus) * BUSY_SHARE * 1e9) as u64
        });
        self.cpu_ns + run
    }

    fn power(&self) -> Power {
        if self.running_since.is_some() {
            Power::Running
        } else {
            Power::Stopped
        }
    }

    fn stop(&mut self) {
        self.cpu_ns = self.cpu_time_ns();
        self.running_since = None;
    }
}

#[derive(Deserialize)]
struct DefinedDomain {
    name: String,
    vcpu: u32,
    memory: Amount,
    #[serde(default)]
    metadata: Option<DefinedMetadata>,
}

#[derive(Deserialize)]
struct Amount {
    #[serde(rename = "@unit", default)]
    unit: Option<String>,
    #[serde(rename = "$text")]
    value: u64,
}

#[derive(Deserialize)]
struct DefinedMetadata {
    #[serde(rename = "vps", default)]
    vps: Option<VpsMetadata>,
}

fn kib(a: &Amount) -> Result<u64> {
    let per = match a.unit.as_deref().unwrap_or("KiB") {
        "b" | "bytes" => return Ok(a.value / 1024),
        "KiB" | "k" => 1,
        "MiB" | "M" => 1024,
        "GiB" | "G" => 1024 * 1024,
        other => return Err(AgentError::Xml(format!("memory unit {other:?} unknown"))),
    };
    Ok(a.value.saturating_mul(per))
}

impl SimulatedHypervisor {
    pub fn new(node: NodeFacts) -> Self {
        SimulatedHypervisor {
            node,
            domains: Mutex::default(),
            hung: Mutex::default(),
            occupied: Mutex::default(),
            silent: AtomicBool::new(false),
            state_file: None,
        }
    }

    /// A simulated host whose domains are kept in `path` (loaded now, written
    /// atomically after every change).
    pub fn persistent(node: NodeFacts, path: PathBuf) -> Result<Self> {
        let stored: BTreeMap<String, StoredDomain> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(AgentError::io(&path, e)),
        };
        let domains = stored
            .into_iter()
            .map(|(n, d)| {
                let dom = SimDomain {
                    metadata: d.metadata,
                    autostart: d.autostart,
                    vcpus: d.vcpus,
                    memory_kib: d.memory_kib,
                    cpu_ns: d.cpu_ns,
                    running_since: d.running.then(Instant::now),
                };
                (n, dom)
            })
            .collect();
        Ok(SimulatedHypervisor {
            node,
            domains: Mutex::new(domains),
            hung: Mutex::default(),
            occupied: Mutex::default(),
            silent: AtomicBool::new(false),
            state_file: Some(path),
        })
    }

    /// Writes the domains to the state file (when there is one), under a
    /// temporary name first so a kill half-way leaves the last good copy.
    fn persist(&self, doms: &BTreeMap<String, SimDomain>) -> Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let stored: BTreeMap<&String, StoredDomain> = doms
            .iter()
            .map(|(n, d)| {
                let s = StoredDomain {
                    metadata: d.metadata.clone(),
                    autostart: d.autostart,
                    vcpus: d.vcpus,
                    memory_kib: d.memory_kib,
                    cpu_ns: d.cpu_time_ns(),
                    running: d.running_since.is_some(),
                };
                (n, s)
            })
            .collect();
        let text = serde_json::to_vec(&stored).map_err(|e| AgentError::Internal(e.to_string()))?;
        let tmp = path.with_extension("json.part");
        io(&tmp, std::fs::write(&tmp, text))?;
        io(path, std::fs::rename(&tmp, path))
    }

    /// Makes every later call that asks the guest `name` block until
    /// `release` is called.
    pub fn hang(&self, name: &str) {
        lock(&self.hung)
            .entry(name.to_owned())
            .or_insert_with(Instant::now);
    }

    pub fn release(&self, name: &str) {
        let Some(at) = lock(&self.hung).remove(name) else {
            return;
        };
        // The stopped time was not run.
        if let Some(d) = lock(&self.domains).get_mut(name)
            && let Some(t) = d.running_since.as_mut()
        {
            *t += at.elapsed();
        }
    }

    /// Makes every call block until `answer_again`, like a stopped libvirtd.
    pub fn fall_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    pub fn answer_again(&self) {
        self.silent.store(false, Ordering::SeqCst);
    }

    fn wait_while_silent(&self) {
        while self.silent.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the guest: blocks while it is hung, holding its job meanwhile.
    fn wait_while_hung(&self, name: &str) {
        self.wait_while_silent();
        if !lock(&self.hung).contains_key(name) {
            return;
        }
        lock(&self.occupied)
            .entry(name.to_owned())
            .or_insert_with(Instant::now);
        while lock(&self.hung).contains_key(name) {
            std::thread::sleep(Duration::from_millis(20));
        }
        lock(&self.occupied).remove(name);
    }

    /// A call that asks the guest (libvirt takes its job and its monitor).
    fn with<T>(&self, name: &str, f: impl FnOnce(&mut SimDomain) -> T) -> Result<T> {
        self.wait_while_hung(name);
        self.with_definition(name, f)
    }

    /// A call that only changes libvirt's own record of the domain.
    fn with_definition<T>(&self, name: &str, f: impl FnOnce(&mut SimDomain) -> T) -> Result<T> {
        self.wait_while_silent();
        let mut doms = lock(&self.domains);
        let d = doms
            .get_mut(name)
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))?;
        let out = f(d);
        self.persist(&doms)?;
        Ok(out)
    }

    fn describe(name: &str, d: &SimDomain) -> DomainState {
        DomainState {
            name: name.to_owned(),
            metadata: d.metadata.clone(),
            power: d.power(),
            autostart: d.autostart,
            vcpus: d.vcpus,
            memory_kib: d.memory_kib,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hypervisor for SimulatedHypervisor {
    fn node(&self) -> Result<NodeFacts> {
        Ok(self.node)
    }

    fn list_owned(&self) -> Result<Vec<DomainState>> {
        self.wait_while_silent();
        let doms = lock(&self.domains);
        Ok(doms
            .iter()
            .filter(|(n, _)| names::vps_id_of_domain(n).is_some())
            .map(|(n, d)| Self::describe(n, d))
            .collect())
    }

    fn lookup(&self, name: &str) -> Result<Option<DomainState>> {
        self.wait_while_silent();
        Ok(lock(&self.domains)
            .get(name)
            .map(|d| Self::describe(name, d)))
    }

    fn define(&self, xml: &str) -> Result<()> {
        self.wait_while_silent();
        let parsed: DefinedDomain =
            quick_xml::de::from_str(xml).map_err(|e| AgentError::Xml(e.to_string()))?;
        let memory_kib = kib(&parsed.memory)?;
        let metadata = parsed.metadata.and_then(|m| m.vps);
        let mut doms = lock(&self.domains);
        let d = doms.entry(parsed.name).or_insert_with(|| SimDomain {
            metadata: None,
            autostart: false,
            vcpus: 0,
            memory_kib: 0,
            cpu_ns: 0,
            running_since: None,
        });
        d.metadata = metadata;
        d.vcpus = parsed.vcpu;
        d.memory_kib = memory_kib;
        self.persist(&doms)
    }

    fn set_metadata(&self, name: &str, meta: &VpsMetadata) -> Result<()> {
        self.with(name, |d| d.metadata = Some(meta.clone()))
    }

    fn start(&self, name: &str) -> Result<()> {
        self.with(name, |d| {
            if d.running_since.is_none() {
                d.running_since = Some(Instant::now());
            }
        })
    }

    /// The simulated guest honours the power button at once.
    fn shutdown(&self, name: &str) -> Result<()> {
        self.with(name, SimDomain::stop)
    }

    /// Kills the process, which works on a hung guest too.
    fn destroy(&self, name: &str) -> Result<()> {
        self.release(name);
        self.with_definition(name, SimDomain::stop)
    }

    fn reboot(&self, name: &str, _force: bool) -> Result<()> {
        self.with(name, |d| {
            if d.running_since.is_some() {
                d.stop();
                d.running_since = Some(Instant::now());
            }
        })
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        self.with_definition(name, |d| d.autostart = on)
    }

    fn undefine(&self, name: &str) -> Result<()> {
        self.wait_while_silent();
        self.release(name);
        let mut doms = lock(&self.domains);
        if doms.remove(name).is_some() {
            self.persist(&doms)?;
        }
        Ok(())
    }

    fn quick_stats(&self) -> Result<Vec<DomainSample>> {
        self.wait_while_silent();
        let hung = lock(&self.hung).clone();
        Ok(lock(&self.domains)
            .iter()
            .filter(|(n, _)| names::vps_id_of_domain(n).is_some())
            .map(|(n, d)| {
                let mut stats = simulated_stats(d);
                if let Some(at) = hung.get(n) {
                    stats.cpu_time_ns = d.cpu_time_ns_at(*at);
                }
                DomainSample {
                    name: n.clone(),
                    power: d.power(),
                    stats,
                }
            })
            .collect())
    }

    /// Like libvirt's no-wait pass: a domain another call already waits on
    /// is skipped; one that is hung but not yet waited on holds the pass.
    fn guest_stats(&self) -> Result<Vec<DomainSample>> {
        self.wait_while_silent();
        let running: Vec<String> = lock(&self.domains)
            .iter()
            .filter(|(n, d)| names::vps_id_of_domain(n).is_some() && d.running_since.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        let mut out = Vec::new();
        for name in running {
            if lock(&self.occupied).contains_key(&name) {
                continue;
            }
            self.wait_while_hung(&name);
            if let Some(d) = lock(&self.domains).get(&name) {
                out.push(DomainSample {
                    name,
                    power: d.power(),
                    stats: simulated_stats(d),
                });
            }
        }
        Ok(out)
    }

    fn control(&self, name: &str) -> Result<Control> {
        self.wait_while_silent();
        Ok(match lock(&self.occupied).get(name) {
            Some(since) => Control::Busy(since.elapsed()),
            None => Control::Answering,
        })
    }

    fn disks(&self) -> &dyn DiskTool {
        &SimulatedDisks
    }
}

/// Counters that grow with the guest's CPU time, like a busy guest's.
fn simulated_stats(d: &SimDomain) -> DomainStats {
    let cpu = d.cpu_time_ns();
    let running = d.running_since.is_some();
    let work = cpu / 1_000;
    let half = if running { d.memory_kib / 2 } else { 0 };
    DomainStats {
        cpu_time_ns: cpu,
        vcpus: d.vcpus,
        memory_max_kib: d.memory_kib,
        memory_current_kib: if running { d.memory_kib } else { 0 },
        memory_used_kib: half,
        memory_rss_kib: half,
        disk_read_bytes: work * 4,
        disk_write_bytes: work * 2,
        disk_read_requests: work / 64,
        disk_write_requests: work / 128,
        net_rx_bytes: work * 3,
        net_tx_bytes: work,
        net_rx_packets: work / 100,
        net_tx_packets: work / 300,
        ..DomainStats::default()
    }
}

/// Disk files of a simulated host: a line of text each instead of a qcow2, so
/// thousands of guests cost kilobytes.
pub struct SimulatedDisks;

const OVERLAY_MAGIC: &str = "betang-simulated-overlay";

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| AgentError::io(path, e))
}

impl DiskTool for SimulatedDisks {
    /// A simulated base image is any file; it counts as a 1 GiB disk.
    fn inspect_base(&self, path: &Path) -> Result<ImageFacts> {
        let meta = io(path, std::fs::metadata(path))?;
        Ok(ImageFacts {
            virtual_size: GIB,
            actual_size: meta.len(),
        })
    }

    fn create_overlay(&self, base: &Path, overlay: &Path, size_bytes: u64) -> Result<()> {
        let text = format!("{OVERLAY_MAGIC}\n{}\n{size_bytes}\n", base.display());
        io(overlay, std::fs::write(overlay, text))
    }

    fn grow(&self, path: &Path, size_bytes: u64) -> Result<()> {
        let text = io(path, std::fs::read_to_string(path))?;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let current = lines.get(2).and_then(|s| s.parse::<u64>().ok());
        match current {
            Some(c) if lines[0] == OVERLAY_MAGIC => {
                if c < size_bytes {
                    lines[2] = size_bytes.to_string();
                    io(path, std::fs::write(path, lines.join("\n") + "\n"))?;
                }
                Ok(())
            }
            _ => Err(AgentError::Disk(format!(
                "{} is not a simulated overlay",
                path.display()
            ))),
        }
    }

    fn backing_of(&self, overlay: &Path) -> Result<PathBuf> {
        let text = io(overlay, std::fs::read_to_string(overlay))?;
        let mut l = text.lines();
        match (l.next(), l.next()) {
            (Some(OVERLAY_MAGIC), Some(base)) => Ok(PathBuf::from(base)),
            _ => Err(AgentError::Disk("it is not a simulated overlay".into())),
        }
    }

    fn rebase(&self, overlay: &Path, base: &Path) -> Result<()> {
        let text = io(overlay, std::fs::read_to_string(overlay))?;
        let mut lines: Vec<&str> = text.lines().collect();
        if lines.len() < 3 || lines[0] != OVERLAY_MAGIC {
            return Err(AgentError::Disk(format!(
                "{} is not a simulated overlay",
                overlay.display()
            )));
        }
        let base = base.display().to_string();
        lines[1] = &base;
        io(overlay, std::fs::write(overlay, lines.join("\n") + "\n"))
    }

    fn write_seed(&self, path: &Path, content: &SeedContent) -> Result<()> {
        io(
            path,
            std::fs::write(path, content.meta_data() + &content.user_data()),
        )
    }

    /// Simulated images are small files, hashed as real ones are, so a
    /// refreshed image or a move onto another build behaves as on a real host.
    fn digest(&self, path: &Path) -> Result<String> {
        crate::digests::sha256_file(path)
    }
}

/// The virtual size a simulated overlay records.
#[cfg(test)]
fn simulated_overlay_size(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .nth(2)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain_xml::{DomainSpec, DomainType};

    fn spec(name: &str) -> DomainSpec {
        DomainSpec {
            domain_type: DomainType::Qemu,
            name: name.into(),
            uuid: "6f1c1c7e-0000-4000-8000-000000000001".into(),
            title: "web <&> \"one\"".into(),
            metadata: VpsMetadata {
                vps_id: "6f1c1c7e-0000-4000-8000-000000000001".into(),
                generation: 3,
                name: "web".into(),
                institution: "dinas-a".into(),
                ..Default::default()
            },
            vcpus: 2,
            memory_mib: 1024,
            root_disk: "/v/root.qcow2".into(),
            seed_disk: "/v/seed.img".into(),
            serial_log: "/v/console.log".into(),
            network: crate::config::NetworkConfig::None,
            attachment: None,
        }
    }

    fn sim() -> SimulatedHypervisor {
        SimulatedHypervisor::new(NodeFacts {
            cpus: 16,
            memory_kib: 64 << 20,
        })
    }

    #[test]
    fn define_reads_the_agents_own_xml() {
        let hv = sim();
        let name = names::domain_name("6f1c1c7e-0000-4000-8000-000000000001");
        let s = spec(&name);
        hv.define(&s.to_xml().unwrap()).unwrap();
        let d = hv.lookup(&name).unwrap().unwrap();
        assert_eq!(d.vcpus, 2);
        assert_eq!(d.memory_kib, 1024 * 1024);
        assert_eq!(d.metadata, Some(s.metadata.clone()));
        assert_eq!(d.power, Power::Stopped);
        assert_eq!(hv.list_owned().unwrap().len(), 1);
    }

    fn cpu_of(hv: &SimulatedHypervisor, name: &str) -> u64 {
        hv.quick_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.stats.cpu_time_ns)
            .unwrap()
    }

    #[test]
    fn power_and_cpu_time_follow_the_calls() {
        let hv = sim();
        let name = names::domain_name("6f1c1c7e-0000-4000-8000-000000000001");
        hv.define(&spec(&name).to_xml().unwrap()).unwrap();
        hv.start(&name).unwrap();
        assert_eq!(hv.lookup(&name).unwrap().unwrap().power, Power::Running);
        std::thread::sleep(Duration::from_millis(30));
        let a = cpu_of(&hv, &name);
        std::thread::sleep(Duration::from_millis(30));
        let b = cpu_of(&hv, &name);
        assert!(b > a && a > 0, "{a} then {b}");
        hv.shutdown(&name).unwrap();
        let stopped = cpu_of(&hv, &name);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(cpu_of(&hv, &name), stopped);
        hv.undefine(&name).unwrap();
        assert!(hv.lookup(&name).unwrap().is_none());
        assert!(matches!(hv.start(&name), Err(AgentError::NoSuchVm(_))));
    }

    #[test]
    fn a_hung_domain_holds_one_guest_pass_and_nothing_else() {
        let hv = std::sync::Arc::new(sim());
        let hung = names::domain_name("6f1c1c7e-0000-4000-8000-000000000001");
        let fine = names::domain_name("6f1c1c7e-0000-4000-8000-000000000002");
        for n in [&hung, &fine] {
            hv.define(&spec(n).to_xml().unwrap()).unwrap();
            hv.start(n).unwrap();
        }
        hv.hang(&hung);
        let h2 = hv.clone();
        let first = std::thread::spawn(move || h2.guest_stats().unwrap().len());
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !first.is_finished(),
            "the pass that meets the hung guest waits"
        );
        assert!(
            matches!(hv.control(&hung).unwrap(), Control::Busy(d) if d >= Duration::from_millis(50))
        );
        assert_eq!(hv.control(&fine).unwrap(), Control::Answering);
        // What the host knows never waits; a later pass skips the busy guest.
        assert_eq!(hv.quick_stats().unwrap().len(), 2);
        assert_eq!(hv.list_owned().unwrap().len(), 2);
        let later = hv.guest_stats().unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].name, fine);
        hv.release(&hung);
        assert_eq!(first.join().unwrap(), 2);
        assert_eq!(hv.control(&hung).unwrap(), Control::Answering);
    }

    #[test]
    fn a_hung_guest_can_still_be_destroyed() {
        let hv = sim();
        let name = names::domain_name("6f1c1c7e-0000-4000-8000-000000000001");
        hv.define(&spec(&name).to_xml().unwrap()).unwrap();
        hv.start(&name).unwrap();
        hv.hang(&name);
        hv.destroy(&name).unwrap();
        assert_eq!(hv.lookup(&name).unwrap().unwrap().power, Power::Stopped);
    }

    #[test]
    fn a_silent_hypervisor_blocks_every_call() {
        let hv = std::sync::Arc::new(sim());
        hv.fall_silent();
        let h2 = hv.clone();
        let t = std::thread::spawn(move || h2.list_owned().is_ok());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished());
        hv.answer_again();
        assert!(t.join().unwrap());
    }

    #[test]
    fn simulated_disks_record_base_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let (base, root) = (dir.path().join("base"), dir.path().join("root"));
        std::fs::write(&base, "x").unwrap();
        let d = SimulatedDisks;
        assert_eq!(d.inspect_base(&base).unwrap().virtual_size, GIB);
        d.create_overlay(&base, &root, 2 * GIB).unwrap();
        assert_eq!(d.backing_of(&root).unwrap(), base);
        assert!(d.backing_of(&base).is_err());
        d.grow(&root, GIB).unwrap();
        assert_eq!(simulated_overlay_size(&root), Some(2 * GIB));
        d.grow(&root, 5 * GIB).unwrap();
        assert_eq!(simulated_overlay_size(&root), Some(5 * GIB));
        assert!(d.grow(&base, GIB).is_err());
        let other = dir.path().join("other");
        d.rebase(&root, &other).unwrap();
        assert_eq!(d.backing_of(&root).unwrap(), other);
        assert_eq!(simulated_overlay_size(&root), Some(5 * GIB));
        assert!(d.rebase(&base, &other).is_err());
    }
}
