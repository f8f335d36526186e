//! The hypervisor behind a trait. `LibvirtHypervisor` is the real one; pointed
//! at `test:///default` it is libvirt's own test driver, which the unit and
//! integration tests use. `SimulatedHypervisor` keeps guests in memory, for
//! scale runs of many hosts and for guests that misbehave on purpose. Calls are blocking: `Blocking` runs them on tokio's
//! blocking pool with a deadline, so the async runtime never waits on libvirt.

mod blocking;
mod bulk_stats;
mod libvirt;
mod simulated;

pub use blocking::Blocking;
pub use libvirt::{LibvirtHypervisor, probe_domain_type};
pub use simulated::{SIMULATED_STATE_FILE, SimulatedDisks, SimulatedHypervisor};

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
    fn stats(&self, name: &str) -> Result<DomainStats>;
    /// Counters of every owned domain in one pass. A domain busy with another
    /// job (a hung guest, a migration) is left out rather than waited for.
    fn bulk_stats(&self) -> Result<Vec<DomainSample>>;
    /// How this hypervisor's disks are made; real ones are qcow2 files.
    fn disks(&self) -> &dyn DiskTool {
        &QemuImg
    }
}
