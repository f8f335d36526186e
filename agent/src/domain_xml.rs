//! Libvirt domain XML, built by a serializer from typed structs. Nothing here
//! pastes strings into XML: names, titles and paths are escaped by quick-xml.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::error::{AgentError, Result};

/// Namespace of Betang's element inside `<metadata>`.
pub const METADATA_URI: &str = "https://betang.dev/xmlns/vps/1";
pub const METADATA_KEY: &str = "betang";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    Kvm,
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// What Betang keeps in the domain itself, so an agent can adopt its guests
/// from libvirt alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "vps")]
pub struct VpsMetadata {
    #[serde(rename = "@id")]
    pub vps_id: String,
    #[serde(rename = "@generation")]
    pub generation: u64,
    #[serde(rename = "@name")]
    pub name: String,
    /// The owning institution's id; absent on domains made before it was kept.
    #[serde(
        rename = "@institution",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub institution: String,
    /// Its network and address, when it has a Betang network (for the
    /// metrics, read back from libvirt alone).
    #[serde(rename = "@network", default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(rename = "@address", default, skip_serializing_if = "String::is_empty")]
    pub address: String,
}

impl VpsMetadata {
    /// The element as libvirt's metadata API wants it (namespace given separately).
    pub fn to_xml(&self) -> Result<String> {
        quick_xml::se::to_string(self).map_err(|e| AgentError::Xml(e.to_string()))
    }

    pub fn from_xml(xml: &str) -> Result<Self> {
        quick_xml::de::from_str(xml).map_err(|e| AgentError::Xml(e.to_string()))
    }
}

/// Everything needed to define one guest.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub domain_type: DomainType,
    pub name: String,
    pub uuid: String,
    pub title: String,
    pub metadata: VpsMetadata,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub root_disk: PathBuf,
    pub seed_disk: PathBuf,
    pub serial_log: PathBuf,
    pub network: crate::config::NetworkConfig,
    /// The VPS's own network, address and MAC: when present, it replaces
    /// `network`, and libvirt's `clean-traffic` filter holds the guest to
    /// that MAC and address.
    pub attachment: Option<crate::attachment::Attachment>,
}

#[derive(Serialize)]
#[serde(rename = "domain")]
struct Domain<'a> {
    #[serde(rename = "@type")]
    kind: &'static str,
    name: &'a str,
    uuid: &'a str,
    title: &'a str,
    metadata: Metadata<'a>,
    memory: Sized,
    #[serde(rename = "currentMemory")]
    current_memory: Sized,
    vcpu: u32,
    os: Os,
    features: Features,
    on_poweroff: &'static str,
    on_reboot: &'static str,
    on_crash: &'static str,
    devices: Devices<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    #[serde(rename = "betang:vps")]
    vps: MetadataVps<'a>,
}

#[derive(Serialize)]
struct MetadataVps<'a> {
    #[serde(rename = "@xmlns:betang")]
    xmlns: &'static str,
    #[serde(rename = "@id")]
    id: &'a str,
    #[serde(rename = "@generation")]
    generation: u64,
    #[serde(rename = "@name")]
    name: &'a str,
    #[serde(rename = "@institution", skip_serializing_if = "str::is_empty")]
    institution: &'a str,
    #[serde(rename = "@network", skip_serializing_if = "str::is_empty")]
    network: &'a str,
    #[serde(rename = "@address", skip_serializing_if = "str::is_empty")]
    address: &'a str,
}

#[derive(Serialize)]
struct Sized {
    #[serde(rename = "@unit")]
    unit: &'static str,
    #[serde(rename = "$text")]
    value: u64,
}

#[derive(Serialize)]
struct Os {
    #[serde(rename = "type")]
    kind: OsType,
    boot: Boot,
}

#[derive(Serialize)]
struct OsType {
    #[serde(rename = "@arch")]
    arch: &'static str,
    #[serde(rename = "@machine")]
    machine: &'static str,
    #[serde(rename = "$text")]
    value: &'static str,
}

#[derive(Serialize)]
struct Boot {
    #[serde(rename = "@dev")]
    dev: &'static str,
}

/// Without ACPI a guest can never honour a graceful shutdown.
#[derive(Serialize)]
struct Features {
    acpi: (),
    apic: (),
}

#[derive(Serialize)]
struct Devices<'a> {
    disk: Vec<Disk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<Interface<'a>>,
    serial: Serial,
    console: Console,
    memballoon: MemBalloon,
}

/// The balloon device reports the guest's own memory use every 10 s.
#[derive(Serialize)]
struct MemBalloon {
    #[serde(rename = "@model")]
    model: &'static str,
    stats: BalloonStats,
}

#[derive(Serialize)]
struct BalloonStats {
    #[serde(rename = "@period")]
    period: u32,
}

#[derive(Serialize)]
struct Disk {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@device")]
    device: &'static str,
    driver: DiskDriver,
    source: FileSource,
    target: DiskTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    readonly: Option<()>,
}

#[derive(Serialize)]
struct DiskDriver {
    #[serde(rename = "@name")]
    name: &'static str,
    #[serde(rename = "@type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct FileSource {
    #[serde(rename = "@file")]
    file: String,
}

#[derive(Serialize)]
struct DiskTarget {
    #[serde(rename = "@dev")]
    dev: &'static str,
    #[serde(rename = "@bus")]
    bus: &'static str,
}

#[derive(Serialize)]
struct Interface<'a> {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mac: Option<Mac<'a>>,
    source: InterfaceSource<'a>,
    model: InterfaceModel,
    #[serde(skip_serializing_if = "Option::is_none")]
    filterref: Option<FilterRef>,
}

#[derive(Serialize)]
struct Mac<'a> {
    #[serde(rename = "@address")]
    address: &'a str,
}

/// libvirt's `clean-traffic`: no other MAC or IP from this guest, no ARP
/// spoofing, no DHCP server of its own.
#[derive(Serialize)]
struct FilterRef {
    #[serde(rename = "@filter")]
    filter: &'static str,
    parameter: FilterParameter,
}

#[derive(Serialize)]
struct FilterParameter {
    #[serde(rename = "@name")]
    name: &'static str,
    #[serde(rename = "@value")]
    value: String,
}

#[derive(Serialize)]
struct InterfaceSource<'a> {
    #[serde(rename = "@network", skip_serializing_if = "Option::is_none")]
    network: Option<&'a str>,
    #[serde(rename = "@bridge", skip_serializing_if = "Option::is_none")]
    bridge: Option<&'a str>,
}

#[derive(Serialize)]
struct InterfaceModel {
    #[serde(rename = "@type")]
    kind: &'static str,
}

/// A pty, which the agent relays as the interactive console, with
/// everything the guest prints also kept in a log (written by virtlogd,
/// which rotates it: a guest can print without end).
#[derive(Serialize)]
struct Serial {
    #[serde(rename = "@type")]
    kind: &'static str,
    log: LogFile,
    target: SerialTarget,
}

#[derive(Serialize)]
struct LogFile {
    #[serde(rename = "@file")]
    file: String,
    /// Keep the console history across restarts instead of truncating it.
    #[serde(rename = "@append")]
    append: &'static str,
}

#[derive(Serialize)]
struct SerialTarget {
    #[serde(rename = "@port")]
    port: u32,
}

#[derive(Serialize)]
struct Console {
    #[serde(rename = "@type")]
    kind: &'static str,
    target: ConsoleTarget,
}

#[derive(Serialize)]
struct ConsoleTarget {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "@port")]
    port: u32,
}

fn path_string(p: &std::path::Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| AgentError::Xml(format!("path {} is not UTF-8", p.display())))
}

impl DomainSpec {
    pub fn to_xml(&self) -> Result<String> {
        use crate::config::NetworkConfig;
        let serial_path = path_string(&self.serial_log)?;
        let plain = |kind, source| Interface {
            kind,
            mac: None,
            source,
            model: InterfaceModel { kind: "virtio" },
            filterref: None,
        };
        let interface = match (&self.attachment, &self.network) {
            (Some(a), _) => {
                use crate::attachment::AttachKind;
                let (kind, source) = match a.kind {
                    AttachKind::Bridge => (
                        "bridge",
                        InterfaceSource {
                            network: None,
                            bridge: Some(&a.source),
                        },
                    ),
                    AttachKind::Network => (
                        "network",
                        InterfaceSource {
                            network: Some(&a.source),
                            bridge: None,
                        },
                    ),
                };
                Some(Interface {
                    kind,
                    mac: Some(Mac { address: &a.mac }),
                    source,
                    model: InterfaceModel { kind: "virtio" },
                    filterref: Some(FilterRef {
                        filter: "clean-traffic",
                        parameter: FilterParameter {
                            name: "IP",
                            value: a.ip.to_string(),
                        },
                    }),
                })
            }
            (None, NetworkConfig::None) => None,
            (None, NetworkConfig::Network { source }) => Some(plain(
                "network",
                InterfaceSource {
                    network: Some(source),
                    bridge: None,
                },
            )),
            (None, NetworkConfig::Bridge { source }) => Some(plain(
                "bridge",
                InterfaceSource {
                    network: None,
                    bridge: Some(source),
                },
            )),
        };
        let doc = Domain {
            kind: self.domain_type.as_str(),
            name: &self.name,
            uuid: &self.uuid,
            title: &self.title,
            metadata: Metadata {
                vps: MetadataVps {
                    xmlns: METADATA_URI,
                    id: &self.metadata.vps_id,
                    generation: self.metadata.generation,
                    name: &self.metadata.name,
                    institution: &self.metadata.institution,
                    network: &self.metadata.network,
                    address: &self.metadata.address,
                },
            },
            memory: Sized {
                unit: "MiB",
                value: self.memory_mib,
            },
            current_memory: Sized {
                unit: "MiB",
                value: self.memory_mib,
            },
            vcpu: self.vcpus,
            os: Os {
                kind: OsType {
                    arch: "x86_64",
                    machine: "pc",
                    value: "hvm",
                },
                boot: Boot { dev: "hd" },
            },
            features: Features { acpi: (), apic: () },
            on_poweroff: "destroy",
            on_reboot: "restart",
            on_crash: "restart",
            devices: Devices {
                disk: vec![
                    Disk {
                        kind: "file",
                        device: "disk",
                        driver: DiskDriver {
                            name: "qemu",
                            kind: "qcow2",
                        },
                        source: FileSource {
                            file: path_string(&self.root_disk)?,
                        },
                        target: DiskTarget {
                            dev: "vda",
                            bus: "virtio",
                        },
                        readonly: None,
                    },
                    Disk {
                        kind: "file",
                        device: "disk",
                        driver: DiskDriver {
                            name: "qemu",
                            kind: "raw",
                        },
                        source: FileSource {
                            file: path_string(&self.seed_disk)?,
                        },
                        target: DiskTarget {
                            dev: "vdb",
                            bus: "virtio",
                        },
                        readonly: Some(()),
                    },
                ],
                interface,
                serial: Serial {
                    kind: "pty",
                    log: LogFile {
                        file: serial_path,
                        append: "on",
                    },
                    target: SerialTarget { port: 0 },
                },
                console: Console {
                    kind: "pty",
                    target: ConsoleTarget {
                        kind: "serial",
                        port: 0,
                    },
                },
                memballoon: MemBalloon {
                    model: "virtio",
                    stats: BalloonStats { period: 10 },
                },
            },
        };
        quick_xml::se::to_string(&doc).map_err(|e| AgentError::Xml(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfig;

    fn spec(title: &str) -> DomainSpec {
        DomainSpec {
            domain_type: DomainType::Qemu,
            name: "betang-0192c3a4-5b6c-7d8e-9f00-112233445566".into(),
            uuid: "0192c3a4-5b6c-7d8e-9f00-112233445566".into(),
            title: title.into(),
            metadata: VpsMetadata {
                vps_id: "0192c3a4-5b6c-7d8e-9f00-112233445566".into(),
                generation: 7,
                name: title.into(),
                institution: String::new(),
                ..Default::default()
            },
            vcpus: 2,
            memory_mib: 128,
            root_disk: "/var/lib/betang/vms/x/root.qcow2".into(),
            seed_disk: "/var/lib/betang/vms/x/seed.img".into(),
            serial_log: "/var/lib/betang/vms/x/console.log".into(),
            network: NetworkConfig::None,
            attachment: None,
        }
    }

    #[test]
    fn an_attachment_brings_its_mac_and_the_traffic_filter() {
        let mut s = spec("web");
        s.network = NetworkConfig::Bridge {
            source: "br0".into(),
        };
        s.attachment = Some(
            crate::attachment::Attachment::from_proto(&betang_proto::v1::NetworkAttachment {
                network: "internal".into(),
                ip_address: "198.18.0.2".into(),
                prefix_len: 28,
                mac_address: "52:54:00:0a:0b:0c".into(),
                attach_kind: "bridge".into(),
                attach_source: "br-test".into(),
                ..Default::default()
            })
            .unwrap(),
        );
        s.metadata.network = "internal".into();
        s.metadata.address = "198.18.0.2".into();
        let xml = s.to_xml().unwrap();
        // The metrics read the address back from libvirt from the first define on.
        assert!(
            xml.contains(r#"name="web" network="internal" address="198.18.0.2"/>"#),
            "{xml}"
        );
        assert!(
            xml.contains(
                r#"<interface type="bridge"><mac address="52:54:00:0a:0b:0c"/><source bridge="br-test"/><model type="virtio"/><filterref filter="clean-traffic"><parameter name="IP" value="198.18.0.2"/></filterref></interface>"#
            ),
            "{xml}"
        );
    }

    #[test]
    fn hostile_title_is_escaped() {
        let hostile = r#"web"/><devices><disk file='/etc/shadow'/>&amp;<!--"#;
        let xml = spec(hostile).to_xml().unwrap();
        assert!(!xml.contains("<disk file='/etc/shadow'"), "{xml}");
        assert!(!xml.contains("<!--"), "{xml}");
        // Parsing the document back yields exactly the hostile string.
        #[derive(Deserialize)]
        struct Back {
            title: String,
        }
        let back: Back = quick_xml::de::from_str(&xml).unwrap();
        assert_eq!(back.title, hostile);
        assert_eq!(xml.matches("<disk ").count(), 2);
    }

    #[test]
    fn shape_of_the_domain() {
        let xml = spec("web").to_xml().unwrap();
        for needle in [
            r#"<domain type="qemu">"#,
            r#"<memory unit="MiB">128</memory>"#,
            "<vcpu>2</vcpu>",
            r#"<boot dev="hd"/>"#,
            "<features><acpi/><apic/></features>",
            r#"<driver name="qemu" type="qcow2"/>"#,
            r#"<driver name="qemu" type="raw"/>"#,
            r#"<target dev="vdb" bus="virtio"/><readonly/>"#,
            r#"<memballoon model="virtio"><stats period="10"/></memballoon>"#,
            r#"<betang:vps xmlns:betang="https://betang.dev/xmlns/vps/1" id="0192c3a4-5b6c-7d8e-9f00-112233445566" generation="7" name="web"/>"#,
            r#"<serial type="pty"><log file="/var/lib/betang/vms/x/console.log" append="on"/><target port="0"/></serial>"#,
            r#"<console type="pty"><target type="serial" port="0"/></console>"#,
        ] {
            assert!(xml.contains(needle), "missing {needle} in {xml}");
        }
        assert!(!xml.contains("<interface"));
    }

    #[test]
    fn bridge_interface() {
        let mut s = spec("web");
        s.network = NetworkConfig::Bridge {
            source: "br0".into(),
        };
        let xml = s.to_xml().unwrap();
        assert!(
            xml.contains(r#"<interface type="bridge"><source bridge="br0"/><model type="virtio"/></interface>"#),
            "{xml}"
        );
    }

    #[test]
    fn metadata_round_trips() {
        let m = VpsMetadata {
            vps_id: "0192c3a4-5b6c-7d8e-9f00-112233445566".into(),
            generation: 42,
            name: "a<b&\"c".into(),
            institution: "dinas-<kominfo>&\"".into(),
            ..Default::default()
        };
        let xml = m.to_xml().unwrap();
        assert_eq!(VpsMetadata::from_xml(&xml).unwrap(), m);
        // libvirt hands the element back with its namespace prefix.
        let prefixed = r#"<betang:vps xmlns:betang="https://betang.dev/xmlns/vps/1" id="0192c3a4-5b6c-7d8e-9f00-112233445566" generation="3" name="web"/>"#;
        let back = VpsMetadata::from_xml(prefixed).unwrap();
        assert_eq!(back.generation, 3);
    }
}
