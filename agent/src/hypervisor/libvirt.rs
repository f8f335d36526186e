//! The real hypervisor: libvirt through the `virt` crate. One connection is
//! kept open and shared (libvirt connections are thread-safe); when libvirtd
//! goes away the connection is dropped and the next call opens a new one.

use std::{sync::Mutex, time::Duration};

use virt::{
    connect::Connect,
    domain::{Domain, DomainState as LvState},
    enumutil::Enum,
    error::ErrorNumber,
    sys,
};

use super::{DomainState, DomainStats, Hypervisor, NodeFacts, Power};
use crate::{
    domain_xml::{DomainType, METADATA_KEY, METADATA_URI, VpsMetadata},
    error::{AgentError, Result},
    names,
};

pub struct LibvirtHypervisor {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

impl LibvirtHypervisor {
    pub fn new(uri: &str) -> Result<Self> {
        // libvirt prints every error to stderr by default; ours are returned
        // as values and logged once.
        virt::error::clear_error_callback();
        let hv = LibvirtHypervisor {
            uri: uri.to_owned(),
            conn: Mutex::new(None),
        };
        hv.conn()?;
        Ok(hv)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A handle on the shared connection, reopened when it has died. Public so
    /// tests can look at test-driver state, which lives in this connection.
    pub fn conn(&self) -> Result<Connect> {
        let mut slot = self
            .conn
            .lock()
            .map_err(|_| AgentError::Internal("libvirt connection lock poisoned".into()))?;
        if let Some(c) = slot.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            tracing::warn!(uri = %self.uri, "libvirt connection lost; reconnecting");
            *slot = None;
        }
        let c = Connect::open(Some(&self.uri))
            .map_err(|e| AgentError::Libvirt(format!("cannot open {}: {}", self.uri, e.message())))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn domain(&self, name: &str) -> Result<Option<Domain>> {
        match self.conn()?.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn must(&self, name: &str) -> Result<Domain> {
        self.domain(name)?
            .ok_or_else(|| AgentError::NoSuchVm(name.to_owned()))
    }

    fn describe(&self, dom: &Domain) -> Result<DomainState> {
        let info = dom.info()?;
        let metadata = dom
            .metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(METADATA_URI),
                sys::VIR_DOMAIN_AFFECT_CONFIG,
            )
            .ok()
            .and_then(|xml| VpsMetadata::from_xml(&xml).ok());
        Ok(DomainState {
            name: dom.name()?,
            metadata,
            power: power_of(info.state),
            autostart: dom.autostart().unwrap_or(false),
            vcpus: info.nr_virt_cpu,
            memory_kib: info.max_mem,
        })
    }
}

fn power_of(state: virt::domain::DomainStateEnum) -> Power {
    match state {
        Enum::Known(LvState::Running | LvState::Blocked | LvState::Shutdown) => Power::Running,
        Enum::Known(LvState::Paused | LvState::PMSuspended) => Power::Paused,
        Enum::Known(LvState::Crashed) => Power::Crashed,
        Enum::Known(LvState::Shutoff | LvState::NoState) | Enum::Unknown(_) => Power::Stopped,
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn node(&self) -> Result<NodeFacts> {
        let n = self.conn()?.node_info()?;
        Ok(NodeFacts {
            cpus: n.cpus,
            memory_kib: n.memory,
        })
    }

    fn list_owned(&self) -> Result<Vec<DomainState>> {
        let doms = self.conn()?.list_all_domains(0)?;
        let mut out = Vec::new();
        for d in doms {
            let Ok(name) = d.name() else { continue };
            if names::vps_id_of_domain(&name).is_none() {
                continue;
            }
            // A domain that vanishes between the list and the look is simply gone.
            if let Ok(s) = self.describe(&d) {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn lookup(&self, name: &str) -> Result<Option<DomainState>> {
        match self.domain(name)? {
            Some(d) => Ok(Some(self.describe(&d)?)),
            None => Ok(None),
        }
    }

    fn define(&self, xml: &str) -> Result<()> {
        self.conn()?.define_domain_xml(xml)?;
        Ok(())
    }

    fn set_metadata(&self, name: &str, meta: &VpsMetadata) -> Result<()> {
        let dom = self.must(name)?;
        let xml = meta.to_xml()?;
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
        if dom.is_active()? {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&xml),
            Some(METADATA_KEY),
            Some(METADATA_URI),
            flags,
        )?;
        Ok(())
    }

    fn start(&self, name: &str) -> Result<()> {
        let dom = self.must(name)?;
        if !dom.is_active()? {
            dom.create()?;
        }
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<()> {
        let dom = self.must(name)?;
        if dom.is_active()? {
            dom.shutdown()?;
        }
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let dom = self.must(name)?;
        if dom.is_active()? {
            dom.destroy()?;
        }
        Ok(())
    }

    fn reboot(&self, name: &str, force: bool) -> Result<()> {
        let dom = self.must(name)?;
        if force {
            dom.reset()?;
        } else {
            dom.reboot(sys::VIR_DOMAIN_REBOOT_DEFAULT)?;
        }
        Ok(())
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        let dom = self.must(name)?;
        if dom.autostart().unwrap_or(!on) != on {
            dom.set_autostart(on)?;
        }
        Ok(())
    }

    fn undefine(&self, name: &str) -> Result<()> {
        let Some(dom) = self.domain(name)? else {
            return Ok(());
        };
        if dom.is_active()? {
            dom.destroy()?;
        }
        // Guests boot with BIOS, so there is no NVRAM to remove.
        dom.undefine_flags(
            sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
        )?;
        Ok(())
    }

    fn stats(&self, name: &str) -> Result<DomainStats> {
        let dom = self.must(name)?;
        let info = dom.info()?;
        let mut s = DomainStats {
            cpu_time_ns: info.cpu_time,
            vcpus: info.nr_virt_cpu,
            memory_max_kib: info.max_mem,
            memory_used_kib: info.memory,
            ..DomainStats::default()
        };
        if !dom.is_active()? {
            s.memory_used_kib = 0;
            return Ok(s);
        }
        // Each counter is best effort: a guest without a balloon driver still
        // reports its CPU and disks.
        if let Ok(mem) = dom.memory_stats(0) {
            let get = |tag: u32| mem.iter().find(|m| m.tag == tag).map(|m| m.val);
            let used = match (
                get(sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE),
                get(sys::VIR_DOMAIN_MEMORY_STAT_UNUSED),
            ) {
                (Some(avail), Some(unused)) => Some(avail.saturating_sub(unused)),
                _ => get(sys::VIR_DOMAIN_MEMORY_STAT_RSS),
            };
            if let Some(u) = used {
                s.memory_used_kib = u;
            }
        }
        let xml = dom.xml_desc(0).unwrap_or_default();
        let devices = device_targets(&xml);
        for disk in &devices.disks {
            if let Ok(b) = dom.block_stats(disk) {
                s.disk_read_bytes += b.rd_bytes.max(0) as u64;
                s.disk_write_bytes += b.wr_bytes.max(0) as u64;
            }
        }
        for nic in &devices.nics {
            if let Ok(n) = dom.interface_stats(nic) {
                s.net_rx_bytes += n.rx_bytes.max(0) as u64;
                s.net_tx_bytes += n.tx_bytes.max(0) as u64;
            }
        }
        Ok(s)
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct DeviceTargets {
    disks: Vec<String>,
    nics: Vec<String>,
}

/// The `<target dev=…>` of each disk and interface in a live domain XML.
fn device_targets(xml: &str) -> DeviceTargets {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = DeviceTargets::default();
    let mut inside: Option<&'static str> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => match e.name().as_ref() {
                b"disk" => inside = Some("disk"),
                b"interface" => inside = Some("interface"),
                _ => {}
            },
            Ok(Event::End(e)) if matches!(e.name().as_ref(), b"disk" | b"interface") => {
                inside = None
            }
            Ok(Event::Empty(e)) if e.name().as_ref() == b"target" => {
                let dev = e
                    .try_get_attribute("dev")
                    .ok()
                    .flatten()
                    .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()));
                match (inside, dev) {
                    (Some("disk"), Some(d)) => out.disks.push(d),
                    (Some("interface"), Some(d)) => out.nics.push(d),
                    _ => {}
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    out
}

/// Chooses the domain type that really runs guests here: KVM only when a
/// throw-away KVM guest is still running after a moment (on some hosts KVM
/// guests stop with an internal error in the firmware), otherwise QEMU's
/// software emulation.
pub fn probe_domain_type(uri: &str) -> DomainType {
    // A diskless transient guest: the firmware alone shows whether KVM works.
    const PROBE_XML: &str = "<domain type='kvm'><name>betang-kvm-probe</name>\
        <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
        <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
        <features><acpi/><apic/></features><devices/></domain>";
    if !std::path::Path::new("/dev/kvm").exists() || !uri.starts_with("qemu") {
        return DomainType::Qemu;
    }
    let probe = || -> Result<bool> {
        let conn = Connect::open(Some(uri))?;
        let dom = conn.create_domain_xml(PROBE_XML, 0)?;
        std::thread::sleep(Duration::from_secs(3));
        let running = matches!(dom.info()?.state, Enum::Known(LvState::Running));
        let _ = dom.destroy();
        Ok(running)
    };
    match probe() {
        Ok(true) => DomainType::Kvm,
        Ok(false) => {
            tracing::warn!("KVM guests stop here; using software emulation (domain type qemu)");
            DomainType::Qemu
        }
        Err(e) => {
            tracing::warn!(error = %e, "KVM probe failed; using software emulation (domain type qemu)");
            DomainType::Qemu
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_disks_and_nics() {
        let xml = r#"<domain><devices>
          <disk type="file" device="disk"><source file="/a"/><target dev="vda" bus="virtio"/></disk>
          <disk type="file" device="disk"><source file="/b"/><target dev="vdb" bus="virtio"/></disk>
          <interface type="bridge"><source bridge="br0"/><target dev="vnet3"/></interface>
          <console type="pty"><target type="serial" port="0"/></console>
        </devices></domain>"#;
        assert_eq!(
            device_targets(xml),
            DeviceTargets {
                disks: vec!["vda".into(), "vdb".into()],
                nics: vec!["vnet3".into()],
            }
        );
    }
}
