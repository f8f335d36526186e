//! The agent's configuration file (TOML). Unknown keys are refused so a typo
//! never silently falls back to a default.

use serde::Deserialize;
use std::{net::SocketAddr, path::PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable id of this host; `[a-z0-9-]`, 1 to 63 characters.
    pub host_id: String,
    /// Where the agent's gRPC service listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How the controller reaches this agent; defaults to `http://<listen>`.
    #[serde(default)]
    pub advertise_endpoint: Option<String>,
    /// The controller's gRPC endpoint, e.g. `http://127.0.0.1:7000`.
    pub controller_endpoint: String,
    #[serde(default = "default_libvirt_uri")]
    pub libvirt_uri: String,
    /// `libvirt` (the default), or `simulated`: guests kept in memory and
    /// disks as small text files, for scale runs of many hosts on one
    /// machine. A simulated host needs `[capacity]`.
    #[serde(default)]
    pub hypervisor: HypervisorSetting,
    /// With `simulated`: keep the simulated domains in `vm_dir` so they
    /// outlive the agent's process, as libvirt's persistent domains do (the
    /// fault-injection suite kills agents). Off for scale runs.
    #[serde(default)]
    pub simulated_persist: bool,
    /// `kvm`, `qemu`, or `auto` (probe: use KVM only if a KVM guest really starts).
    #[serde(default)]
    pub domain_type: DomainTypeSetting,
    /// Base images and their `catalog.toml`.
    pub image_dir: PathBuf,
    /// Per-VPS overlays, seeds and serial logs.
    pub vm_dir: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_reconcile_s")]
    pub reconcile_interval_seconds: u64,
    /// Upper bound for one libvirt call, so a hung domain cannot stall the agent.
    #[serde(default = "default_libvirt_timeout_s")]
    pub libvirt_call_timeout_seconds: u64,
    /// What the controller may place here; defaults to what libvirt reports.
    #[serde(default)]
    pub capacity: Option<CapacityConfig>,
    #[serde(default)]
    pub network: NetworkConfig,
    /// Where this host stands, e.g. a room or rack; VPS may ask for a zone.
    #[serde(default)]
    pub zone: String,
    /// What this host offers, e.g. `disk = "ssd"`; VPS may ask for labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Mutual TLS with the controller; leave out only for a throw-away setup.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
    /// Where Prometheus scrapes `GET /metrics`; no endpoint when absent.
    /// Off loopback it needs `metrics_token_file`: the figures name VPS and
    /// institutions.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token `/metrics` asks for; none when absent.
    #[serde(default)]
    pub metrics_token_file: Option<std::path::PathBuf>,
    /// How often the background collector reads every VM's counters.
    #[serde(default = "default_stats_interval_ms")]
    pub stats_interval_ms: u64,
    /// A guest whose QEMU has left a monitor command unanswered this long
    /// is reported as not answering (its VPS shows it, the controller and
    /// other guests go on).
    #[serde(default = "default_guest_unresponsive_ms")]
    pub guest_unresponsive_after_ms: u64,
    /// A call that never waits on a guest (listing the domains) and has not
    /// returned after this long means libvirtd itself does not answer: the
    /// host is reported DEGRADED and calls are refused until it answers.
    /// Keep it longer than a guest takes to start under load: libvirtd holds
    /// a starting domain's lock, and listing waits for it.
    #[serde(default = "default_libvirt_unresponsive_ms")]
    pub libvirt_unresponsive_after_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DomainTypeSetting {
    #[default]
    Auto,
    Kvm,
    Qemu,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorSetting {
    #[default]
    Libvirt,
    Simulated,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// The guest's network interface.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
pub enum NetworkConfig {
    /// No NIC (test hosts without a bridge).
    #[default]
    None,
    /// A libvirt network, e.g. `default`.
    Network { source: String },
    /// A host bridge, e.g. `br0`.
    Bridge { source: String },
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7100))
}
fn default_libvirt_uri() -> String {
    "qemu:///system".into()
}
fn default_heartbeat_ms() -> u64 {
    2000
}
fn default_reconcile_s() -> u64 {
    30
}
fn default_stats_interval_ms() -> u64 {
    5000
}
fn default_guest_unresponsive_ms() -> u64 {
    10_000
}
fn default_libvirt_unresponsive_ms() -> u64 {
    15_000
}
fn default_libvirt_timeout_s() -> u64 {
    30
}

impl AgentConfig {
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        // Replaced by guest_unresponsive_after_ms and
        // libvirt_unresponsive_after_ms; a configuration written by an
        // earlier install still loads.
        if table.remove("stats_deadline_ms").is_some() {
            tracing::warn!(
                "stats_deadline_ms is no longer used (see guest_unresponsive_after_ms and \
                 libvirt_unresponsive_after_ms); it can be removed"
            );
        }
        let cfg: AgentConfig = table.try_into()?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        check_host_id(&self.host_id)?;
        if let NetworkConfig::Network { source } | NetworkConfig::Bridge { source } = &self.network
        {
            let ok = !source.is_empty()
                && source.len() <= 15
                && source
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            anyhow::ensure!(
                ok,
                "network.source: {source:?} must be 1 to 15 characters of a-z, A-Z, 0-9, '-', '_', '.'"
            );
        }
        let slug = |s: &str| {
            s.len() <= 63
                && s.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
                })
        };
        anyhow::ensure!(
            slug(&self.zone) && self.zone.len() <= 32,
            "zone: {:?} must be at most 32 characters of a-z, 0-9, '-', '_', '.'",
            self.zone
        );
        for (k, v) in &self.labels {
            anyhow::ensure!(
                !k.is_empty() && slug(k) && slug(v),
                "labels: {k:?} = {v:?}: names and values are at most 63 characters of a-z, 0-9, '-', '_', '.'"
            );
        }
        anyhow::ensure!(
            self.hypervisor != HypervisorSetting::Simulated || self.capacity.is_some(),
            "capacity: a simulated host has no hardware to measure; set [capacity]"
        );
        anyhow::ensure!(
            self.heartbeat_interval_ms >= 100,
            "heartbeat_interval_ms: must be at least 100"
        );
        anyhow::ensure!(
            self.listen.ip().is_loopback() || self.tls.is_some(),
            "listen: {} can be reached from other machines without [tls], so anyone could \
             drive the guests: set up [tls] (betangctl pki issue), or keep listen on 127.0.0.1",
            self.listen
        );
        if self.tls.is_some() {
            for (field, url) in [
                ("controller_endpoint", Some(&self.controller_endpoint)),
                ("advertise_endpoint", self.advertise_endpoint.as_ref()),
            ] {
                if let Some(u) = url {
                    anyhow::ensure!(
                        u.starts_with("https://"),
                        "{field}: {u:?} must be https:// under [tls]: over http:// user-data, \
                         SSH keys and disks would travel in clear"
                    );
                }
            }
        }
        betang_exposition::check_listen(
            "metrics_listen",
            self.metrics_listen,
            self.metrics_token_file.is_some(),
        )?;
        Ok(())
    }

    pub fn advertised(&self) -> String {
        self.advertise_endpoint
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

pub fn check_host_id(id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-');
    anyhow::ensure!(
        ok,
        "host_id: {id:?} must be 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'"
    );
    anyhow::ensure!(
        id != crate::tls::CONTROLLER_NAME,
        "host_id: {id:?} is the controller's own name, which no host may take"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
host_id = "host-1"
controller_endpoint = "http://127.0.0.1:7000"
image_dir = "/var/lib/betang/images"
vm_dir = "/var/lib/betang/vms"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.libvirt_uri, "qemu:///system");
        assert_eq!(c.domain_type, DomainTypeSetting::Auto);
        assert_eq!(c.heartbeat_interval_ms, 2000);
        assert_eq!(c.network, NetworkConfig::None);
        assert_eq!(c.advertised(), "http://127.0.0.1:7100");
    }

    #[test]
    fn no_secret_travels_in_clear() {
        let tls = "[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n";
        let refused = |text: &str, field: &str| {
            let e = AgentConfig::from_toml(text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{field}: ")), "{e}");
        };
        // Anyone who reaches the port could drive the guests.
        refused(&format!("{MINIMAL}listen = \"0.0.0.0:7100\"\n"), "listen");
        // Mutual TLS set up, but the controller spoken to in clear.
        refused(&format!("{MINIMAL}{tls}"), "controller_endpoint");
        let https = MINIMAL.replace("http://", "https://");
        refused(
            &format!("{https}advertise_endpoint = \"http://10.0.0.5:7100\"\n{tls}"),
            "advertise_endpoint",
        );
        refused(
            &format!("{MINIMAL}metrics_listen = \"0.0.0.0:9478\"\n"),
            "metrics_listen",
        );
        AgentConfig::from_toml(&format!(
            "{https}listen = \"0.0.0.0:7100\"\nadvertise_endpoint = \"https://10.0.0.5:7100\"\n\
             metrics_listen = \"0.0.0.0:9478\"\nmetrics_token_file = \"/etc/betang/m.token\"\n{tls}"
        ))
        .unwrap();
    }

    #[test]
    fn an_earlier_installs_config_still_loads() {
        AgentConfig::from_toml(&format!("{MINIMAL}stats_deadline_ms = 10000\n")).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = AgentConfig::from_toml(&format!("{MINIMAL}\nheartbeat_ms = 5\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_host_id_and_bridge_are_refused() {
        let e = AgentConfig::from_toml(&MINIMAL.replace("host-1", "../host")).unwrap_err();
        assert!(e.to_string().starts_with("host_id:"), "{e}");
        let e =
            AgentConfig::from_toml(&MINIMAL.replace("host-1", "betang-controller")).unwrap_err();
        assert!(e.to_string().contains("the controller's own name"), "{e}");
        let e = AgentConfig::from_toml(&format!(
            "{MINIMAL}\n[network]\nmode = \"bridge\"\nsource = \"br0;rm\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().starts_with("network.source:"), "{e}");
    }

    #[test]
    fn simulated_host_needs_a_capacity() {
        let sim = format!("{MINIMAL}\nhypervisor = \"simulated\"\n");
        let e = AgentConfig::from_toml(&sim).unwrap_err();
        assert!(e.to_string().starts_with("capacity:"), "{e}");
        let c = AgentConfig::from_toml(&format!(
            "{sim}\n[capacity]\nvcpus = 16\nmemory_mib = 65536\ndisk_gib = 1000\n"
        ))
        .unwrap();
        assert_eq!(c.hypervisor, HypervisorSetting::Simulated);
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../deploy/agent.example.toml");
        let c = AgentConfig::from_toml(text).unwrap();
        assert!(c.tls.is_some(), "the shipped config uses mutual TLS");
    }
}
