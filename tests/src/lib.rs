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
    config::{AgentConfig, CapacityConfig, DomainTypeSetting, HypervisorSetting, NetworkConfig},
    hypervisor::{Hypervisor, LibvirtHypervisor, SimulatedHypervisor},
    server::RunningAgent,
};
use betang_controller::{
    config::{ControllerConfig, TlsConfig},
    pki::{CONTROLLER_NAME, PkiDir},
    server::RunningController,
};
use betang_proto::v1::{
    Application, CreateInstitutionRequest, CreateTokenRequest, CreateUserRequest, CreateVpsRequest,
    GetHostRequest, GetVpsRequest, HostState, Quota, Role, Vps, VpsSpec, VpsState, WhoAmIRequest,
    audit_service_client::AuditServiceClient, host_service_client::HostServiceClient,
    identity_service_client::IdentityServiceClient, vps_service_client::VpsServiceClient,
};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

pub mod bench;
pub mod chaos;
pub mod console;
pub mod lan;
pub mod portal;
pub mod prometheus;
pub mod real;

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
    make_image_dir_named(dir, base_virtual_size, "tiny")
}

/// The same, with the image listed under `name`.
pub fn make_image_dir_named(dir: &Path, base_virtual_size: &str, name: &str) -> anyhow::Result<()> {
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
        format!(
            "[[image]]\nname = \"{name}\"\nfile = \"tiny.qcow2\"\nos = \"none\"\ndescription = \"empty test disk\"\n"
        ),
    )?;
    Ok(())
}

pub struct TestHost {
    pub host_id: String,
    pub hv: Arc<dyn Hypervisor>,
    /// The same hypervisor when it is libvirt's test driver, for tests that
    /// look at what only libvirt shows (such as a running domain's id).
    pub libvirt: Option<Arc<LibvirtHypervisor>>,
    /// The same hypervisor when it is the simulated one, for tests that make
    /// a guest misbehave.
    pub simulated: Option<Arc<SimulatedHypervisor>>,
    pub cfg: AgentConfig,
    pub agent: Option<RunningAgent>,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// Every user-facing service, as one caller.
#[derive(Clone)]
pub struct Clients {
    pub vps: VpsServiceClient<Authed>,
    pub hosts: HostServiceClient<Authed>,
    pub identity: IdentityServiceClient<Authed>,
    pub audit: AuditServiceClient<Authed>,
    pub networks: betang_proto::v1::network_service_client::NetworkServiceClient<Authed>,
}

impl Clients {
    pub async fn connect(endpoint: &str, token: Option<&str>) -> anyhow::Result<Clients> {
        let ch = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect()
            .await?;
        let b = Bearer(token.map(|t| format!("Bearer {t}").parse()).transpose()?);
        Ok(Clients {
            vps: VpsServiceClient::with_interceptor(ch.clone(), b.clone()),
            hosts: HostServiceClient::with_interceptor(ch.clone(), b.clone()),
            identity: IdentityServiceClient::with_interceptor(ch.clone(), b.clone()),
            audit: AuditServiceClient::with_interceptor(ch.clone(), b.clone()),
            networks:
                betang_proto::v1::network_service_client::NetworkServiceClient::with_interceptor(
                    ch, b,
                ),
        })
    }
}

/// The people of a test: an admin and an operator of the data center, and
/// a member of each of two institutions.
#[derive(Debug, Clone)]
pub struct People {
    pub admin: String,
    pub operator: String,
    pub member_a: String,
    pub member_b: String,
    pub inst_a: String,
    pub inst_b: String,
}

/// Creates institutions A and B (with `quota`) and their people, through the API.
pub async fn make_people(
    endpoint: &str,
    admin_token: &str,
    prefix: &str,
    quota: Quota,
) -> anyhow::Result<People> {
    let mut admin = Clients::connect(endpoint, Some(admin_token)).await?;
    let me = admin
        .identity
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner();
    let inst = |code: String| {
        let mut c = admin.identity.clone();
        async move {
            anyhow::Ok(
                c.create_institution(CreateInstitutionRequest {
                    code,
                    name: "Dinas uji".into(),
                    quota: Some(quota),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .id,
            )
        }
    };
    let inst_a = inst(format!("{prefix}-a")).await?;
    let inst_b = inst(format!("{prefix}-b")).await?;
    let user = |name: String, institution_id: String, role: Role| {
        let mut c = admin.identity.clone();
        async move {
            let u = c
                .create_user(CreateUserRequest {
                    username: name,
                    institution_id,
                    role: role as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let t = c
                .create_token(CreateTokenRequest {
                    user_id: u.id,
                    name: "test".into(),
                    ttl_seconds: 0,
                })
                .await?
                .into_inner();
            anyhow::Ok(t.secret)
        }
    };
    let operator = user(
        format!("{prefix}-op"),
        me.institution_id.clone(),
        Role::Operator,
    )
    .await?;
    let member_a = user(format!("{prefix}-ma"), inst_a.clone(), Role::Member).await?;
    let member_b = user(format!("{prefix}-mb"), inst_b.clone(), Role::Member).await?;
    let _ = &mut admin;
    Ok(People {
        admin: admin_token.to_owned(),
        operator,
        member_a,
        member_b,
        inst_a,
        inst_b,
    })
}

/// A fresh PKI for one test: the CA, the controller's certificate and one per host.
pub fn make_pki(dir: &Path, hosts: &[String]) -> anyhow::Result<PkiDir> {
    let pki = PkiDir(dir.to_path_buf());
    pki.init()?;
    pki.issue(CONTROLLER_NAME, &["127.0.0.1".into()])?;
    for h in hosts {
        pki.issue(h, &["127.0.0.1".into()])?;
    }
    Ok(pki)
}

/// A channel presenting `as_name`'s certificate and expecting `server_name`'s.
pub async fn mtls_channel(
    endpoint: &str,
    pki: &PkiDir,
    as_name: &str,
    server_name: &str,
) -> anyhow::Result<Channel> {
    let files = pki.files(as_name);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
            pki.ca_cert(),
        )?))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&files.cert)?,
            std::fs::read(&files.key)?,
        ))
        .domain_name(server_name);
    Ok(
        tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .tls_config(tls)?
            .connect()
            .await?,
    )
}

pub fn agent_tls(pki: &PkiDir, host_id: &str) -> betang_agent::tls::TlsConfig {
    let f = pki.files(host_id);
    betang_agent::tls::TlsConfig {
        ca: pki.ca_cert(),
        cert: f.cert,
        key: f.key,
    }
}

pub fn controller_tls(pki: &PkiDir) -> TlsConfig {
    let f = pki.files(CONTROLLER_NAME);
    TlsConfig {
        ca: pki.ca_cert(),
        cert: f.cert,
        key: f.key,
        user_api: false,
    }
}

/// A controller and test-driver agents in this process, under mutual TLS,
/// with an admin, an operator and members of two institutions.
pub struct Cluster {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub controller: Option<RunningController>,
    pub controller_cfg: ControllerConfig,
    pub endpoint: String,
    pub agent_endpoint: String,
    pub hosts: Vec<TestHost>,
    pub people: People,
    pub pki: PkiDir,
}

pub struct ClusterOptions {
    pub hosts: Vec<CapacityConfig>,
    pub heartbeat_ms: u64,
    pub down_after_ms: u64,
    pub quota: Quota,
    /// Agents on the simulated hypervisor instead of libvirt's test driver.
    pub simulated: bool,
    /// The name the hosts' one image is listed under.
    pub image: &'static str,
    /// Request budgets and server bounds; without them no token is
    /// rate-limited (tests make hundreds of calls a second with one token).
    pub limits: Option<betang_controller::limits::LimitsConfig>,
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
            quota: Quota {
                vcpus: 1000,
                memory_mib: 1 << 30,
                disk_gib: 1 << 20,
                vps_count: 10_000,
            },
            simulated: false,
            image: "tiny",
            limits: None,
        }
    }
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        init_tracing();
        let prefix = test_prefix();
        let dir = tempfile::tempdir()?;
        let host_ids: Vec<String> = (0..opts.hosts.len())
            .map(|i| format!("{prefix}-h{i}"))
            .collect();
        let pki = make_pki(&dir.path().join("pki"), &host_ids)?;
        let mut controller_cfg = ControllerConfig::with_data_dir(dir.path().join("controller"));
        controller_cfg.host_down_after_ms = opts.down_after_ms;
        controller_cfg.heartbeat_interval_ms = opts.heartbeat_ms as u32;
        controller_cfg.reconcile_interval_ms = 200;
        controller_cfg.usage_interval_ms = 0;
        // Some tests queue hundreds of requests from one institution.
        controller_cfg.max_pending_requests = 1000;
        controller_cfg.limits = opts
            .limits
            .unwrap_or(betang_controller::limits::LimitsConfig {
                requests_per_second: 0,
                ..Default::default()
            });
        controller_cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
        controller_cfg.portal_listen = Some("127.0.0.1:0".parse()?);
        controller_cfg.tls = Some(controller_tls(&pki));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let controller =
            betang_controller::server::start(controller_cfg.clone(), listener, agent_listener)
                .await?;
        let endpoint = format!("http://{}", controller.addr);
        let agent_endpoint = format!("https://{}", controller.agent_addr);
        let now = betang_controller::now_ms();
        let (_, admin_token) = controller.store.run_sync(|c| {
            betang_controller::store::identity::bootstrap_admin(
                c,
                "dc",
                "Data center",
                "admin",
                now,
            )
        })?;
        let people = make_people(&endpoint, &admin_token, &prefix, opts.quota).await?;
        let image_dir = dir.path().join("images");
        make_image_dir_named(&image_dir, "64M", opts.image)?;
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            controller: Some(controller),
            controller_cfg,
            endpoint: endpoint.clone(),
            agent_endpoint: agent_endpoint.clone(),
            hosts: Vec::new(),
            people,
            pki,
            dir,
        };
        for (i, cap) in opts.hosts.iter().enumerate() {
            let host_id = host_ids[i].clone();
            let node = cluster.dir.path().join(format!("node-{i}.xml"));
            std::fs::write(
                &node,
                "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>8</active><nodes>1</nodes>\
                 <sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>\
                 <memory>16777216</memory></node>",
            )?;
            let uri = format!("test://{}", node.display());
            let cfg = AgentConfig {
                metrics_listen: Some("127.0.0.1:0".parse()?),
                metrics_token_file: None,
                stats_interval_ms: opts.heartbeat_ms,
                guest_unresponsive_after_ms: 5000,
                libvirt_unresponsive_after_ms: 5000,
                host_id: host_id.clone(),
                listen: "127.0.0.1:0".parse()?,
                advertise_endpoint: None,
                controller_endpoint: agent_endpoint.clone(),
                libvirt_uri: uri.clone(),
                hypervisor: if opts.simulated {
                    HypervisorSetting::Simulated
                } else {
                    HypervisorSetting::Libvirt
                },
                simulated_persist: false,
                domain_type: DomainTypeSetting::Qemu,
                image_dir: image_dir.clone(),
                vm_dir: cluster.dir.path().join(format!("vms-{i}")),
                heartbeat_interval_ms: opts.heartbeat_ms,
                reconcile_interval_seconds: 1,
                libvirt_call_timeout_seconds: 10,
                capacity: Some(*cap),
                network: NetworkConfig::None,
                tls: Some(agent_tls(&cluster.pki, &host_id)),
                zone: if i % 2 == 0 { "a".into() } else { "b".into() },
                labels: [("rack".to_string(), format!("r{i}"))].into(),
            };
            let (hv, libvirt, simulated): (Arc<dyn Hypervisor>, _, _) = if opts.simulated {
                let s = Arc::new(betang_agent::server::simulated_for(&cfg)?);
                (s.clone(), None, Some(s))
            } else {
                let l = Arc::new(LibvirtHypervisor::new(&uri)?);
                (l.clone(), Some(l), None)
            };
            cluster.hosts.push(TestHost {
                host_id,
                hv,
                libvirt,
                simulated,
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
        let hosts = self.as_operator().await?.hosts;
        eventually(
            Duration::from_secs(60),
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
        let hv = h.hv.clone();
        h.agent = Some(betang_agent::server::start_with(h.cfg.clone(), listener, hv).await?);
        Ok(())
    }

    pub fn stop_agent(&mut self, i: usize) {
        self.hosts[i].agent = None;
    }

    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        let c = self.controller.as_ref().context("no controller")?;
        let (addr, agent_addr) = (c.addr, c.agent_addr);
        self.controller = None;
        // The old server tasks are aborted; wait for the ports to be free again.
        let bind = |a: std::net::SocketAddr| {
            eventually(
                Duration::from_secs(10),
                "controller port free",
                move || async move { tokio::net::TcpListener::bind(a).await.ok() },
            )
        };
        let listener = bind(addr).await?;
        let agent_listener = bind(agent_addr).await?;
        self.controller = Some(
            betang_controller::server::start(self.controller_cfg.clone(), listener, agent_listener)
                .await?,
        );
        Ok(())
    }

    pub async fn clients(&self, token: &str) -> anyhow::Result<Clients> {
        Clients::connect(&self.endpoint, Some(token)).await
    }

    pub async fn as_operator(&self) -> anyhow::Result<Clients> {
        self.clients(&self.people.operator).await
    }

    /// The operator's VPS client; most tests act as the data center.
    pub async fn vps_client(&self) -> anyhow::Result<VpsServiceClient<Authed>> {
        Ok(self.as_operator().await?.vps)
    }

    pub async fn host_client(&self) -> anyhow::Result<HostServiceClient<Authed>> {
        Ok(self.as_operator().await?.hosts)
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
            network: String::new(),
        }
    }

    /// An operator's request creating `spec` directly for institution A.
    pub fn create(&self, spec: VpsSpec) -> CreateVpsRequest {
        CreateVpsRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            spec: Some(spec),
            application: Some(application()),
            institution_id: self.people.inst_a.clone(),
            host_id: String::new(),
            placement: None,
            ip_address: String::new(),
        }
    }
}

pub fn application() -> Application {
    Application {
        name: "Sistem informasi uji".into(),
        kind: "website".into(),
        purpose: "testing Betang".into(),
        domain: "uji.example.go.id".into(),
        responsible_name: "Budi".into(),
        responsible_nip: "198501012010011001".into(),
        responsible_email: "budi@example.go.id".into(),
        responsible_phone: "+62 811 0000".into(),
    }
}

/// The VPS as `GetVps` shows it now, without history; `None` on any error.
pub async fn fetch(c: &mut VpsServiceClient<Authed>, id: String) -> Option<Vps> {
    c.get_vps(GetVpsRequest {
        id,
        ..Default::default()
    })
    .await
    .ok()
    .map(tonic::Response::into_inner)
}

pub fn state_of(v: &Vps) -> VpsState {
    VpsState::try_from(v.state).unwrap_or(VpsState::Unspecified)
}

/// Polls GetVps until the VPS is in `want`.
pub async fn wait_state(
    c: &VpsServiceClient<Authed>,
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
            let v = fetch(&mut c, id).await?;
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

/// Polls GetVps until the VPS is in `want` on `host` (a move has ended there).
pub async fn wait_on_host(
    c: &VpsServiceClient<Authed>,
    id: &str,
    want: VpsState,
    host: &str,
    timeout: Duration,
) -> anyhow::Result<Vps> {
    eventually(
        timeout,
        &format!("VPS {id} to be {want:?} on {host}"),
        || {
            let mut c = c.clone();
            let id = id.to_owned();
            async move {
                let v = fetch(&mut c, id).await?;
                (state_of(&v) == want && v.host_id == host).then_some(v)
            }
        },
    )
    .await
}

/// What a host's `vm_dir` holds for VPS: every entry but the agent's own
/// hidden files (its image digest cache, a simulated host's domains).
pub fn vm_dir_entries(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The workspace root, for scripts in deploy/.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// `GET path` over plain HTTP/1.0 on loopback; the body, or an error naming
/// the status when it is not 200.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    http_get_with(addr, path, None).await
}

/// `GET path`, with `Authorization: Bearer <token>` when a token is given;
/// the body of a 200, or an error naming the status.
pub async fn http_get_with(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP response without a header end")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// `promtool check metrics` on an exposition; its complaints, if any.
pub fn promtool_check_metrics(exposition: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus) is needed: run deploy/test.sh")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The value of the sample `name{…}` whose labels include every `label="value"` given.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}
