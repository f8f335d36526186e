//! The controller's configuration file (TOML). Unknown keys are refused.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use crate::scheduler::{Policy, Ratios};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The gRPC API for people and their tools. Loopback by default.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The gRPC API for agents (registration and heartbeats), under mutual TLS
    /// when `[tls]` is set.
    #[serde(default = "default_agent_listen")]
    pub agent_listen: SocketAddr,
    /// Mutual TLS with the agents; leave out only for a throw-away setup.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Holds `betang.db`.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub overcommit: Ratios,
    #[serde(default)]
    pub placement: Policy,
    /// A host whose last heartbeat is older than this is DOWN.
    #[serde(default = "default_down_after_ms")]
    pub host_down_after_ms: u64,
    /// Heartbeat interval the controller asks agents for.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u32,
    /// How often the reconciler looks for work without being woken.
    #[serde(default = "default_reconcile_ms")]
    pub reconcile_interval_ms: u64,
    /// A VPS still being built after this long goes to ERROR.
    #[serde(default = "default_build_timeout_s")]
    pub build_timeout_seconds: u64,
    /// A move whose disk copy has not advanced for this long is given up:
    /// the VPS stays on its host and the partial copy is removed.
    #[serde(default = "default_move_stall_s")]
    pub move_stall_seconds: u64,
    /// A move still copying after this long (or after 5 failed tries) is
    /// given up the same way.
    #[serde(default = "default_move_give_up_s")]
    pub move_give_up_seconds: u64,
    /// How often a VPS's usage from the heartbeats is written to the store.
    /// Heartbeats come every 2 s; writing each one for 20,000 VPS would be
    /// 10,000 row writes a second.
    #[serde(default = "default_usage_interval_ms")]
    pub usage_interval_ms: u64,
    /// The longest a token may live; a token asked for without a lifetime
    /// gets this one. Every token expires.
    #[serde(default = "default_max_token_days")]
    pub max_token_lifetime_days: u32,
    /// How many requests an institution may have waiting for approval; a
    /// member's next one is refused until one is decided or cancelled.
    #[serde(default = "default_max_pending")]
    pub max_pending_requests: u32,
    /// Where Prometheus scrapes `GET /metrics`; no endpoint when absent.
    /// Off loopback it needs `metrics_token_file`: the figures name VPS and
    /// institutions.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token `/metrics` asks for (Prometheus:
    /// `authorization: { credentials_file: … }`); no token asked when absent.
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
    /// Request budgets per token and the servers' bounds.
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// Where the web portal is served, plain HTTP; no portal when absent.
    /// On loopback only: put a proxy that terminates TLS in front of it.
    #[serde(default)]
    pub portal_listen: Option<SocketAddr>,
    /// The portal's address as people reach it (`https://…` behind the
    /// proxy), for invitation links; an `https` address makes its cookies
    /// `Secure`.
    #[serde(default)]
    pub portal_url: String,
    /// The portal's time zone, as an offset from UTC in hours and a name:
    /// Western Indonesia Time by default (no daylight saving there).
    #[serde(default = "default_portal_utc_offset")]
    pub portal_utc_offset_hours: i8,
    #[serde(default = "default_portal_zone")]
    pub portal_zone_name: String,
}

fn default_portal_utc_offset() -> i8 {
    7
}

fn default_portal_zone() -> String {
    "WIB".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000))
}
fn default_agent_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7001))
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The installation's CA (`betangctl pki init`).
    pub ca: PathBuf,
    /// The controller's certificate and key (`betangctl pki issue betang-controller`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Serve the user API over TLS too (server certificate only; users
    /// authenticate with tokens).
    #[serde(default)]
    pub user_api: bool,
}
fn default_max_token_days() -> u32 {
    crate::store::identity::DEFAULT_MAX_TOKEN_DAYS
}
fn default_max_pending() -> u32 {
    20
}
fn default_down_after_ms() -> u64 {
    10_000
}
fn default_heartbeat_ms() -> u32 {
    2_000
}
fn default_reconcile_ms() -> u64 {
    2_000
}
fn default_move_stall_s() -> u64 {
    120
}
fn default_move_give_up_s() -> u64 {
    6 * 3600
}
fn default_build_timeout_s() -> u64 {
    600
}
fn default_usage_interval_ms() -> u64 {
    30_000
}

impl ControllerConfig {
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let c: ControllerConfig = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for (field, v) in [
            ("overcommit.cpu", self.overcommit.cpu),
            ("overcommit.memory", self.overcommit.memory),
            ("overcommit.disk", self.overcommit.disk),
        ] {
            anyhow::ensure!(
                v.is_finite() && (0.1..=64.0).contains(&v),
                "{field}: must be between 0.1 and 64, got {v}"
            );
        }
        anyhow::ensure!(
            self.move_stall_seconds > 0 && self.move_give_up_seconds >= self.move_stall_seconds,
            "move_stall_seconds: must be more than 0 and at most move_give_up_seconds"
        );
        anyhow::ensure!(
            (1..=3650).contains(&self.max_token_lifetime_days),
            "max_token_lifetime_days: must be between 1 and 3650"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.max_pending_requests),
            "max_pending_requests: must be between 1 and 10000"
        );
        anyhow::ensure!(
            self.host_down_after_ms > u64::from(self.heartbeat_interval_ms),
            "host_down_after_ms: must be longer than heartbeat_interval_ms"
        );
        anyhow::ensure!(
            self.listen.ip().is_loopback() || self.tls.as_ref().is_some_and(|t| t.user_api),
            "listen: {} can be reached from other machines, and bearer tokens would cross \
             the network in clear: set user_api = true in [tls], or keep listen on 127.0.0.1 \
             behind a proxy that terminates TLS",
            self.listen
        );
        anyhow::ensure!(
            self.agent_listen.ip().is_loopback() || self.tls.is_some(),
            "agent_listen: {} can be reached from other machines without [tls], so anyone \
             could register a host: set up [tls] (betangctl pki init), or keep agent_listen \
             on 127.0.0.1",
            self.agent_listen
        );
        self.limits.validate()?;
        anyhow::ensure!(
            self.portal_listen.is_none_or(|a| a.ip().is_loopback()),
            "portal_listen: {} can be reached from other machines, and passwords would \
             cross the network in clear: keep it on 127.0.0.1 behind a proxy that \
             terminates TLS",
            self.portal_listen
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        anyhow::ensure!(
            (-12..=14).contains(&self.portal_utc_offset_hours),
            "portal_utc_offset_hours: must be between -12 and 14"
        );
        betang_exposition::check_listen(
            "metrics_listen",
            self.metrics_listen,
            self.metrics_token_file.is_some(),
        )?;
        Ok(())
    }

    /// A configuration for tests and tools: everything default but the data dir.
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        ControllerConfig {
            listen: default_listen(),
            agent_listen: default_agent_listen(),
            tls: None,
            data_dir,
            overcommit: Ratios::default(),
            placement: Policy::default(),
            host_down_after_ms: default_down_after_ms(),
            heartbeat_interval_ms: default_heartbeat_ms(),
            reconcile_interval_ms: default_reconcile_ms(),
            build_timeout_seconds: default_build_timeout_s(),
            move_stall_seconds: default_move_stall_s(),
            move_give_up_seconds: default_move_give_up_s(),
            usage_interval_ms: default_usage_interval_ms(),
            metrics_listen: None,
            metrics_token_file: None,
            max_pending_requests: default_max_pending(),
            max_token_lifetime_days: default_max_token_days(),
            limits: crate::limits::LimitsConfig::default(),
            portal_listen: None,
            portal_url: String::new(),
            portal_utc_offset_hours: default_portal_utc_offset(),
            portal_zone_name: default_portal_zone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let c = ControllerConfig::from_toml(include_str!("../../deploy/controller.example.toml"))
            .unwrap();
        assert_eq!(c.host_down_after_ms, 10_000);
        assert_eq!(c.overcommit.cpu, 4.0);
        assert!(c.tls.is_some(), "the shipped config uses mutual TLS");
    }

    #[test]
    fn typos_and_bad_ratios_are_refused() {
        let e = ControllerConfig::from_toml("data_dir = \"/x\"\nlisten_addr = \"1.2.3.4:5\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e =
            ControllerConfig::from_toml("data_dir = \"/x\"\n[overcommit]\ncpu = -1\n").unwrap_err();
        assert!(e.to_string().starts_with("overcommit.cpu:"), "{e}");
    }

    #[test]
    fn no_listener_takes_a_secret_in_clear_from_another_machine() {
        let tls = "[tls]\nca = \"/c\"\ncert = \"/c\"\nkey = \"/k\"\n";
        let refused = |text: &str, field: &str| {
            let e = ControllerConfig::from_toml(&format!("data_dir = \"/x\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("{field}: ")), "{e}");
            assert!(
                e.contains("127.0.0.1"),
                "the message says how to fix it: {e}"
            );
        };
        refused("listen = \"0.0.0.0:7000\"\n", "listen");
        // Agents under mutual TLS, but users' tokens still in clear.
        refused(&format!("listen = \"10.0.0.5:7000\"\n{tls}"), "listen");
        refused("agent_listen = \"0.0.0.0:7001\"\n", "agent_listen");
        refused("metrics_listen = \"0.0.0.0:9479\"\n", "metrics_listen");
        let ok = |text: &str| {
            ControllerConfig::from_toml(&format!("data_dir = \"/x\"\n{text}")).unwrap();
        };
        ok(&format!(
            "listen = \"0.0.0.0:7000\"\nagent_listen = \"0.0.0.0:7001\"\n{tls}user_api = true\n"
        ));
        ok(
            "metrics_listen = \"0.0.0.0:9479\"\nmetrics_token_file = \"/etc/betang/metrics.token\"\n",
        );
        ok("listen = \"[::1]:7000\"\n");
    }
}
