//! A controller and one agent in-process on the real libvirtd
//! (qemu:///system), with the offline-built test image in the catalogue,
//! mutual TLS between them and real tokens for people. Everything made
//! carries the test's prefix and is removed when it is dropped, even when
//! the test fails half-way.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use betang_agent::{
    config::{AgentConfig, DomainTypeSetting, HypervisorSetting, NetworkConfig},
    server::RunningAgent,
};
use betang_controller::server::RunningController;
use betang_proto::v1::{CreateVpsRequest, ListHostsRequest, Quota, VpsSpec};
use virt::{connect::Connect, domain::Domain};

use crate::{
    Clients, People, agent_tls, controller_tls, eventually, init_tracing, make_people, make_pki,
    test_prefix, workspace_root,
};

pub const URI: &str = "qemu:///system";
pub const IMAGE_NAME: &str = "betang-test";

/// Removes every domain the test created (by the VPS name prefix in the
/// domain metadata) and its directories.
pub struct Cleanup {
    prefix: String,
    pub dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(conn) = Connect::open(Some(URI)) {
            for d in conn.list_all_domains(0).unwrap_or_default() {
                let ours = d
                    .xml_desc(0)
                    .map(|x| x.contains(&format!("name=\"{}-", self.prefix)))
                    .unwrap_or(false);
                if ours {
                    let _ = d.destroy();
                    let _ = d.undefine();
                }
            }
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn build_test_image() -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new("bash")
        .arg(workspace_root().join("deploy/build-test-image.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running deploy/build-test-image.sh")?;
    anyhow::ensure!(out.status.success(), "deploy/build-test-image.sh failed");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

pub struct RealHost {
    pub prefix: String,
    pub conn: Connect,
    pub host_id: String,
    pub image_dir: PathBuf,
    pub vm_dir: PathBuf,
    pub endpoint: String,
    pub people: People,
    pub controller: RunningController,
    pub agent: Option<RunningAgent>,
    pub agent_cfg: AgentConfig,
    /// Holds the PKI and the store; dropped (removed) after the cleanup.
    pub dir: tempfile::TempDir,
    // Last, so it runs after the agent and controller are gone.
    pub cleanup: Cleanup,
}

impl RealHost {
    /// Fails, never skips, when libvirtd is not running.
    pub async fn start(quota: Quota) -> anyhow::Result<RealHost> {
        init_tracing();
        let conn = Connect::open(Some(URI)).with_context(|| {
            format!(
                "libvirtd must be running for this test ({URI}); run deploy/test.sh, which starts it"
            )
        })?;
        let image = build_test_image()?;
        let prefix = test_prefix();
        // Under /var/lib so that QEMU, running as libvirt-qemu, can reach the files.
        let root = PathBuf::from(format!("/var/lib/betang-test/{prefix}"));
        let cleanup = Cleanup {
            prefix: prefix.clone(),
            dirs: vec![root.clone()],
        };
        let image_dir = root.join("images");
        let vm_dir = root.join("vms");
        std::fs::create_dir_all(&image_dir)?;
        std::fs::create_dir_all(&vm_dir)?;
        for d in [
            Path::new("/var/lib/betang-test"),
            &root,
            &image_dir,
            &vm_dir,
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::copy(&image, image_dir.join("betang-test.qcow2"))?;
        write_catalogue(&image_dir, "betang-test.qcow2")?;

        let dir = tempfile::tempdir()?;
        let host_id = format!("{prefix}-host");
        let pki = make_pki(&dir.path().join("pki"), std::slice::from_ref(&host_id))?;
        let mut ccfg =
            betang_controller::config::ControllerConfig::with_data_dir(dir.path().join("data"));
        ccfg.usage_interval_ms = 0;
        ccfg.reconcile_interval_ms = 500;
        ccfg.metrics_listen = Some("127.0.0.1:0".parse()?);
        ccfg.portal_listen = Some("127.0.0.1:0".parse()?);
        ccfg.tls = Some(controller_tls(&pki));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let controller = betang_controller::server::start(ccfg, listener, agent_listener).await?;
        let endpoint = format!("http://{}", controller.addr);
        let now = betang_controller::now_ms();
        let (_, admin) = controller.store.run_sync(|c| {
            betang_controller::store::identity::bootstrap_admin(
                c,
                "dc",
                "Data center",
                "admin",
                now,
            )
        })?;
        let people = make_people(&endpoint, &admin, &prefix, quota).await?;
        let agent_cfg = AgentConfig {
            metrics_listen: Some("127.0.0.1:0".parse()?),
            metrics_token_file: None,
            stats_interval_ms: 1000,
            guest_unresponsive_after_ms: 3_000,
            libvirt_unresponsive_after_ms: 8_000,
            host_id: host_id.clone(),
            listen: "127.0.0.1:0".parse()?,
            advertise_endpoint: None,
            controller_endpoint: format!("https://{}", controller.agent_addr),
            libvirt_uri: URI.into(),
            hypervisor: HypervisorSetting::Libvirt,
            domain_type: DomainTypeSetting::Auto,
            image_dir: image_dir.clone(),
            vm_dir: vm_dir.clone(),
            heartbeat_interval_ms: 1000,
            reconcile_interval_seconds: 5,
            libvirt_call_timeout_seconds: 60,
            capacity: None,
            network: NetworkConfig::None,
            zone: String::new(),
            labels: Default::default(),
            tls: Some(agent_tls(&pki, &host_id)),
            simulated_persist: false,
        };
        let mut host = RealHost {
            prefix,
            conn,
            host_id,
            image_dir,
            vm_dir,
            endpoint,
            people,
            controller,
            agent: None,
            agent_cfg,
            dir,
            cleanup,
        };
        host.start_agent().await?;
        Ok(host)
    }

    /// Starts (or restarts) the agent and waits until it has registered.
    pub async fn start_agent(&mut self) -> anyhow::Result<()> {
        self.agent = None;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        self.agent = Some(betang_agent::server::start(self.agent_cfg.clone(), listener).await?);
        let operator = self.operator().await?;
        let host_id = self.host_id.clone();
        eventually(
            Duration::from_secs(30),
            "host registered over mutual TLS",
            || {
                let mut hosts = operator.hosts.clone();
                let host_id = host_id.clone();
                async move {
                    let l = hosts
                        .list_hosts(ListHostsRequest {})
                        .await
                        .ok()?
                        .into_inner();
                    l.hosts.iter().any(|h| h.id == host_id).then_some(())
                }
            },
        )
        .await
    }

    pub fn agent(&self) -> &RunningAgent {
        self.agent.as_ref().expect("the agent runs")
    }

    pub async fn operator(&self) -> anyhow::Result<Clients> {
        Clients::connect(&self.endpoint, Some(&self.people.operator)).await
    }

    pub async fn member(&self) -> anyhow::Result<Clients> {
        Clients::connect(&self.endpoint, Some(&self.people.member_a)).await
    }

    pub fn domain(&self, id: &str) -> Option<Domain> {
        self.conn
            .lookup_domain_by_name(&format!("betang-{id}"))
            .ok()
    }

    /// An operator's request for a small VPS of the test image, named with
    /// the test's prefix, for institution A.
    pub fn small_vps(&self, name: &str) -> CreateVpsRequest {
        CreateVpsRequest {
            request_id: format!("{}-{name}", self.prefix),
            spec: Some(VpsSpec {
                name: format!("{}-{name}", self.prefix),
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
                image: IMAGE_NAME.into(),
                ..Default::default()
            }),
            application: Some(crate::application()),
            institution_id: self.people.inst_a.clone(),
            ..Default::default()
        }
    }

    /// Waits until the guest's serial console log holds `what`.
    pub async fn serial_says(&self, id: &str, what: &str, within: Duration) -> anyhow::Result<()> {
        let log = self.agent().vms.serial_log(id)?;
        eventually(within, what, || {
            let log = log.clone();
            async move {
                let text = std::fs::read(&log).unwrap_or_default();
                String::from_utf8_lossy(&text).contains(what).then_some(())
            }
        })
        .await
    }

    pub fn root_disk(&self, id: &str) -> PathBuf {
        self.vm_dir.join(id).join("root.qcow2")
    }
}

/// Points the catalogue's `betang-test` entry at `file` in `dir`.
pub fn write_catalogue(dir: &Path, file: &str) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("catalog.toml"),
        format!(
            "[[image]]\nname = \"{IMAGE_NAME}\"\nfile = \"{file}\"\nos = \"busybox\"\n\
             min_memory_mib = 128\n"
        ),
    )?;
    Ok(())
}

/// `qemu-io -f qcow2 -c CMD DISK` (a write or a read of a pattern).
pub fn qemu_io(disk: &Path, cmd: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(disk)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
