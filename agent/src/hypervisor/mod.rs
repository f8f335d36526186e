//! The hypervisor behind a trait. `LibvirtHypervisor` is the real one; pointed
//! at `test:///default` it is libvirt's own test driver, which the unit and
//! integration tests use. `SimulatedHypervisor` keeps guests in memory, for
//! scale runs of many hosts and for guests that misbehave on purpose. Calls are blocking: `Blocking` runs them on tokio's
//! blocking pool with a deadline, so the async runtime never waits on libvirt.

mod blocking;
mod bulk_stats;
mod libvirt;
mod simulated;
mod watchdog;

pub use blocking::Blocking;
pub use libvirt::{LibvirtHypervisor, probe_domain_type};
pub use simulated::{SIMULATED_STATE_FILE, SimulatedDisks, SimulatedHypervisor};
pub use watchdog::Watchdog;

use crate::{
    disks::{DiskTool, QemuImg},
    domain_xml::VpsMetadata,
    error::Result,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Running,
    Stopped,
    Paused,
    Crashed,
}

impl Power {
    pub fn to_proto(self) -> betang_proto::v1::PowerState {
        use betang_proto::v1::PowerState as P;
        match self {
            Power::Running => P::Running,
            Power::Stopped => P::Stopped,
            Power::Paused => P::Paused,
            Power::Crashed => P::Crashed,
        }
    }
}

/// One of Betang's domains as libvirt sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainState {
    pub name: String,
    pub metadata: Option<VpsMetadata>,
    pub power: Power,
    pub autostart: bool,
    pub vcpus: u32,
    pub memory_kib: u64,
}

/// Counters of one domain; rates are computed by the caller from two samples.
/// Disk and network counters are summed over the domain's devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainStats {
    pub cpu_time_ns: u64,
    pub vcpus: u32,
    pub memory_max_kib: u64,
    /// What the balloon currently gives the guest; 0 when not reported.
    pub memory_current_kib: u64,
    /// In use by the guest (available less unused), where the balloon reports it.
    pub memory_used_kib: u64,
    pub memory_rss_kib: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_read_requests: u64,
    pub disk_write_requests: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub net_rx_packets: u64,
    pub net_tx_packets: u64,
    pub net_rx_errors: u64,
    pub net_tx_errors: u64,
    pub net_rx_drops: u64,
    pub net_tx_drops: u64,
}

impl DomainStats {
    /// The figures only a guest's monitor gives (memory, disks, vCPUs) taken
    /// from `guest`; CPU time and network stay as they are.
    pub fn with_guest_figures(mut self, guest: &DomainStats) -> DomainStats {
        self.vcpus = guest.vcpus.max(self.vcpus);
        self.memory_max_kib = guest.memory_max_kib.max(self.memory_max_kib);
        self.memory_current_kib = guest.memory_current_kib;
        self.memory_used_kib = guest.memory_used_kib;
        self.memory_rss_kib = guest.memory_rss_kib;
        self.disk_read_bytes = guest.disk_read_bytes;
        self.disk_write_bytes = guest.disk_write_bytes;
        self.disk_read_requests = guest.disk_read_requests;
        self.disk_write_requests = guest.disk_write_requests;
        self
    }
}

/// Whether a domain's control channel (QEMU's monitor) answers, as libvirt
/// tells without waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Ready, or running a background job.
    Answering,
    /// A command has been outstanding this long.
    Busy(std::time::Duration),
    /// The channel is broken.
    Broken,
}

/// One domain's counters from a collection pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSample {
    pub name: String,
    pub power: Power,
    pub stats: DomainStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts {
    pub cpus: u32,
    pub memory_kib: u64,
}

pub trait Hypervisor: Send + Sync + 'static {
    fn node(&self) -> Result<NodeFacts>;
    /// Every domain whose name carries Betang's prefix.
    /// Never waits on a guest.
    fn list_owned(&self) -> Result<Vec<DomainState>>;
    fn lookup(&self, name: &str) -> Result<Option<DomainState>>;
    /// Defines a persistent domain (never a transient one).
    fn define(&self, xml: &str) -> Result<()>;
    fn set_metadata(&self, name: &str, meta: &VpsMetadata) -> Result<()>;
    fn start(&self, name: &str) -> Result<()>;
    /// Presses the ACPI power button.
    fn shutdown(&self, name: &str) -> Result<()>;
    fn destroy(&self, name: &str) -> Result<()>;
    fn reboot(&self, name: &str, force: bool) -> Result<()>;
    fn set_autostart(&self, name: &str, on: bool) -> Result<()>;
    fn undefine(&self, name: &str) -> Result<()>;
    /// Power, CPU time and network counters of every owned domain, from
    /// what the host itself knows: never waits on a guest.
    fn quick_stats(&self) -> Result<Vec<DomainSample>>;
    /// Memory, disk and vCPU figures of every running owned domain, which
    /// only each guest's monitor gives. A domain whose monitor is already
    /// busy is left out; one that stops answering during the call blocks it,
    /// so callers run it apart and watch `control`.
    fn guest_stats(&self) -> Result<Vec<DomainSample>>;
    /// Whether the domain's monitor answers; never waits on it.
    fn control(&self, name: &str) -> Result<Control>;
    /// The running domain's serial console pty, if it has one (the
    /// simulated hypervisor has none).
    fn console_pty(&self, name: &str) -> Result<Option<std::path::PathBuf>> {
        let _ = name;
        Ok(None)
    }
    /// How this hypervisor's disks are made; real ones are qcow2 files.
    fn disks(&self) -> &dyn DiskTool {
        &QemuImg
    }
}
