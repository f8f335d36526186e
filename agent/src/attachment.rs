//! A VPS's place on a network, as the controller sends it, checked before
//! any of it goes into the domain XML or the guest's seed.

use std::net::Ipv4Addr;

use betang_proto::v1::NetworkAttachment;

use crate::error::{AgentError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    /// A Linux bridge on this host.
    Bridge,
    /// A libvirt network.
    Network,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub network: String,
    pub kind: AttachKind,
    pub source: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Lowercase `52:54:00:xx:xx:xx`.
    pub mac: String,
}

fn invalid(field: &'static str, rule: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument {
        field,
        rule: rule.into(),
    }
}

fn ip(field: &'static str, s: &str) -> Result<Ipv4Addr> {
    s.parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an IPv4 address")))
}

impl Attachment {
    pub fn from_proto(a: &NetworkAttachment) -> Result<Attachment> {
        let kind = match a.attach_kind.as_str() {
            "bridge" => AttachKind::Bridge,
            "network" => AttachKind::Network,
            other => {
                return Err(invalid(
                    "attachment.attach_kind",
                    format!("{other:?} must be bridge or network"),
                ));
            }
        };
        let source_ok = !a.attach_source.is_empty()
            && a.attach_source.len() <= 15
            && a.attach_source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && a.attach_source != "."
            && a.attach_source != "..";
        if !source_ok {
            return Err(invalid(
                "attachment.attach_source",
                "must be an interface name (1-15 of a-z, A-Z, 0-9, '-', '_', '.')",
            ));
        }
        let name_ok = !a.network.is_empty()
            && a.network.len() <= 32
            && a.network
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(invalid("attachment.network", "must be a network name"));
        }
        let mac_ok = a.mac_address.len() == 17
            && a.mac_address.split(':').count() == 6
            && a.mac_address.split(':').all(|b| {
                b.len() == 2
                    && b.chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            });
        if !mac_ok {
            return Err(invalid(
                "attachment.mac_address",
                "must be six lower-case hex bytes separated by ':'",
            ));
        }
        let prefix_len = u8::try_from(a.prefix_len)
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| invalid("attachment.prefix_len", "must be between 8 and 30"))?;
        let gateway = if a.gateway.is_empty() {
            None
        } else {
            Some(ip("attachment.gateway", &a.gateway)?)
        };
        if a.dns.len() > 3 {
            return Err(invalid("attachment.dns", "at most 3 servers"));
        }
        Ok(Attachment {
            network: a.network.clone(),
            kind,
            source: a.attach_source.clone(),
            ip: ip("attachment.ip_address", &a.ip_address)?,
            prefix_len,
            gateway,
            dns: a
                .dns
                .iter()
                .map(|d| ip("attachment.dns", d))
                .collect::<Result<_>>()?,
            mac: a.mac_address.clone(),
        })
    }

    /// cloud-init's `network-config` (version 2) for the guest: the
    /// interface with this MAC gets the address, the default route and the
    /// name servers. Values are written as JSON strings (JSON is YAML).
    pub fn network_config(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut s = String::from("version: 2\nethernets:\n  eth0:\n");
        s.push_str(&format!("    match:\n      macaddress: {}\n", q(&self.mac)));
        s.push_str("    set-name: eth0\n");
        s.push_str(&format!(
            "    addresses:\n      - {}\n",
            q(&format!("{}/{}", self.ip, self.prefix_len))
        ));
        if let Some(g) = self.gateway {
            s.push_str(&format!(
                "    routes:\n      - to: default\n        via: {}\n",
                q(&g.to_string())
            ));
        }
        if !self.dns.is_empty() {
            let list: Vec<String> = self.dns.iter().map(|d| q(&d.to_string())).collect();
            s.push_str(&format!(
                "    nameservers:\n      addresses: [{}]\n",
                list.join(", ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto() -> NetworkAttachment {
        NetworkAttachment {
            network: "internal".into(),
            ip_address: "198.18.0.2".into(),
            prefix_len: 28,
            gateway: "198.18.0.1".into(),
            dns: vec!["198.18.0.1".into()],
            mac_address: "52:54:00:0a:0b:0c".into(),
            attach_kind: "bridge".into(),
            attach_source: "br-test".into(),
            vlan: 0,
        }
    }

    #[test]
    fn network_config_is_version_2_with_the_address() {
        let a = Attachment::from_proto(&proto()).unwrap();
        assert_eq!(
            a.network_config(),
            "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"52:54:00:0a:0b:0c\"\n    \
             set-name: eth0\n    addresses:\n      - \"198.18.0.2/28\"\n    routes:\n      - to: default\n        \
             via: \"198.18.0.1\"\n    nameservers:\n      addresses: [\"198.18.0.1\"]\n"
        );
    }

    #[test]
    fn hostile_values_are_refused() {
        for (field, bad) in [
            (
                "source",
                proto_with(|p| p.attach_source = "br0\"/><x".into()),
            ),
            ("source", proto_with(|p| p.attach_source = "..".into())),
            (
                "mac",
                proto_with(|p| p.mac_address = "52:54:00:0a:0b:0c\n- x".into()),
            ),
            ("ip", proto_with(|p| p.ip_address = "198.18.0.2/28".into())),
            ("kind", proto_with(|p| p.attach_kind = "direct".into())),
            ("prefix", proto_with(|p| p.prefix_len = 31)),
            ("dns", proto_with(|p| p.dns = vec!["1.1.1.1; rm".into()])),
        ] {
            assert!(Attachment::from_proto(&bad).is_err(), "{field}");
        }
    }

    fn proto_with(f: impl FnOnce(&mut NetworkAttachment)) -> NetworkAttachment {
        let mut p = proto();
        f(&mut p);
        p
    }
}
