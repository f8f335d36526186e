//! The real hypervisor: libvirt through the `virt` crate. Three connections
//! are kept open (libvirt connections are thread-safe) and reopened when
//! libvirtd goes away: one for what never waits on a guest (listing, the quick
//! stats, monitor health), one for the guest stats pass, one for everything
//! else. libvirtd serves only a few calls at a time per connection, so calls
//! stuck behind a hung guest's monitor never hold up the listing that tells
//! the controller the host is alive.

use std::{path::Path, sync::Mutex, time::Duration};

use virt::{
    connect::Connect,
    domain::{Domain, DomainState as LvState},
    enumutil::Enum,
    error::ErrorNumber,
    sys,
};

use super::{Control, DomainSample, DomainState, DomainStats, Hypervisor, NodeFacts, Power};
use crate::{
    domain_xml::{DomainType, METADATA_KEY, METADATA_URI, VpsMetadata},
    error::{AgentError, Asked, Result, libvirt_error},
    names,
};

/// One connection, opened again when it has died.
#[derive(Default)]
struct Slot(Mutex<Option<Connect>>);

impl Slot {
    fn get(&self, uri: &str) -> Result<Connect> {
        let mut slot = self
            .0
            .lock()
            .map_err(|_| AgentError::Internal("libvirt connection lock poisoned".into()))?;
        if let Some(c) = slot.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            tracing::warn!(%uri, "libvirt connection lost; reconnecting");
            *slot = None;
        }
        let c = Connect::open(Some(uri))
            .map_err(|e| AgentError::Libvirt(format!("cannot open {uri}: {}", e.message())))?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

pub struct LibvirtHypervisor {
    uri: String,
    ops: Slot,
    watch: Slot,
    guest: Slot,
    /// libvirt's test driver reports only the state in bulk.
    test_driver: bool,
}

impl LibvirtHypervisor {
    pub fn new(uri: &str) -> Result<Self> {
        // libvirt prints every error to stderr by default; ours are returned
        // as values and logged once.
        virt::error::clear_error_callback();
        let hv = LibvirtHypervisor {
            uri: uri.to_owned(),
            ops: Slot::default(),
            watch: Slot::default(),
            guest: Slot::default(),
            test_driver: uri.starts_with("test:"),
        };
        hv.conn()?;
        Ok(hv)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A handle on the connection for lifecycle calls. Public so tests can
    /// look at test-driver state, which lives in this connection.
    pub fn conn(&self) -> Result<Connect> {
        // The test driver's state lives in a connection: every call must see
        // the same one.
        self.ops.get(&self.uri)
    }

    fn watch_conn(&self) -> Result<Connect> {
        if self.test_driver {
            return self.conn();
        }
        self.watch.get(&self.uri)
    }

    fn guest_conn(&self) -> Result<Connect> {
        if self.test_driver {
            return self.conn();
        }
        self.guest.get(&self.uri)
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
        let doms = self.watch_conn()?.list_all_domains(0)?;
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
        self.conn()?
            .define_domain_xml(xml)
            .map_err(|e| libvirt_error(&e, Asked::Define))?;
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

    fn quick_stats(&self) -> Result<Vec<DomainSample>> {
        Ok(super::bulk_stats::quick(&self.watch_conn()?)?)
    }

    fn guest_stats(&self) -> Result<Vec<DomainSample>> {
        Ok(super::bulk_stats::guest(
            &self.guest_conn()?,
            self.test_driver,
        )?)
    }

    fn console_pty(&self, name: &str) -> Result<Option<std::path::PathBuf>> {
        let dom = self.must(name)?;
        if !dom.is_active()? {
            return Ok(None);
        }
        Ok(crate::console::pty_of(&dom.xml_desc(0)?))
    }

    fn control(&self, name: &str) -> Result<Control> {
        match self.watch_conn()?.lookup_domain_by_name(name) {
            Ok(d) => Ok(super::bulk_stats::control(&d)?),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => {
                Ok(Control::Answering)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// One domain's counters, asked of the domain device by device.
pub(super) fn domain_stats(dom: &Domain) -> Result<DomainStats> {
    let info = dom.info()?;
    let mut s = DomainStats {
        cpu_time_ns: info.cpu_time,
        vcpus: info.nr_virt_cpu,
        memory_max_kib: info.max_mem,
        memory_current_kib: info.memory,
        ..DomainStats::default()
    };
    if !dom.is_active()? {
        return Ok(s);
    }
    // Each counter is best effort: a guest without a balloon driver still
    // reports its CPU and disks.
    if let Ok(mem) = dom.memory_stats(0) {
        let get = |tag: u32| mem.iter().find(|m| m.tag == tag).map(|m| m.val);
        if let (Some(avail), Some(unused)) = (
            get(sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE),
            get(sys::VIR_DOMAIN_MEMORY_STAT_UNUSED),
        ) {
            s.memory_used_kib = avail.saturating_sub(unused);
        }
        s.memory_rss_kib = get(sys::VIR_DOMAIN_MEMORY_STAT_RSS).unwrap_or(0);
    }
    let xml = dom.xml_desc(0).unwrap_or_default();
    let devices = device_targets(&xml);
    for disk in &devices.disks {
        if let Ok(b) = dom.block_stats(disk) {
            s.disk_read_bytes += b.rd_bytes.max(0) as u64;
            s.disk_write_bytes += b.wr_bytes.max(0) as u64;
            s.disk_read_requests += b.rd_req.max(0) as u64;
            s.disk_write_requests += b.wr_req.max(0) as u64;
        }
    }
    for nic in &devices.nics {
        if let Ok(n) = dom.interface_stats(nic) {
            s.net_rx_bytes += n.rx_bytes.max(0) as u64;
            s.net_tx_bytes += n.tx_bytes.max(0) as u64;
            s.net_rx_packets += n.rx_packets.max(0) as u64;
            s.net_tx_packets += n.tx_packets.max(0) as u64;
            s.net_rx_errors += n.rx_errs.max(0) as u64;
            s.net_tx_errors += n.tx_errs.max(0) as u64;
            s.net_rx_drops += n.rx_drop.max(0) as u64;
            s.net_tx_drops += n.tx_drop.max(0) as u64;
        }
    }
    Ok(s)
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

/// The probe disk's first sector does what every boot loader does first: it
/// reads the next sector through the BIOS (int 13h, AH=42h) and jumps to it.
/// That sector switches to 32-bit protected mode and writes "KVM-OK" to the
/// first serial port. On hosts where KVM guests hang in early boot, the
/// marker never appears.
const PROBE_SECTOR_0: &[u8] = &[
    0xFA, 0x31, 0xC0, 0x8E, 0xD8, 0x8E, 0xD0, 0xBC, 0x00, 0x7C,
    0xFB, // cli; ds=ss=0; sp=7c00; sti
    0xBE, 0x1D, 0x7C, 0xB4, 0x42, 0xCD, 0x13, // si=dap; ah=42h; int 13h
    0x72, 0x05, 0xEA, 0x00, 0x7E, 0x00, 0x00, // jc hang; jmp 0000:7e00
    0xFA, 0xF4, 0xEB, 0xFD, // hang: cli; hlt; jmp hang
    0x10, 0x00, 0x01, 0x00, 0x00, 0x7E, 0x00, 0x00, // dap: 1 sector to 0000:7e00
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // from LBA 1
];
const PROBE_SECTOR_1: &[u8] = &[
    0xFA, 0x0F, 0x01, 0x16, 0x52, 0x7E, // cli; lgdt [gdt_desc]
    0x0F, 0x20, 0xC0, 0x66, 0x83, 0xC8, 0x01, 0x0F, 0x22, 0xC0, // cr0 |= PE
    0x66, 0xEA, 0x18, 0x7E, 0x00, 0x00, 0x08, 0x00, // jmp 08:pm
    0x66, 0xB8, 0x10, 0x00, 0x8E, 0xD8, 0x66, 0xBA, 0xF8, 0x03, // pm: ds=10h; dx=3f8h
    0xB0, b'K', 0xEE, 0xB0, b'V', 0xEE, 0xB0, b'M', 0xEE, 0xB0, b'-', 0xEE, // out "KVM-"
    0xB0, b'O', 0xEE, 0xB0, b'K', 0xEE, 0xB0, b'\n', 0xEE, // out "OK\n"
    0xF4, 0xEB, 0xFD, // hlt; jmp hlt
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // gdt: null
    0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF, 0x00, // flat code
    0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00, // flat data
    0x17, 0x00, 0x3A, 0x7E, 0x00, 0x00, // gdt_desc
];
const PROBE_MARKER: &str = "KVM-OK";

/// Chooses the domain type that really runs guests here. The probe disk is
/// booted once under KVM and once under software emulation; KVM is chosen
/// only when its guest reaches the marker, and no slower than emulation
/// does. (On some hosts KVM guests hang, or crawl through every BIOS disk
/// read, which makes a real boot loader look hung.)
pub fn probe_domain_type(uri: &str, work_dir: &Path) -> DomainType {
    if !Path::new("/dev/kvm").exists() || !uri.starts_with("qemu") {
        return DomainType::Qemu;
    }
    let dir = work_dir.join(".kvm-probe");
    let result = (|| -> Result<(Option<Duration>, Option<Duration>)> {
        prepare_probe_disk(&dir)?;
        let qemu = probe_once(uri, &dir, DomainType::Qemu, Duration::from_secs(5))?;
        // KVM gets as long as emulation took, with a floor for a busy host.
        let kvm_limit = qemu.map_or(Duration::from_secs(5), |q| {
            (q * 2).max(Duration::from_secs(1))
        });
        let kvm = probe_once(uri, &dir, DomainType::Kvm, kvm_limit)?;
        Ok((kvm, qemu))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok((Some(kvm), qemu)) if qemu.is_none_or(|q| kvm <= q) => {
            tracing::info!(?kvm, ?qemu, "KVM works here");
            DomainType::Kvm
        }
        Ok((kvm, qemu)) => {
            tracing::warn!(
                ?kvm,
                ?qemu,
                "KVM guests hang or crawl here; using software emulation (domain type qemu)"
            );
            DomainType::Qemu
        }
        Err(e) => {
            tracing::warn!(error = %e, "KVM probe failed; using software emulation (domain type qemu)");
            DomainType::Qemu
        }
    }
}

fn prepare_probe_disk(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    // A whole MiB: the firmware ignores disks of a single sector.
    let mut disk = vec![0u8; 1 << 20];
    disk[..PROBE_SECTOR_0.len()].copy_from_slice(PROBE_SECTOR_0);
    disk[510] = 0x55;
    disk[511] = 0xAA;
    disk[512..512 + PROBE_SECTOR_1.len()].copy_from_slice(PROBE_SECTOR_1);
    let raw = dir.join("boot.raw");
    std::fs::write(&raw, &disk).map_err(|e| AgentError::io(&raw, e))?;
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(dir.join("boot.qcow2"))
        .output()
        .map_err(|e| AgentError::Disk(e.to_string()))?;
    if !out.status.success() {
        return Err(AgentError::Disk(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    crate::seed::SeedContent {
        instance_id: "kvm-probe".into(),
        hostname: "kvm-probe".into(),
        ssh_public_key: String::new(),
        user_data: String::new(),
        network: None,
    }
    .write_image(&dir.join("seed.img"))
}

/// Boots the probe disk as a transient guest; the time to the marker, if it
/// came within `limit`.
fn probe_once(
    uri: &str,
    dir: &Path,
    kind: DomainType,
    limit: Duration,
) -> Result<Option<Duration>> {
    virt::error::clear_error_callback();
    let serial = dir.join(format!("console-{}.log", kind.as_str()));
    let xml = crate::domain_xml::DomainSpec {
        domain_type: kind,
        name: "betang-kvm-probe".into(),
        uuid: "00000000-0000-4000-8000-00000000b7e5".into(),
        title: "Betang KVM probe".into(),
        metadata: VpsMetadata {
            vps_id: String::new(),
            generation: 0,
            name: "kvm-probe".into(),
            institution: String::new(),
            ..Default::default()
        },
        vcpus: 1,
        memory_mib: 32,
        root_disk: dir.join("boot.qcow2"),
        seed_disk: dir.join("seed.img"),
        serial_log: serial.clone(),
        network: crate::config::NetworkConfig::None,
        attachment: None,
    }
    .to_xml()?;
    let conn = Connect::open(Some(uri))?;
    // A probe left by a crashed agent would block this one.
    if let Ok(old) = conn.lookup_domain_by_name("betang-kvm-probe") {
        let _ = old.destroy();
    }
    let dom = conn.create_domain_xml(&xml, 0)?;
    let started = std::time::Instant::now();
    let mut reached = None;
    while started.elapsed() < limit {
        if std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(PROBE_MARKER)) {
            reached = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = dom.destroy();
    Ok(reached)
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
