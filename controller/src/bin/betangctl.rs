//! betangctl: the command line for Betang's gRPC API.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use betang_proto::v1::{
    Application, ApproveVpsRequest, CancelVpsRequest, CreateInstitutionRequest, CreateTokenRequest,
    CreateUserRequest, CreateVpsRequest, DeleteVpsRequest, GetHostRequest, GetInstitutionRequest,
    GetVpsRequest, Host, Institution, ListAuditRequest, ListHostsRequest, ListImagesRequest,
    ListInstitutionsRequest, ListTokensRequest, ListUsersRequest, ListVpsRequest, Quota,
    QuotaChange, RebootVpsRequest, RejectVpsRequest, RevokeTokenRequest, Role, SetEnabledRequest,
    SetQuotaRequest, StartVpsRequest, StopVpsRequest, User, Vps, VpsSpec, VpsState, WhoAmIRequest,
    audit_service_client::AuditServiceClient, host_service_client::HostServiceClient,
    identity_service_client::IdentityServiceClient, network_service_client::NetworkServiceClient,
    vps_service_client::VpsServiceClient,
};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

#[derive(Parser)]
#[command(
    name = "betangctl",
    version,
    about = "Manage Betang virtual private servers"
)]
struct Cli {
    /// The controller's gRPC endpoint [default: from the config file, else http://127.0.0.1:7000].
    #[arg(long, global = true, env = "BETANG_ENDPOINT")]
    endpoint: Option<String>,
    /// API token [default: from the config file].
    #[arg(long, global = true, env = "BETANG_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate for an https:// endpoint [default: from the config file].
    #[arg(long, global = true, env = "BETANG_CA")]
    ca: Option<PathBuf>,
    /// Config file holding endpoint, token and CA.
    #[arg(long, global = true, env = "BETANG_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Virtual private servers and requests for them.
    #[command(subcommand)]
    Vps(Box<VpsCmd>),
    /// Hosts (operators).
    #[command(subcommand)]
    Host(HostCmd),
    /// The image catalogue.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Institutions and their quotas.
    #[command(subcommand)]
    Institution(InstitutionCmd),
    /// Users (admins).
    #[command(subcommand)]
    User(UserCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Who the token belongs to.
    Whoami,
    /// The audit trail (operators).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Networks and the addresses VPS get on them (operators manage them;
    /// members see those granted to their institution).
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Reports for billing and planning.
    #[command(subcommand)]
    Report(ReportCmd),
    /// The installation's certificates for mutual TLS (no controller needed).
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Save endpoint, token and CA in the config file.
    Login {
        #[arg(long)]
        endpoint: Option<String>,
        /// Read the token from standard input instead of the command line.
        #[arg(long)]
        token_stdin: bool,
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct AppArgs {
    /// Name of the application the VPS hosts.
    #[arg(long)]
    app_name: String,
    /// Kind of application: website, e-service, database, ...
    #[arg(long, default_value = "")]
    app_kind: String,
    #[arg(long, default_value = "")]
    app_purpose: String,
    /// Its domain or subdomain.
    #[arg(long, default_value = "")]
    app_domain: String,
    /// The person responsible for it.
    #[arg(long)]
    responsible_name: String,
    #[arg(long, default_value = "")]
    responsible_nip: String,
    #[arg(long, default_value = "")]
    responsible_email: String,
    #[arg(long, default_value = "")]
    responsible_phone: String,
}

// Parsed once per run; the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum VpsCmd {
    /// Request a new VPS (members), or create one for an institution (operators).
    Create {
        /// Server name; it becomes the hostname (a-z, 0-9, '-').
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        #[arg(long, default_value_t = 10)]
        disk_gib: u64,
        #[arg(long)]
        image: String,
        /// SSH public key file, e.g. ~/.ssh/id_ed25519.pub.
        #[arg(long)]
        ssh_key_file: Option<PathBuf>,
        /// cloud-init user-data file.
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        #[command(flatten)]
        app: Box<AppArgs>,
        /// Operators: the institution the VPS is for.
        #[arg(long, default_value = "")]
        institution: String,
        /// Operators: place on this host.
        #[arg(long, default_value = "")]
        host: String,
        /// Only on hosts in this zone.
        #[arg(long, default_value = "")]
        zone: String,
        /// Only on hosts carrying this label (NAME=VALUE); may be repeated.
        #[arg(long = "host-label")]
        host_labels: Vec<String>,
        /// VPS of one group land on different hosts.
        #[arg(long, default_value = "")]
        anti_affinity_group: String,
        /// The network it goes on (granted to its institution); without it,
        /// the institution's default network.
        #[arg(long, default_value = "")]
        network: String,
        /// Operators: this free address on its network.
        #[arg(long, default_value = "")]
        ip: String,
        /// Makes retries safe: the same id never creates a second VPS.
        #[arg(long)]
        request_id: Option<String>,
        /// Wait until the VPS is RUNNING (or fails).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        wait_seconds: u64,
    },
    /// List VPS.
    List {
        /// Include deleted, rejected and cancelled VPS.
        #[arg(long)]
        all: bool,
        /// Only requests waiting for approval.
        #[arg(long)]
        pending: bool,
        /// Operators: only this institution's.
        #[arg(long, default_value = "")]
        institution: String,
        /// Operators: only those on this host.
        #[arg(long, default_value = "")]
        host: String,
    },
    /// Show one VPS with its usage and its recent use.
    Get {
        id: String,
        /// Minutes of history to show: 1-minute points up to a day, hourly
        /// beyond (up to 129600, 90 days); 0 for none.
        #[arg(long, default_value_t = 60)]
        history: u32,
    },
    /// Start a stopped VPS.
    Start {
        id: String,
        /// Wait until it is RUNNING (or fails).
        #[arg(long)]
        wait: bool,
    },
    /// Stop gracefully (ACPI), forcing off after the timeout.
    Stop {
        id: String,
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u32,
        /// Power off at once.
        #[arg(long)]
        force: bool,
        /// Wait until it is STOPPED.
        #[arg(long)]
        wait: bool,
    },
    /// Restart a running VPS: the guest is asked to reboot.
    Reboot {
        id: String,
        /// Hard reset instead of asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Delete a VPS: its VM, its disk and its seed are removed for good.
    /// (A request still waiting for approval is withdrawn with `cancel`.)
    Delete {
        id: String,
        /// Wait until it is DELETED.
        #[arg(long)]
        wait: bool,
    },
    /// Operators: approve a request, optionally resized or on a chosen host.
    Approve {
        id: String,
        #[arg(long, default_value_t = 0)]
        vcpus: u32,
        #[arg(long, default_value_t = 0)]
        memory_mib: u64,
        #[arg(long, default_value_t = 0)]
        disk_gib: u64,
        #[arg(long, default_value = "")]
        host: String,
        /// This free address on its network.
        #[arg(long, default_value = "")]
        ip: String,
    },
    /// The VPS's serial console, like `virsh console`: Ctrl-] leaves.
    Console {
        id: String,
        /// Watch without typing.
        #[arg(long)]
        read_only: bool,
        /// Type although someone else is (they then watch).
        #[arg(long)]
        take_over: bool,
    },
    /// Operators: reject a request; the member sees the reason.
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Withdraw a request still waiting for approval.
    Cancel { id: String },
    /// Operators: give a stopped VPS another size (disks only grow).
    Resize {
        id: String,
        #[arg(long, default_value_t = 0)]
        vcpus: u32,
        #[arg(long, default_value_t = 0)]
        memory_mib: u64,
        #[arg(long, default_value_t = 0)]
        disk_gib: u64,
    },
    /// Operators: move a stopped VPS to another host the scheduler picks.
    /// The move runs in the background; the VPS is MIGRATING meanwhile.
    Move {
        id: String,
        /// Also move a running VPS: it is stopped, moved and started again.
        #[arg(long)]
        restart: bool,
        /// Wait until the move has ended (and print where the VPS is).
        #[arg(long)]
        wait: bool,
    },
    /// Wait until a VPS reaches a state (RUNNING, STOPPED, DELETED, ...).
    Wait {
        id: String,
        state: String,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    List,
    Get {
        id: String,
    },
    /// Place nothing new on a host (what is there stays).
    Cordon {
        id: String,
    },
    Uncordon {
        id: String,
    },
    /// Cordon a host and list what is on it; move its VPS when asked.
    Drain {
        id: String,
        /// Move its stopped VPS to other hosts.
        #[arg(long)]
        move_stopped: bool,
        /// Also move its running VPS: each is stopped, moved and started again.
        #[arg(long)]
        move_running: bool,
    },
    /// Placement preference: 1 is neutral, higher attracts, 0 avoids.
    Weight {
        id: String,
        weight: f64,
    },
}

#[derive(Subcommand)]
enum ReportCmd {
    /// vCPU-hours, GiB-hours and CPU-hours used per institution over a
    /// period, as CSV on standard output.
    Usage {
        /// Start, inclusive: YYYY-MM-DD (UTC) or Unix milliseconds.
        #[arg(long)]
        from: String,
        /// End, exclusive; at most 366 days after the start.
        #[arg(long)]
        to: String,
        /// Only this institution (members always get their own).
        #[arg(long, default_value = "")]
        institution: String,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Every version of every image: how many hosts offer it and how many
    /// VPS stand on it (a version's file must stay while VPS use it).
    List,
}

#[derive(clap::Args)]
struct QuotaArgs {
    /// vCPUs the institution's VPS may hold in all (0: none).
    #[arg(long)]
    vcpus: u32,
    /// Memory in MiB, in all.
    #[arg(long)]
    memory_mib: u64,
    /// Disk in GiB, in all.
    #[arg(long)]
    disk_gib: u64,
    /// Number of VPS.
    #[arg(long)]
    vps: u32,
}

impl QuotaArgs {
    fn quota(&self) -> Quota {
        Quota {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            vps_count: self.vps,
        }
    }
}

/// The limits to change; those not given keep their value.
#[derive(clap::Args)]
struct QuotaChangeArgs {
    /// vCPUs the institution's VPS may hold in all (0: none).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory in MiB, in all.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk in GiB, in all.
    #[arg(long)]
    disk_gib: Option<u64>,
    /// Number of VPS.
    #[arg(long)]
    vps: Option<u32>,
}

#[derive(Subcommand)]
enum InstitutionCmd {
    Create {
        /// Short code, e.g. dinkes.
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        contact_name: String,
        #[arg(long, default_value = "")]
        contact_email: String,
        #[arg(long, default_value = "")]
        contact_phone: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    List,
    Get {
        id: String,
    },
    /// Admins: stop the tokens of every user of an institution (its VPS
    /// keep running; nothing is deleted).
    Disable {
        /// The institution's id or code.
        id: String,
    },
    /// Admins: let a disabled institution's users in again.
    Enable {
        /// The institution's id or code.
        id: String,
    },
    /// Change an institution's limits (operators); only the limits given
    /// change.
    Quota {
        /// The institution's id or code.
        id: String,
        #[command(flatten)]
        quota: QuotaChangeArgs,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        institution: String,
        /// member, operator or admin.
        #[arg(long, default_value = "member")]
        role: String,
        #[arg(long, default_value = "")]
        full_name: String,
        #[arg(long, default_value = "")]
        email: String,
    },
    List {
        #[arg(long, default_value = "")]
        institution: String,
    },
    /// Admins: stop a user's tokens from working (the user and their records stay).
    Disable {
        /// The user's id or username.
        id: String,
    },
    /// Admins: let a disabled user's tokens work again.
    Enable {
        /// The user's id or username.
        id: String,
    },
    /// Admins: a one-time link (72 hours) with which the user sets their
    /// portal password.
    Invite {
        /// The user's id or username.
        user: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token (for yourself, or as admin for --user); prints the secret once.
    Create {
        #[arg(long, default_value = "")]
        user: String,
        #[arg(long, default_value = "")]
        name: String,
        /// 0: the longest the controller allows (max_token_lifetime_days, one year by default).
        #[arg(long, default_value_t = 0)]
        ttl_seconds: u32,
    },
    List {
        #[arg(long, default_value = "")]
        user: String,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// What was done, by whom, to what, oldest first (operators).
    List {
        /// Only this institution's records (its id or code).
        #[arg(long, default_value = "")]
        institution: String,
        /// Only what this user did (a username or a user id).
        #[arg(long, default_value = "")]
        actor: String,
        /// An action (vps.stop), or a family of them (vps).
        #[arg(long, default_value = "")]
        action: String,
        /// Only records about this VPS, host, user or institution id.
        #[arg(long, default_value = "")]
        target: String,
        /// From this time on: 2026-12-01, 2026-12-01T08:00 (UTC), or a
        /// while ago such as 30m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Up to (not including) this time, written as for --since.
        #[arg(long)]
        until: Option<String>,
        /// From this Unix time in milliseconds (seconds are refused).
        #[arg(long, default_value_t = 0)]
        since_ms: i64,
        /// Up to this Unix time in milliseconds.
        #[arg(long, default_value_t = 0)]
        until_ms: i64,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Define a network: how hosts attach it and its IPv4 addresses.
    Create {
        name: String,
        /// An IPv4 network, e.g. 198.18.0.0/24.
        #[arg(long)]
        cidr: String,
        /// A Linux bridge of this name on each host...
        #[arg(long, conflicts_with = "libvirt_network")]
        bridge: Option<String>,
        /// ...or a libvirt network of this name.
        #[arg(long)]
        libvirt_network: Option<String>,
        #[arg(long, default_value = "")]
        gateway: String,
        /// A name server; may be repeated (at most 3).
        #[arg(long)]
        dns: Vec<String>,
        /// Kept out of allocation: FIRST-LAST or one address; may be repeated.
        #[arg(long)]
        reserve: Vec<String>,
        /// Hosts of this zone attach it; VPS on it are placed there.
        #[arg(long, default_value = "")]
        zone: String,
        #[arg(long, default_value_t = 0)]
        vlan: u32,
    },
    List,
    Get {
        name: String,
    },
    /// Let an institution put its VPS on a network.
    Grant {
        name: String,
        /// By code or id.
        #[arg(long)]
        institution: String,
        /// Its VPS get this network when they name none.
        #[arg(long)]
        default: bool,
    },
    /// Take a network back from an institution (its VPS keep their addresses).
    Revoke {
        name: String,
        #[arg(long)]
        institution: String,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the installation's CA in DIR unless it exists.
    Init {
        #[arg(long, default_value = "/etc/betang/pki")]
        dir: PathBuf,
    },
    /// Issue or renew a certificate for a host id, or for betang-controller.
    Issue {
        name: String,
        #[arg(long, default_value = "/etc/betang/pki")]
        dir: PathBuf,
        /// Extra names or IP addresses the certificate is valid for.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Revoke the certificate now issued to a host id (a retired host, a key
    /// that got out): the controller refuses it from then on, and tells
    /// the agents. `pki issue` gives the host a new one.
    Revoke {
        name: String,
        #[arg(long, default_value = "/etc/betang/pki")]
        dir: PathBuf,
    },
}

/// The config file: where the controller is and how to prove who you are.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CliConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config.clone().unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".config/betang/config.toml")
    })
}

fn load_config(path: &std::path::Path) -> anyhow::Result<CliConfig> {
    match std::fs::read_to_string(path) {
        Ok(t) => toml::from_str(&t).with_context(|| format!("in {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_config(path: &std::path::Path, c: &CliConfig) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(toml::to_string(c)?.as_bytes())?;
    Ok(())
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

struct Clients {
    vps: VpsServiceClient<Authed>,
    hosts: HostServiceClient<Authed>,
    identity: IdentityServiceClient<Authed>,
    audit: AuditServiceClient<Authed>,
    networks: NetworkServiceClient<Authed>,
}

async fn connect(cli: &Cli) -> anyhow::Result<Clients> {
    let file = load_config(&config_path(cli))?;
    let endpoint = cli
        .endpoint
        .clone()
        .or(file.endpoint)
        .unwrap_or_else(|| "http://127.0.0.1:7000".into());
    let token = cli.token.clone().or(file.token);
    let ca = cli.ca.clone().or(file.ca);
    connect_to(endpoint, token, ca).await
}

async fn connect_to(
    endpoint: String,
    token: Option<String>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Clients> {
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .context("endpoint")?
        .connect_timeout(Duration::from_secs(5));
    if endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls)?;
    }
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("cannot reach the controller at {endpoint}"))?;
    let bearer = Bearer(
        token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("the token has characters a header cannot carry")?,
    );
    Ok(Clients {
        vps: VpsServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        hosts: HostServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        identity: IdentityServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        audit: AuditServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        networks: NetworkServiceClient::with_interceptor(channel, bearer),
    })
}

/// `betangctl vps get ID | head` ends quietly when `head` has read enough,
/// as other command-line tools do: Rust ignores SIGPIPE, and printing to the
/// closed pipe would panic.
#[allow(unsafe_code)]
fn quiet_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal, before any
    // other thread exists; nothing else in the process handles SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn ms_to_text(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn role_name(r: i32) -> &'static str {
    match Role::try_from(r).unwrap_or_default() {
        Role::Member => "member",
        Role::Operator => "operator",
        Role::Admin => "admin",
        Role::Unspecified => "-",
    }
}

/// One user, field by field (`user create`, `whoami`).
fn print_user(u: &User) {
    println!("id:          {}", u.id);
    println!("username:    {}", u.username);
    if !u.full_name.is_empty() {
        println!("name:        {}", u.full_name);
    }
    println!("role:        {}", role_name(u.role));
    println!("institution: {}", u.institution_id);
    if u.disabled_at_ms != 0 {
        println!("disabled:    since {}", ms_to_text(u.disabled_at_ms));
    }
}

/// Users as a table (`user list`).
fn print_users(users: &[User]) {
    let row = |id: &str, username: &str, role: &str, inst: &str, name: &str| {
        let line = format!("{id:<36}  {username:<16}  {role:<8}  {inst:<36}  {name}");
        println!("{}", line.trim_end());
    };
    row("ID", "USERNAME", "ROLE", "INSTITUTION", "NAME");
    for u in users {
        row(
            &u.id,
            &u.username,
            role_name(u.role),
            &u.institution_id,
            &u.full_name,
        );
    }
}

fn print_institution(i: &Institution) {
    let q = i.quota.unwrap_or_default();
    let u = i.used.unwrap_or_default();
    println!("id:        {}", i.id);
    println!("code:      {}", i.code);
    println!("name:      {}", i.name);
    if i.disabled_at_ms != 0 {
        println!(
            "disabled:  since {} (its users' tokens do not work)",
            ms_to_text(i.disabled_at_ms)
        );
    }
    if !i.contact_name.is_empty() {
        println!(
            "contact:   {} {} {}",
            i.contact_name, i.contact_email, i.contact_phone
        );
    }
    println!(
        "used:      {}/{} vCPU, {}/{} MiB, {}/{} GiB, {}/{} VPS",
        u.vcpus,
        q.vcpus,
        u.memory_mib,
        q.memory_mib,
        u.disk_gib,
        q.disk_gib,
        u.vps_count,
        q.vps_count
    );
}

fn state_name(v: &Vps) -> &'static str {
    VpsState::try_from(v.state)
        .unwrap_or(VpsState::Unspecified)
        .as_str_name()
        .trim_start_matches("VPS_STATE_")
}

/// The state as a person reads it: with what is under way, if anything.
fn state_shown(v: &Vps) -> String {
    let mut notes: Vec<&str> = Vec::new();
    if !v.power_change.is_empty() {
        notes.push(&v.power_change);
    }
    if v.unresponsive_since_ms != 0 {
        notes.push("not answering");
    }
    match notes.as_slice() {
        [] => state_name(v).to_owned(),
        _ => format!("{} ({})", state_name(v), notes.join(", ")),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The VPS, with its institution as `institution` names it.
fn print_vps_of(v: &Vps, institution: &str) {
    let spec = v.spec.clone().unwrap_or_default();
    println!("id:        {}", v.id);
    println!("name:      {}", spec.name);
    println!("state:     {}", state_shown(v));
    if !v.state_reason.is_empty() {
        println!("reason:    {}", v.state_reason);
    }
    if v.unresponsive_since_ms != 0 {
        let secs = (betang_controller::now_ms() - v.unresponsive_since_ms).max(0) / 1000;
        println!(
            "guest:     not answering since {} ({secs} s): hung or stopped; only `vps stop --force` or a delete act on it",
            ms_to_text(v.unresponsive_since_ms)
        );
    }
    println!(
        "size:      {} vCPU, {} MiB memory, {} GiB disk",
        spec.vcpus, spec.memory_mib, spec.disk_gib
    );
    if v.image_digest.is_empty() {
        println!("image:     {}", spec.image);
    } else {
        println!(
            "image:     {} (sha256 {})",
            spec.image,
            short_digest(&v.image_digest)
        );
    }
    println!(
        "host:      {}{}",
        if v.host_id.is_empty() {
            "-"
        } else {
            &v.host_id
        },
        if v.move_target.is_empty() {
            String::new()
        } else {
            format!(", moving to {}", v.move_target)
        }
    );
    match &v.attachment {
        Some(a) => println!(
            "address:   {}/{} on network {} (MAC {})",
            a.ip_address, a.prefix_len, a.network, a.mac_address
        ),
        None if !spec.network.is_empty() => {
            println!("network:   {} (an address once placed)", spec.network)
        }
        None => {}
    }
    if !institution.is_empty() {
        println!("institution: {institution}");
    }
    if let Some(a) = v.application.as_ref().filter(|a| !a.name.is_empty()) {
        let kind = if a.kind.is_empty() {
            String::new()
        } else {
            format!(" ({})", a.kind)
        };
        println!(
            "application: {}{kind}{}",
            a.name,
            if a.domain.is_empty() {
                String::new()
            } else {
                format!(", {}", a.domain)
            }
        );
        let nip = if a.responsible_nip.is_empty() {
            String::new()
        } else {
            format!(", NIP {}", a.responsible_nip)
        };
        println!("responsible: {}{nip}", a.responsible_name);
    }
    if !v.requested_by.is_empty() {
        println!(
            "requested:   by {} at {}",
            v.requested_by,
            ms_to_text(v.created_at_ms)
        );
    }
    if !v.decided_by.is_empty() {
        println!("decided:     by {}", v.decided_by);
    }
    if let Some(u) = &v.usage {
        println!(
            "cpu:       {:.1}% of one vCPU ({:.1} s in total)",
            u.cpu_rate * 100.0,
            u.cpu_time_ns as f64 / 1e9
        );
        if u.memory_used_bytes > 0 {
            println!(
                "memory:    {} used by the guest of {}",
                mib(u.memory_used_bytes),
                mib(u.memory_max_bytes)
            );
        } else {
            println!(
                "memory:    {} (the guest does not report its own use)",
                mib(u.memory_max_bytes)
            );
        }
        println!("host RSS:  {}", mib(u.memory_rss_bytes));
        println!(
            "disk:      {} read, {} written",
            mib(u.disk_read_bytes),
            mib(u.disk_write_bytes)
        );
        println!(
            "network:   {} received, {} sent",
            mib(u.net_rx_bytes),
            mib(u.net_tx_bytes)
        );
    }
}

fn print_history(points: &[betang_proto::v1::UsagePoint]) {
    if points.is_empty() {
        return;
    }
    let kib = |b: f64| b / 1024.0;
    println!();
    println!(
        "{:<17}  {:>7}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
        "UTC", "CPU %", "MEM MiB", "READ KiB/s", "WRITE KiB/s", "RX KiB/s", "TX KiB/s"
    );
    for p in points {
        println!(
            "{:<17}  {:>7.1}  {:>10}  {:>10.1}  {:>11.1}  {:>10.1}  {:>10.1}",
            betang_controller::report::utc(p.at_ms),
            p.cpu_rate * 100.0,
            p.memory_used_bytes.max(p.memory_rss_bytes) >> 20,
            kib(p.disk_read_bytes_per_second),
            kib(p.disk_write_bytes_per_second),
            kib(p.net_rx_bytes_per_second),
            kib(p.net_tx_bytes_per_second)
        );
    }
}

/// One of --since/--since-ms (or --until/--until-ms), as Unix ms (0: none).
fn audit_time(field: &str, text: Option<&str>, ms: i64) -> anyhow::Result<i64> {
    match (text, ms) {
        (Some(_), ms) if ms != 0 => bail!("--{field} and --{field}-ms: give one of them"),
        (Some(t), _) => parse_when_or_ago(field, t),
        // Before 2001 in milliseconds is what seconds since 1970 look like.
        (None, ms) if ms > 0 && ms < 1_000_000_000_000 => bail!(
            "--{field}-ms: {ms} looks like seconds; give milliseconds, or use --{field} \
             (e.g. --{field} 2026-12-01 or --{field} 2h)"
        ),
        (None, ms) if ms < 0 => bail!("--{field}-ms: must not be negative"),
        (None, ms) => Ok(ms),
    }
}

/// A time as people write it: a date or date and time (UTC), Unix
/// milliseconds, or a while ago (`30m`, `2h`, `7d`).
fn parse_when_or_ago(field: &str, v: &str) -> anyhow::Result<i64> {
    let ago = v
        .strip_suffix('m')
        .map(|n| (n, 60_000))
        .or_else(|| v.strip_suffix('h').map(|n| (n, 3_600_000)))
        .or_else(|| v.strip_suffix('d').map(|n| (n, 86_400_000)));
    if let Some((n, unit)) = ago
        && let Ok(n) = n.parse::<i64>()
        && n >= 0
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        return Ok(now - n * unit);
    }
    if let Some((date, hm)) = v.split_once('T') {
        let day = parse_when(field, date)?;
        let bad = || anyhow::anyhow!("--{field}: {v:?} is not YYYY-MM-DDTHH:MM");
        let (h, m) = hm.split_once(':').ok_or_else(bad)?;
        let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        anyhow::ensure!((0..24).contains(&h) && (0..60).contains(&m), bad());
        return Ok(day + (h * 60 + m) * 60_000);
    }
    parse_when(field, v).map_err(|_| {
        anyhow::anyhow!(
            "--{field}: {v:?} is not a time; write 2026-12-01, 2026-12-01T08:00 (UTC), \
             Unix milliseconds, or a while ago such as 30m, 2h or 7d"
        )
    })
}

/// `YYYY-MM-DD` (midnight UTC) or Unix milliseconds.
fn parse_when(field: &str, v: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || anyhow::anyhow!("--{field}: {v:?} is neither YYYY-MM-DD nor Unix milliseconds");
    let mut parts = v.split('-').map(|p| p.parse::<i32>().map_err(|_| bad()));
    let (y, m, d) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d), None) => (y?, m?, d?),
        _ => return Err(bad()),
    };
    let month = time::Month::try_from(u8::try_from(m).map_err(|_| bad())?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(y, month, u8::try_from(d).map_err(|_| bad())?)
        .map_err(|_| bad())?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

fn print_host(h: &Host) {
    let cap = h.capacity.unwrap_or_default();
    let alloc = h.allocated.unwrap_or_default();
    let state = betang_proto::v1::HostState::try_from(h.state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("HOST_STATE_");
    println!("id:         {}", h.id);
    println!("hostname:   {}", h.hostname);
    println!(
        "state:      {state}{}",
        if h.cordoned { ", cordoned" } else { "" }
    );
    if !h.state_reason.is_empty() {
        println!(
            "            {} (since {})",
            h.state_reason,
            ms_to_text(h.state_since_ms)
        );
    }
    let mut labels: Vec<_> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    println!(
        "placement:  zone {:?}, weight {}, labels {}",
        h.zone,
        h.weight,
        labels.join(",")
    );
    println!("endpoint:   {}", h.agent_endpoint);
    println!("guests:     {} ({} domains)", h.vps_count, h.domain_type);
    // Measured against what may be placed (after reserve and overcommit),
    // as placement measures it; the hardware's own figures beside.
    let room = h.allocatable.unwrap_or(cap);
    println!(
        "allocated:  {}/{} vCPU, {}/{} MiB, {}/{} GiB (of what may be placed)",
        alloc.vcpus, room.vcpus, alloc.memory_mib, room.memory_mib, alloc.disk_gib, room.disk_gib
    );
    println!(
        "capacity:   {} vCPU, {} MiB, {} GiB",
        cap.vcpus, cap.memory_mib, cap.disk_gib
    );
    if let Some(u) = &h.usage {
        println!(
            "usage:      cpu {:.1}%, memory {} of {}, disk {} of {}, load {:.2}",
            u.cpu_percent,
            gib(u.memory_used_bytes),
            gib(u.memory_total_bytes),
            gib(u.disk_used_bytes),
            gib(u.disk_total_bytes),
            u.load_1m
        );
    }
    let images: Vec<_> = h
        .images
        .iter()
        .map(|i| {
            if i.digest.is_empty() {
                i.name.clone()
            } else {
                format!("{} (sha256 {})", i.name, short_digest(&i.digest))
            }
        })
        .collect();
    println!("images:     {}", images.join(", "));
    if !h.leftovers.is_empty() {
        println!(
            "leftovers:  {} that no VPS owns; Betang leaves them for you to check and remove:",
            h.leftovers.len()
        );
        for l in &h.leftovers {
            println!(
                "            {} ({}, seen since {})",
                l.vps_id,
                l.what,
                betang_controller::report::utc(l.since_ms)
            );
        }
    }
}

/// The first 12 hex digits of a SHA-256, enough to tell versions apart.
fn short_digest(d: &str) -> &str {
    d.get(..12).unwrap_or(d)
}

async fn wait_for(
    c: &mut VpsServiceClient<Authed>,
    id: &str,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<Vps> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let v = c
            .get_vps(GetVpsRequest {
                id: id.to_owned(),
                history_minutes: 0,
            })
            .await?
            .into_inner();
        let s = state_name(&v);
        if s == want {
            return Ok(v);
        }
        if s == "ERROR" && want != "ERROR" {
            bail!("VPS {id} is in ERROR: {}", v.state_reason);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("VPS {id} is {s}, not {want}, after {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    // A first call without a token: say how to get one. (Reaching the
    // controller is tried first, so a controller that is down says so.)
    if s.code() == tonic::Code::Unauthenticated && s.message().contains("no bearer token") {
        return anyhow::anyhow!(
            "no token: log in first with `betangctl login --token-stdin` (your administrator \
             gives you a token), or set BETANG_TOKEN"
        );
    }
    anyhow::anyhow!("{}: {}", s.code().description(), s.message())
}

fn read_optional(p: &Option<PathBuf>) -> anyhow::Result<String> {
    match p {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())),
        None => Ok(String::new()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Pki(cmd) => return pki(cmd),
        Cmd::Login {
            endpoint,
            token_stdin,
            ca,
        } => {
            let path = config_path(&cli);
            let mut c = load_config(&path)?;
            if let Some(e) = endpoint {
                c.endpoint = Some(e.clone());
            }
            if *token_stdin {
                let mut t = String::new();
                std::io::stdin().read_line(&mut t)?;
                c.token = Some(t.trim().to_owned());
            }
            if let Some(ca) = ca {
                c.ca = Some(ca.clone());
            }
            // Saved only once the controller accepts it: a mistyped token
            // never replaces a working one.
            let endpoint = c
                .endpoint
                .clone()
                .unwrap_or_else(|| "http://127.0.0.1:7000".into());
            anyhow::ensure!(
                c.token.as_deref().is_some_and(|t| !t.is_empty()),
                "no token given; pipe it in with --token-stdin"
            );
            let me = connect_to(endpoint.clone(), c.token.clone(), c.ca.clone())
                .await?
                .identity
                .who_am_i(WhoAmIRequest {})
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "{endpoint} did not accept that token ({}); {} is unchanged",
                        s.message(),
                        path.display()
                    )
                })?
                .into_inner();
            save_config(&path, &c)?;
            println!(
                "logged in as {} ({}); saved {}",
                me.username,
                role_name(me.role),
                path.display()
            );
            return Ok(());
        }
        _ => {}
    }
    let mut c = connect(&cli).await?;
    match cli.cmd {
        Cmd::Vps(cmd) => {
            let names = if cmd.names_institutions() {
                institution_names(&mut c.identity).await
            } else {
                Default::default()
            };
            vps(&mut c.vps, *cmd, &names).await?
        }
        Cmd::Host(HostCmd::List) => {
            let list = c
                .hosts
                .list_hosts(ListHostsRequest {})
                .await
                .map_err(status_error)?;
            for (i, h) in list.get_ref().hosts.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_host(h);
            }
        }
        Cmd::Host(HostCmd::Cordon { id }) => {
            let h = c
                .hosts
                .cordon_host(betang_proto::v1::CordonHostRequest { id })
                .await
                .map_err(status_error)?;
            print_host(h.get_ref());
        }
        Cmd::Host(HostCmd::Uncordon { id }) => {
            let h = c
                .hosts
                .uncordon_host(betang_proto::v1::UncordonHostRequest { id })
                .await
                .map_err(status_error)?;
            print_host(h.get_ref());
        }
        Cmd::Host(HostCmd::Weight { id, weight }) => {
            let h = c
                .hosts
                .set_host_weight(betang_proto::v1::SetHostWeightRequest { id, weight })
                .await
                .map_err(status_error)?;
            print_host(h.get_ref());
        }
        Cmd::Host(HostCmd::Drain {
            id,
            move_stopped,
            move_running,
        }) => {
            let mut req = tonic::Request::new(betang_proto::v1::DrainHostRequest {
                id: id.clone(),
                move_stopped,
                move_running,
            });
            // Each move copies a disk; a drain can take a while.
            req.set_timeout(Duration::from_secs(24 * 3600));
            let r = c.hosts.drain_host(req).await.map_err(status_error)?;
            println!("{id}: cordoned; on it:");
            println!(
                "{:<36}  {:<20}  {:<12}  {:<20}  OUTCOME",
                "ID", "NAME", "STATE", "TO HOST"
            );
            for v in &r.get_ref().vps {
                println!(
                    "{:<36}  {:<20}  {:<12}  {:<20}  {}",
                    v.vps_id, v.name, v.state, v.to_host, v.outcome
                );
            }
            // The exit status says whether every move asked for was taken on.
            let refused = r
                .get_ref()
                .vps
                .iter()
                .filter(|v| v.outcome != "moving" && v.outcome != "left")
                .count();
            if refused > 0 {
                bail!("{refused} VPS could not be moved (see OUTCOME)");
            }
        }
        Cmd::Host(HostCmd::Get { id }) => {
            let h = c
                .hosts
                .get_host(GetHostRequest { id })
                .await
                .map_err(status_error)?;
            print_host(h.get_ref());
        }
        Cmd::Report(ReportCmd::Usage {
            from,
            to,
            institution,
        }) => {
            let r = c
                .vps
                .get_usage_report(betang_proto::v1::UsageReportRequest {
                    from_ms: parse_when("from", &from)?,
                    to_ms: parse_when("to", &to)?,
                    institution_id: institution,
                })
                .await
                .map_err(status_error)?;
            print!("{}", betang_controller::report::usage_csv(r.get_ref())?);
        }
        Cmd::Image(ImageCmd::List) => {
            let list = c
                .vps
                .list_images(ListImagesRequest {})
                .await
                .map_err(status_error)?;
            println!(
                "{:<24}  {:<12}  {:>5}  {:>5}  {:<10}  {:>7}  DESCRIPTION",
                "NAME", "SHA256", "HOSTS", "VPS", "OS", "MIN GiB"
            );
            for i in &list.get_ref().images {
                println!(
                    "{:<24}  {:<12}  {:>5}  {:>5}  {:<10}  {:>7}  {}",
                    i.name,
                    if i.digest.is_empty() {
                        "-"
                    } else {
                        short_digest(&i.digest)
                    },
                    i.host_count,
                    i.vps_count,
                    i.os,
                    i.min_disk_gib,
                    i.description
                );
            }
        }
        Cmd::Institution(cmd) => institution(&mut c.identity, cmd).await?,
        Cmd::User(UserCmd::Create {
            username,
            institution,
            role,
            full_name,
            email,
        }) => {
            let role = match role.as_str() {
                "member" => Role::Member,
                "operator" => Role::Operator,
                "admin" => Role::Admin,
                other => bail!("--role: {other:?} is not member, operator or admin"),
            };
            let u = c
                .identity
                .create_user(CreateUserRequest {
                    username,
                    full_name,
                    email,
                    institution_id: institution,
                    role: role as i32,
                })
                .await
                .map_err(status_error)?;
            print_user(u.get_ref());
        }
        Cmd::User(UserCmd::Disable { id }) => set_user_enabled(&mut c.identity, id, false).await?,
        Cmd::User(UserCmd::Enable { id }) => set_user_enabled(&mut c.identity, id, true).await?,
        Cmd::User(UserCmd::Invite { user }) => {
            let i = c
                .identity
                .create_invitation(betang_proto::v1::CreateInvitationRequest { user })
                .await
                .map_err(status_error)?
                .into_inner();
            let who = i.user.map(|u| u.username).unwrap_or_default();
            match i.link.as_str() {
                "" => println!(
                    "invitation for {who}: open /invite/{} on the portal (portal_url is not set)",
                    i.secret
                ),
                link => println!("invitation for {who}: {link}"),
            }
            println!("valid until {}", ms_to_text(i.expires_at_ms));
        }
        Cmd::User(UserCmd::List { institution }) => {
            let list = c
                .identity
                .list_users(ListUsersRequest {
                    institution_id: institution,
                })
                .await
                .map_err(status_error)?;
            print_users(&list.get_ref().users);
        }
        Cmd::Token(TokenCmd::Create {
            user,
            name,
            ttl_seconds,
        }) => {
            let t = c
                .identity
                .create_token(CreateTokenRequest {
                    user_id: user,
                    name,
                    ttl_seconds,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let meta = t.token.unwrap_or_default();
            eprintln!(
                "token {} expires {} — shown once, keep it secret:",
                meta.id,
                ms_to_text(meta.expires_at_ms)
            );
            println!("{}", t.secret);
        }
        Cmd::Token(TokenCmd::List { user }) => {
            let list = c
                .identity
                .list_tokens(ListTokensRequest { user_id: user })
                .await
                .map_err(status_error)?;
            println!(
                "{:<20}  {:<36}  {:<16}  {:<24}  {:<24}  {:<15}  REVOKED",
                "ID", "USER", "NAME", "EXPIRES", "LAST USED", "FROM"
            );
            for t in &list.get_ref().tokens {
                println!(
                    "{:<20}  {:<36}  {:<16}  {:<24}  {:<24}  {:<15}  {}",
                    t.id,
                    t.user_id,
                    t.name,
                    ms_to_text(t.expires_at_ms),
                    ms_to_text(t.last_used_at_ms),
                    if t.last_used_from.is_empty() {
                        "-"
                    } else {
                        &t.last_used_from
                    },
                    ms_to_text(t.revoked_at_ms)
                );
            }
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            c.identity
                .revoke_token(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(status_error)?;
            println!("{id}: revoked");
        }
        Cmd::Network(cmd) => network(&mut c, cmd).await?,
        Cmd::Whoami => {
            let u = c
                .identity
                .who_am_i(WhoAmIRequest {})
                .await
                .map_err(status_error)?;
            print_user(u.get_ref());
        }
        Cmd::Audit(AuditCmd::List {
            institution,
            actor,
            action,
            target,
            since,
            until,
            since_ms,
            until_ms,
        }) => {
            let since_ms = audit_time("since", since.as_deref(), since_ms)?;
            let until_ms = audit_time("until", until.as_deref(), until_ms)?;
            let mut token = String::new();
            loop {
                let page = c
                    .audit
                    .list_audit(ListAuditRequest {
                        institution_id: institution.clone(),
                        actor_user_id: actor.clone(),
                        action: action.clone(),
                        target: target.clone(),
                        since_ms,
                        until_ms,
                        page_size: 500,
                        page_token: token.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for r in &page.records {
                    println!(
                        "{}  {:<12}  {:<22}  {:<36}  {}",
                        ms_to_text(r.at_ms),
                        r.actor_username,
                        r.action,
                        r.target,
                        r.result
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        Cmd::Pki(_) | Cmd::Login { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

/// Ctrl-], as in `virsh console` and telnet.
const CONSOLE_ESCAPE: u8 = 0x1d;

/// The terminal in raw mode while a console is open (keys go to the guest
/// as typed), restored however the console ends.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    #[allow(unsafe_code)]
    fn enter() -> RawTerminal {
        // SAFETY: `t` is filled by tcgetattr on standard input before use.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawTerminal(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawTerminal(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the settings read in `enter`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

async fn console(
    c: &mut VpsServiceClient<Authed>,
    id: String,
    read_only: bool,
    take_over: bool,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};

    use betang_proto::v1::ConsoleInput;
    let (keys, requests) = tokio::sync::mpsc::channel::<ConsoleInput>(64);
    keys.send(ConsoleInput {
        vps_id: id.clone(),
        read_only,
        take_over,
        ..Default::default()
    })
    .await?;
    let mut answer = c
        .console_vps(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .map_err(status_error)?
        .into_inner();
    eprintln!("console of {id}; Ctrl-] leaves");
    let raw = RawTerminal::enter();
    let (left_tx, mut left) = tokio::sync::mpsc::channel::<()>(1);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            let end = chunk.iter().position(|b| *b == CONSOLE_ESCAPE);
            let data = chunk[..end.unwrap_or(n)].to_vec();
            if !data.is_empty()
                && keys
                    .blocking_send(ConsoleInput {
                        data,
                        ..Default::default()
                    })
                    .is_err()
            {
                break;
            }
            if end.is_some() {
                break;
            }
        }
        let _ = left_tx.blocking_send(());
    });
    let mut out = std::io::stdout();
    let ended = loop {
        let next = tokio::select! {
            m = answer.message() => m,
            _ = left.recv() => break None,
        };
        match next {
            Ok(Some(o)) => {
                if !o.notice.is_empty() {
                    eprint!("\r\n[{}]\r\n", o.notice);
                }
                out.write_all(&o.data)?;
                out.flush()?;
            }
            Ok(None) => break Some("the console closed".to_owned()),
            Err(s) => break Some(status_error(s).to_string()),
        }
    };
    drop(raw);
    match ended {
        None => eprintln!("\n[left the console]"),
        Some(why) => eprintln!("\n[{why}]"),
    }
    Ok(())
}

async fn network(c: &mut Clients, cmd: NetworkCmd) -> anyhow::Result<()> {
    use betang_proto::v1::{
        CreateNetworkRequest, GetNetworkRequest, GrantNetworkRequest, ListNetworksRequest, Network,
        RevokeNetworkRequest,
    };
    let n = match cmd {
        NetworkCmd::Create {
            name,
            cidr,
            bridge,
            libvirt_network,
            gateway,
            dns,
            reserve,
            zone,
            vlan,
        } => {
            let (attach_kind, attach_source) = match (bridge, libvirt_network) {
                (Some(b), _) => ("bridge", b),
                (None, Some(n)) => ("network", n),
                (None, None) => {
                    anyhow::bail!("say how hosts attach it: --bridge or --libvirt-network")
                }
            };
            let network = Network {
                name,
                zone,
                attach_kind: attach_kind.into(),
                attach_source,
                cidr,
                gateway,
                dns,
                reserved: reserve.join(","),
                vlan,
                ..Default::default()
            };
            c.networks
                .create_network(CreateNetworkRequest {
                    network: Some(network),
                })
                .await
                .map_err(status_error)?
                .into_inner()
        }
        NetworkCmd::List => {
            let list = c
                .networks
                .list_networks(ListNetworksRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{:<16}  {:<18}  {:<8}  {:<16}  {:<12}  {:>9}  GRANTED TO",
                "NAME", "CIDR", "ATTACH", "SOURCE", "ZONE", "USED"
            );
            for n in list.networks {
                let grants: Vec<String> = n
                    .grants
                    .iter()
                    .map(|g| {
                        format!(
                            "{}{}",
                            g.institution_code,
                            if g.is_default { " (default)" } else { "" }
                        )
                    })
                    .collect();
                println!(
                    "{:<16}  {:<18}  {:<8}  {:<16}  {:<12}  {:>9}  {}",
                    n.name,
                    n.cidr,
                    n.attach_kind,
                    n.attach_source,
                    if n.zone.is_empty() { "-" } else { &n.zone },
                    format!("{}/{}", n.addresses_used, n.addresses_total),
                    grants.join(", ")
                );
            }
            return Ok(());
        }
        NetworkCmd::Get { name } => c
            .networks
            .get_network(GetNetworkRequest { name })
            .await
            .map_err(status_error)?
            .into_inner(),
        NetworkCmd::Grant {
            name,
            institution,
            default,
        } => c
            .networks
            .grant_network(GrantNetworkRequest {
                name,
                institution_id: institution,
                is_default: default,
            })
            .await
            .map_err(status_error)?
            .into_inner(),
        NetworkCmd::Revoke { name, institution } => c
            .networks
            .revoke_network(RevokeNetworkRequest {
                name,
                institution_id: institution,
            })
            .await
            .map_err(status_error)?
            .into_inner(),
    };
    println!("name:      {}", n.name);
    println!("cidr:      {}", n.cidr);
    println!("attach:    {} {}", n.attach_kind, n.attach_source);
    if !n.gateway.is_empty() {
        println!("gateway:   {}", n.gateway);
    }
    if !n.dns.is_empty() {
        println!("dns:       {}", n.dns.join(", "));
    }
    if !n.reserved.is_empty() {
        println!("reserved:  {}", n.reserved);
    }
    if !n.zone.is_empty() {
        println!("zone:      {}", n.zone);
    }
    if n.vlan != 0 {
        println!("vlan:      {}", n.vlan);
    }
    println!(
        "addresses: {} of {} held",
        n.addresses_used, n.addresses_total
    );
    for g in &n.grants {
        println!(
            "granted:   {}{}",
            g.institution_code,
            if g.is_default { " (default)" } else { "" }
        );
    }
    Ok(())
}

fn pki(cmd: &PkiCmd) -> anyhow::Result<()> {
    use betang_controller::pki::PkiDir;
    match cmd {
        PkiCmd::Init { dir } => {
            let pki = PkiDir(dir.clone());
            if pki.init()? {
                println!("created the CA in {}", pki.ca_cert().display());
            } else {
                println!("the CA in {} exists; kept", pki.ca_cert().display());
            }
        }
        PkiCmd::Issue { name, dir, san } => {
            let files = PkiDir(dir.clone()).issue(name, san)?;
            println!("{}\n{}", files.cert.display(), files.key.display());
        }
        PkiCmd::Revoke { name, dir } => {
            let pki = PkiDir(dir.clone());
            let serial = pki.revoke(name, betang_controller::now_ms())?;
            println!(
                "revoked {name} (serial {serial}) in {}",
                pki.revoked_list().display()
            );
        }
    }
    Ok(())
}

async fn institution(
    c: &mut IdentityServiceClient<Authed>,
    cmd: InstitutionCmd,
) -> anyhow::Result<()> {
    match cmd {
        InstitutionCmd::Create {
            code,
            name,
            contact_name,
            contact_email,
            contact_phone,
            quota,
        } => {
            let i = c
                .create_institution(CreateInstitutionRequest {
                    code,
                    name,
                    contact_name,
                    contact_email,
                    contact_phone,
                    quota: Some(quota.quota()),
                })
                .await
                .map_err(status_error)?;
            print_institution(i.get_ref());
        }
        InstitutionCmd::List => {
            let list = c
                .list_institutions(ListInstitutionsRequest {})
                .await
                .map_err(status_error)?;
            for (n, i) in list.get_ref().institutions.iter().enumerate() {
                if n > 0 {
                    println!();
                }
                print_institution(i);
            }
        }
        InstitutionCmd::Disable { id } => {
            let i = c
                .set_institution_enabled(SetEnabledRequest { id, enabled: false })
                .await
                .map_err(status_error)?;
            print_institution(i.get_ref());
        }
        InstitutionCmd::Enable { id } => {
            let i = c
                .set_institution_enabled(SetEnabledRequest { id, enabled: true })
                .await
                .map_err(status_error)?;
            print_institution(i.get_ref());
        }
        InstitutionCmd::Get { id } => {
            let i = c
                .get_institution(GetInstitutionRequest { id })
                .await
                .map_err(status_error)?;
            print_institution(i.get_ref());
        }
        InstitutionCmd::Quota { id, quota } => {
            let i = c
                .set_quota(SetQuotaRequest {
                    institution_id: id,
                    quota: None,
                    change: Some(QuotaChange {
                        vcpus: quota.vcpus,
                        memory_mib: quota.memory_mib,
                        disk_gib: quota.disk_gib,
                        vps_count: quota.vps,
                    }),
                })
                .await
                .map_err(status_error)?;
            print_institution(i.get_ref());
        }
    }
    Ok(())
}

async fn set_user_enabled(
    c: &mut IdentityServiceClient<Authed>,
    id: String,
    enabled: bool,
) -> anyhow::Result<()> {
    let u = c
        .set_user_enabled(SetEnabledRequest { id, enabled })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{} ({}): {}",
        u.username,
        u.id,
        if u.disabled_at_ms == 0 {
            "enabled"
        } else {
            "disabled; its tokens no longer work"
        }
    );
    Ok(())
}

/// "code (name)" of each institution the caller may see, by id; empty when
/// they may see none (ids are shown then).
async fn institution_names(
    c: &mut IdentityServiceClient<Authed>,
) -> std::collections::HashMap<String, String> {
    c.list_institutions(ListInstitutionsRequest {})
        .await
        .map(|r| {
            r.into_inner()
                .institutions
                .into_iter()
                .map(|i| (i.id, format!("{} ({})", i.code, i.name)))
                .collect()
        })
        .unwrap_or_default()
}

impl VpsCmd {
    /// Whether the output names institutions (and so needs their names).
    /// Every command that prints a VPS names its institution; the plain
    /// list does not show institutions.
    fn names_institutions(&self) -> bool {
        !matches!(self, VpsCmd::List { pending: false, .. })
    }
}

async fn vps(
    c: &mut VpsServiceClient<Authed>,
    cmd: VpsCmd,
    institutions: &std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    let institution_of = |id: &str| {
        institutions
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_owned())
    };
    let show = |v: &Vps| print_vps_of(v, &institution_of(&v.institution_id));
    match cmd {
        VpsCmd::Create {
            name,
            vcpus,
            memory_mib,
            disk_gib,
            image,
            ssh_key_file,
            user_data_file,
            app,
            institution,
            host,
            zone,
            host_labels,
            anti_affinity_group,
            network,
            ip,
            request_id,
            wait,
            wait_seconds,
        } => {
            let mut labels = std::collections::HashMap::new();
            for l in host_labels {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("--host-label {l:?}: use NAME=VALUE"))?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            let ssh_public_key = read_optional(&ssh_key_file)?.trim().to_owned();
            let user_data = read_optional(&user_data_file)?;
            let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let v = c
                .create_vps(CreateVpsRequest {
                    request_id,
                    spec: Some(VpsSpec {
                        name,
                        vcpus,
                        memory_mib,
                        disk_gib,
                        image,
                        ssh_public_key,
                        user_data,
                        network,
                    }),
                    application: Some(Application {
                        name: app.app_name,
                        kind: app.app_kind,
                        purpose: app.app_purpose,
                        domain: app.app_domain,
                        responsible_name: app.responsible_name,
                        responsible_nip: app.responsible_nip,
                        responsible_email: app.responsible_email,
                        responsible_phone: app.responsible_phone,
                    }),
                    institution_id: institution,
                    host_id: host,
                    placement: Some(betang_proto::v1::PlacementRequest {
                        zone,
                        host_labels: labels,
                        anti_affinity_group,
                    }),
                    ip_address: ip,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let v = if wait && state_name(&v) != "PENDING_APPROVAL" {
                wait_for(c, &v.id, "RUNNING", Duration::from_secs(wait_seconds)).await?
            } else {
                v
            };
            show(&v);
        }
        VpsCmd::List {
            all,
            pending,
            institution,
            host,
        } => {
            let mut token = String::new();
            let mut header = true;
            loop {
                let page = c
                    .list_vps(ListVpsRequest {
                        page_size: 500,
                        page_token: token.clone(),
                        include_deleted: all,
                        institution_id: institution.clone(),
                        host_id: host.clone(),
                        state: if pending {
                            VpsState::PendingApproval as i32
                        } else {
                            0
                        },
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                // Only once the first page came: a refusal prints no table.
                if std::mem::take(&mut header) {
                    if pending {
                        println!(
                            "{:<36}  {:<20}  {:<24}  {:<20}  {:<20}  {:<12}  ASKED (UTC)",
                            "ID",
                            "NAME",
                            "INSTITUTION",
                            "APPLICATION",
                            "RESPONSIBLE",
                            "REQUESTED BY"
                        );
                    } else {
                        println!(
                            "{:<36}  {:<20}  {:<16}  {:>4}  {:>7}  {:>6}  {:<16}  {:>6}  ADDRESS",
                            "ID", "NAME", "STATE", "VCPU", "MEM MiB", "DISK G", "HOST", "CPU %"
                        );
                    }
                }
                for v in &page.vps {
                    let s = v.spec.clone().unwrap_or_default();
                    if pending {
                        // What an operator decides on: who asks, for what.
                        let a = v.application.clone().unwrap_or_default();
                        println!(
                            "{:<36}  {:<20}  {:<24}  {:<20}  {:<20}  {:<12}  {}",
                            v.id,
                            s.name,
                            institution_of(&v.institution_id),
                            a.name,
                            a.responsible_name,
                            v.requested_by,
                            ms_to_text(v.created_at_ms)
                        );
                        continue;
                    }
                    println!(
                        "{:<36}  {:<20}  {:<16}  {:>4}  {:>7}  {:>6}  {:<16}  {:>6.1}  {}",
                        v.id,
                        s.name,
                        state_shown(v),
                        s.vcpus,
                        s.memory_mib,
                        s.disk_gib,
                        v.host_id,
                        v.usage.map_or(0.0, |u| u.cpu_rate * 100.0),
                        v.attachment.as_ref().map_or("-", |a| a.ip_address.as_str())
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        VpsCmd::Console {
            id,
            read_only,
            take_over,
        } => console(c, id, read_only, take_over).await?,
        VpsCmd::Get { id, history } => {
            let v = c
                .get_vps(GetVpsRequest {
                    id,
                    history_minutes: history,
                })
                .await
                .map_err(status_error)?;
            show(v.get_ref());
            print_history(&v.get_ref().history);
        }
        VpsCmd::Start { id, wait } => {
            c.start_vps(StartVpsRequest { id: id.clone() })
                .await
                .map_err(status_error)?;
            if wait {
                wait_for(c, &id, "RUNNING", Duration::from_secs(300)).await?;
            }
            println!("{id}: starting");
        }
        VpsCmd::Stop {
            id,
            timeout_seconds,
            force,
            wait,
        } => {
            c.stop_vps(StopVpsRequest {
                id: id.clone(),
                timeout_seconds,
                force,
            })
            .await
            .map_err(status_error)?;
            if wait {
                let limit = u64::from(timeout_seconds) + 120;
                wait_for(c, &id, "STOPPED", Duration::from_secs(limit)).await?;
            }
            println!("{id}: stopping");
        }
        VpsCmd::Reboot { id, force } => {
            c.reboot_vps(RebootVpsRequest {
                id: id.clone(),
                force,
            })
            .await
            .map_err(status_error)?;
            println!("{id}: rebooted");
        }
        VpsCmd::Delete { id, wait } => {
            c.delete_vps(DeleteVpsRequest { id: id.clone() })
                .await
                .map_err(status_error)?;
            if wait {
                wait_for(c, &id, "DELETED", Duration::from_secs(300)).await?;
            }
            println!("{id}: deleting");
        }
        VpsCmd::Approve {
            id,
            vcpus,
            memory_mib,
            disk_gib,
            host,
            ip,
        } => {
            let v = c
                .approve_vps(ApproveVpsRequest {
                    id,
                    vcpus,
                    memory_mib,
                    disk_gib,
                    host_id: host,
                    ip_address: ip,
                })
                .await
                .map_err(status_error)?;
            show(v.get_ref());
        }
        VpsCmd::Reject { id, reason } => {
            let v = c
                .reject_vps(RejectVpsRequest { id, reason })
                .await
                .map_err(status_error)?;
            show(v.get_ref());
        }
        VpsCmd::Resize {
            id,
            vcpus,
            memory_mib,
            disk_gib,
        } => {
            let v = c
                .resize_vps(betang_proto::v1::ResizeVpsRequest {
                    id,
                    vcpus,
                    memory_mib,
                    disk_gib,
                })
                .await
                .map_err(status_error)?;
            show(v.get_ref());
        }
        VpsCmd::Move { id, restart, wait } => {
            let v = c
                .move_vps(betang_proto::v1::MoveVpsRequest {
                    id: id.clone(),
                    restart,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if !wait {
                show(&v);
                return Ok(());
            }
            let v = loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let v = c
                    .get_vps(GetVpsRequest {
                        id: id.clone(),
                        history_minutes: 0,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if state_name(&v) != "MIGRATING" {
                    break v;
                }
            };
            show(&v);
            if v.state_reason.starts_with("moving to") {
                bail!("the move did not happen: {}", v.state_reason);
            }
        }
        VpsCmd::Cancel { id } => {
            let v = c
                .cancel_vps(CancelVpsRequest { id })
                .await
                .map_err(status_error)?;
            show(v.get_ref());
        }
        VpsCmd::Wait {
            id,
            state,
            timeout_seconds,
        } => {
            let want = state.to_uppercase();
            if betang_controller::lifecycle::VpsState::parse(&want).is_none() {
                let names: Vec<&str> = betang_controller::lifecycle::ALL_STATES
                    .iter()
                    .map(|s| s.as_str())
                    .collect();
                bail!("{state:?} is not a state; one of {}", names.join(", "));
            }
            let v = wait_for(c, &id, &want, Duration::from_secs(timeout_seconds)).await?;
            show(&v);
        }
    }
    Ok(())
}
