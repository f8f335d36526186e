//! The test harness: a controller and agents started in-process on port 0,
//! agents on libvirt's test driver (one private `test:///…/node.xml` state
//! each) or on the real libvirtd, and helpers that poll for conditions.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Once},
    time::Duration,
};

use anyhow::{Context, bail};
use betang_agent::{
    config::{AgentConfig, CapacityConfig, DomainTypeSetting, NetworkConfig},
    hypervisor::{Hypervisor, LibvirtHypervisor},
    server::RunningAgent,
};
use betang_controller::{config::ControllerConfig, server::RunningController};
use betang_proto::v1::{
    GetHostRequest, GetVpsRequest, HostState, Vps, VpsSpec, VpsState,
    host_service_client::HostServiceClient, vps_service_client::VpsServiceClient,
};
use tonic::transport::Channel;

pub const IMAGE: &str = "tiny";

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A short unique prefix for everything one test creates.
pub fn test_prefix() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}", &u[..8])
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a catalogue holding one small qcow2 image named `tiny`.
pub fn make_image_dir(dir: &Path, base_virtual_size: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("tiny.qcow2"))
        .arg(base_virtual_size)
        .status()
        .context("running qemu-img")?;
    anyhow::ensure!(st.success(), "qemu-img create failed");
    std::fs::write(
        dir.join("catalog.toml"),
        "[[image]]\nname = \"tiny\"\nfile = \"tiny.qcow2\"\nos = \"none\"\ndescription = \"empty test disk\"\n",
    )?;
    Ok(())
}

pub struct TestHost {
    pub host_id: String,
    pub hv: Arc<LibvirtHypervisor>,
    pub cfg: AgentConfig,
    pub agent: Option<RunningAgent>,
}

/// A controller and test-driver agents in this process.
pub struct Cluster {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub controller: Option<RunningController>,
    pub controller_cfg: ControllerConfig,
    pub endpoint: String,
    pub hosts: Vec<TestHost>,
}

pub struct ClusterOptions {
    pub hosts: Vec<CapacityConfig>,
    pub heartbeat_ms: u64,
    pub down_after_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            hosts: vec![
                CapacityConfig {
                    vcpus: 8,
                    memory_mib: 16384,
                    disk_gib: 500,
                };
                2
            ],
            heartbeat_ms: 200,
            down_after_ms: 2_000,
        }
    }
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        init_tracing();
        let prefix = test_prefix();
        let dir = tempfile::tempdir()?;
        let mut controller_cfg = ControllerConfig::with_data_dir(dir.path().join("controller"));
        controller_cfg.host_down_after_ms = opts.down_after_ms;
        controller_cfg.heartbeat_interval_ms = opts.heartbeat_ms as u32;
        controller_cfg.reconcile_interval_ms = 200;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let controller = betang_controller::server::start(controller_cfg.clone(), listener).await?;
        let endpoint = format!("http://{}", controller.addr);
        let image_dir = dir.path().join("images");
        make_image_dir(&image_dir, "64M")?;
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            controller: Some(controller),
            controller_cfg,
            endpoint: endpoint.clone(),
            hosts: Vec::new(),
            dir,
        };
        for (i, cap) in opts.hosts.iter().enumerate() {
            let host_id = format!("{prefix}-h{i}");
            let node = cluster.dir.path().join(format!("node-{i}.xml"));
            std::fs::write(
                &node,
                "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>8</active><nodes>1</nodes>\
                 <sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>\
                 <memory>16777216</memory></node>",
            )?;
            let uri = format!("test://{}", node.display());
            let cfg = AgentConfig {
                host_id: host_id.clone(),
                listen: "127.0.0.1:0".parse()?,
                advertise_endpoint: None,
                controller_endpoint: endpoint.clone(),
                libvirt_uri: uri.clone(),
                domain_type: DomainTypeSetting::Qemu,
                image_dir: image_dir.clone(),
                vm_dir: cluster.dir.path().join(format!("vms-{i}")),
                heartbeat_interval_ms: opts.heartbeat_ms,
                reconcile_interval_seconds: 1,
                libvirt_call_timeout_seconds: 10,
                capacity: Some(*cap),
                network: NetworkConfig::None,
            };
            let hv = Arc::new(LibvirtHypervisor::new(&uri)?);
            cluster.hosts.push(TestHost {
                host_id,
                hv,
                cfg,
                agent: None,
            });
            cluster.start_agent(i).await?;
        }
        let ids: Vec<String> = cluster.hosts.iter().map(|h| h.host_id.clone()).collect();
        for id in ids {
            cluster.wait_host_state(&id, HostState::Up).await?;
        }
        Ok(cluster)
    }

    /// Polls GetHost until the host is in `want`.
    pub async fn wait_host_state(&self, host_id: &str, want: HostState) -> anyhow::Result<()> {
        let hosts = self.host_client().await?;
        eventually(
            Duration::from_secs(20),
            &format!("host {host_id} {want:?}"),
            || {
                let mut hosts = hosts.clone();
                let id = host_id.to_owned();
                async move {
                    let h = hosts
                        .get_host(GetHostRequest { id })
                        .await
                        .ok()?
                        .into_inner();
                    (h.state == want as i32).then_some(())
                }
            },
        )
        .await
    }

    pub async fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let h = &mut self.hosts[i];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hv: Arc<dyn Hypervisor> = h.hv.clone();
        h.agent = Some(betang_agent::server::start_with(h.cfg.clone(), listener, hv).await?);
        Ok(())
    }

    pub fn stop_agent(&mut self, i: usize) {
        self.hosts[i].agent = None;
    }

    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        let addr = self
            .controller
            .as_ref()
            .map(|c| c.addr)
            .context("no controller")?;
        self.controller = None;
        // The old server task is aborted; wait for the port to be free again.
        let listener = eventually(Duration::from_secs(10), "controller port free", || async {
            tokio::net::TcpListener::bind(addr).await.ok()
        })
        .await?;
        self.controller =
            Some(betang_controller::server::start(self.controller_cfg.clone(), listener).await?);
        Ok(())
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(
            tonic::transport::Endpoint::from_shared(self.endpoint.clone())?
                .connect()
                .await?,
        )
    }

    pub async fn vps_client(&self) -> anyhow::Result<VpsServiceClient<Channel>> {
        Ok(VpsServiceClient::new(self.channel().await?))
    }

    pub async fn host_client(&self) -> anyhow::Result<HostServiceClient<Channel>> {
        Ok(HostServiceClient::new(self.channel().await?))
    }

    /// Names of the domains a host's libvirt holds.
    pub fn domains(&self, i: usize) -> Vec<String> {
        self.hosts[i]
            .hv
            .list_owned()
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect()
    }

    pub fn spec(&self, name: &str) -> VpsSpec {
        VpsSpec {
            name: format!("{}-{name}", self.prefix),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 5,
            image: IMAGE.into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyOnly test@betang".into(),
            user_data: String::new(),
        }
    }
}

pub fn state_of(v: &Vps) -> VpsState {
    VpsState::try_from(v.state).unwrap_or(VpsState::Unspecified)
}

/// Polls GetVps until the VPS is in `want`.
pub async fn wait_state(
    c: &VpsServiceClient<Channel>,
    id: &str,
    want: VpsState,
    timeout: Duration,
) -> anyhow::Result<Vps> {
    let last = Arc::new(std::sync::Mutex::new(None::<Vps>));
    let r = eventually(timeout, &format!("VPS {id} to be {want:?}"), || {
        let mut c = c.clone();
        let id = id.to_owned();
        let last = last.clone();
        async move {
            let v = c.get_vps(GetVpsRequest { id }).await.ok()?.into_inner();
            *last.lock().unwrap() = Some(v.clone());
            (state_of(&v) == want).then_some(v)
        }
    })
    .await;
    r.map_err(|e| {
        let last = last.lock().unwrap().clone();
        e.context(format!(
            "last seen: {:?}",
            last.map(|v| (state_of(&v), v.state_reason))
        ))
    })
}

/// The workspace root, for scripts in deploy/.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}
