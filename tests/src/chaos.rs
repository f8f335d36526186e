//! Fault injection on the real binaries. The controller and every agent run
//! as processes of their own (agents on the simulated hypervisor, whose
//! domains persist like libvirt's); each round sends a few random requests
//! (create, approve, start, stop, resize, delete, move) at once, kills the
//! controller or an agent with SIGKILL at a random moment, starts it again,
//! waits for everything to settle and checks the invariants:
//!
//! - every acknowledged request exists exactly once;
//! - nothing is stuck: every VPS settles within the bound;
//! - the store's totals equal the sums over its VPS;
//! - each host holds exactly the domains and disks of the live VPS the store
//!   puts there, nothing more and nothing less;
//! - no institution is over its quota;
//! - the pattern written into every disk is still there, wherever the disk went.
//!
//! Rounds are drawn from a seed that is printed, so a failure replays.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use betang_controller::pki::PkiDir;
use betang_proto::v1::{
    ApproveVpsRequest, CreateVpsRequest, DeleteVpsRequest, ListVpsRequest, MoveVpsRequest, Quota,
    ResizeVpsRequest, StartVpsRequest, StopVpsRequest, Vps, VpsSpec, VpsState,
};
use rusqlite::{Connection, OptionalExtension};

use crate::{Clients, application, make_people, make_pki, state_of};

pub struct ChaosOptions {
    pub rounds: usize,
    pub seed: u64,
    pub hosts: usize,
    /// Where `betang-controller` and `betang-agent` are.
    pub bin_dir: PathBuf,
    /// How long a round may take to settle before it counts as stuck.
    pub settle: Duration,
    /// Print a line per round.
    pub verbose: bool,
}

#[derive(Debug, Default)]
pub struct ChaosReport {
    pub rounds: usize,
    pub faults: u64,
    pub requests: u64,
    /// Requests sent, by kind (create, approve, start, stop, resize, delete, move).
    pub requests_by_kind: BTreeMap<&'static str, u64>,
    pub acknowledged: u64,
    pub violations: BTreeMap<String, u64>,
    /// The first few violations in words, for the person reading.
    pub examples: Vec<String>,
    pub seconds: f64,
}

impl ChaosReport {
    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }

    fn violation(&mut self, round: usize, kind: &str, what: String) {
        *self.violations.entry(kind.to_owned()).or_default() += 1;
        if self.examples.len() < 20 {
            self.examples.push(format!("round {round}: {kind}: {what}"));
        }
    }

    pub fn json(&self, seed: u64) -> String {
        serde_json::json!({
            "rounds": self.rounds,
            "seed": seed,
            "faults": self.faults,
            "requests": self.requests,
            "requests_by_kind": self.requests_by_kind,
            "acknowledged": self.acknowledged,
            "violations": self.total_violations(),
            "violations_by_kind": self.violations,
            "seconds": (self.seconds * 10.0).round() / 10.0,
        })
        .to_string()
    }
}

/// Where the binaries are: `BETANG_BIN_DIR`, else beside this executable
/// (or one directory up, for a test under `deps/`).
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(d) = std::env::var("BETANG_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let me = std::env::current_exe()?;
    let here = me.parent().context("no directory")?;
    for d in [here, here.parent().unwrap_or(here)] {
        if d.join("betang-controller").exists() && d.join("betang-agent").exists() {
            return Ok(d.to_path_buf());
        }
    }
    anyhow::bail!(
        "betang-controller and betang-agent are not beside {}; build them first \
         (cargo build --workspace --bins) or set BETANG_BIN_DIR",
        me.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process of ours, killed with SIGKILL when dropped.
struct Proc {
    cmd: Vec<std::ffi::OsString>,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Proc {
    fn new(bin: &Path, args: &[&std::ffi::OsStr], log: PathBuf) -> Self {
        let mut cmd = vec![bin.as_os_str().to_owned()];
        cmd.extend(args.iter().map(|a| a.to_os_string()));
        Proc {
            cmd,
            log,
            child: None,
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = tokio::process::Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {:?}", self.cmd[0]))?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Whether it died on its own (a crash is a violation of its own).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

struct World {
    dir: PathBuf,
    db: PathBuf,
    endpoint: String,
    controller: Proc,
    agents: Vec<Proc>,
    host_ids: Vec<String>,
    vm_dirs: Vec<PathBuf>,
    institution: String,
    quota: Quota,
    operator: String,
    member: String,
    /// Acknowledged creates: request id -> the VPS id the answer named.
    acked: BTreeMap<String, String>,
    /// The line written into each VPS's disk once it had settled.
    patterns: BTreeMap<String, String>,
    /// VPS already counted as in ERROR, so each counts once.
    errors_seen: BTreeSet<String>,
}

const IMAGE: &str = "tiny";

fn write_controller_config(
    dir: &Path,
    pki: &PkiDir,
    api: u16,
    registry: u16,
) -> anyhow::Result<PathBuf> {
    let files = pki.files(betang_controller::pki::CONTROLLER_NAME);
    let path = dir.join("controller.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{api}\"\nagent_listen = \"127.0.0.1:{registry}\"\n\
             data_dir = {:?}\nhost_down_after_ms = 3000\nheartbeat_interval_ms = 300\n\
             reconcile_interval_ms = 300\nbuild_timeout_seconds = 120\n\
             move_stall_seconds = 10\nmove_give_up_seconds = 120\nusage_interval_ms = 0\n\
             # Each round's calls come from one member's token at once.\n\
             [limits]\nrequests_per_second = 0\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            dir.join("data").display().to_string(),
            pki.ca_cert().display().to_string(),
            files.cert.display().to_string(),
            files.key.display().to_string(),
        ),
    )?;
    Ok(path)
}

fn write_agent_config(
    dir: &Path,
    pki: &PkiDir,
    host_id: &str,
    registry: u16,
    image_dir: &Path,
    vm_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let files = pki.files(host_id);
    let port = free_port()?;
    let path = dir.join(format!("{host_id}.toml"));
    std::fs::write(
        &path,
        format!(
            "host_id = {host_id:?}\nlisten = \"127.0.0.1:{port}\"\n\
             controller_endpoint = \"https://127.0.0.1:{registry}\"\n\
             libvirt_uri = \"\"\nhypervisor = \"simulated\"\nsimulated_persist = true\n\
             domain_type = \"qemu\"\nimage_dir = {:?}\nvm_dir = {:?}\n\
             heartbeat_interval_ms = 300\nreconcile_interval_seconds = 1\n\
             libvirt_call_timeout_seconds = 10\nstats_interval_ms = 1000\n\
             guest_unresponsive_after_ms = 5000\nzone = \"dc1\"\n\
             [capacity]\nvcpus = 8\nmemory_mib = 8192\ndisk_gib = 200\n\
             [network]\nmode = \"none\"\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            image_dir.display().to_string(),
            vm_dir.display().to_string(),
            pki.ca_cert().display().to_string(),
            files.cert.display().to_string(),
            files.key.display().to_string(),
        ),
    )?;
    Ok(path)
}

async fn wait_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

impl World {
    async fn start(dir: &Path, opts: &ChaosOptions, prefix: &str) -> anyhow::Result<World> {
        let host_ids: Vec<String> = (0..opts.hosts).map(|i| format!("{prefix}-h{i}")).collect();
        let pki = make_pki(&dir.join("pki"), &host_ids)?;
        let (api, registry) = (free_port()?, free_port()?);
        let ccfg = write_controller_config(dir, &pki, api, registry)?;
        let bin = |n: &str| opts.bin_dir.join(n);
        let admin = crate::bench::bootstrap_admin(&bin("betang-controller"), &ccfg).await?;
        let mut controller = Proc::new(
            &bin("betang-controller"),
            &["--config".as_ref(), ccfg.as_os_str(), "serve".as_ref()],
            dir.join("controller.log"),
        );
        controller.start()?;
        wait_port(api, Duration::from_secs(30)).await?;
        let endpoint = format!("http://127.0.0.1:{api}");
        let quota = Quota {
            vcpus: 14,
            memory_mib: 1 << 20,
            disk_gib: 1 << 20,
            vps_count: 100,
        };
        let people = make_people(&endpoint, &admin, prefix, quota).await?;
        let image_dir = dir.join("images");
        std::fs::create_dir_all(&image_dir)?;
        std::fs::write(image_dir.join("tiny.img"), b"a simulated base image\n")?;
        std::fs::write(
            image_dir.join("catalog.toml"),
            format!("[[image]]\nname = \"{IMAGE}\"\nfile = \"tiny.img\"\n"),
        )?;
        let mut agents = Vec::new();
        let mut vm_dirs = Vec::new();
        for h in &host_ids {
            let vm_dir = dir.join(format!("vms-{h}"));
            let cfg = write_agent_config(dir, &pki, h, registry, &image_dir, &vm_dir)?;
            let mut a = Proc::new(
                &bin("betang-agent"),
                &["--config".as_ref(), cfg.as_os_str()],
                dir.join(format!("{h}.log")),
            );
            a.start()?;
            agents.push(a);
            vm_dirs.push(vm_dir);
        }
        let world = World {
            dir: dir.to_path_buf(),
            db: dir.join("data").join("betang.db"),
            endpoint,
            controller,
            agents,
            host_ids,
            vm_dirs,
            institution: people.inst_a.clone(),
            quota,
            operator: people.operator.clone(),
            member: people.member_a.clone(),
            acked: BTreeMap::new(),
            patterns: BTreeMap::new(),
            errors_seen: BTreeSet::new(),
        };
        world.wait_hosts_up(Duration::from_secs(60)).await?;
        Ok(world)
    }

    fn db(&self) -> anyhow::Result<Connection> {
        let c = Connection::open(&self.db)?;
        c.busy_timeout(Duration::from_secs(10))?;
        Ok(c)
    }

    async fn wait_hosts_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let fresh: i64 = self.db()?.query_row(
                "SELECT COUNT(*) FROM hosts WHERE down_since_ms = 0
                     AND last_heartbeat_ms > (CAST(strftime('%s','now') AS INTEGER) * 1000) - 2000",
                [],
                |r| r.get(0),
            )?;
            if fresh as usize == self.host_ids.len() {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "hosts did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn clients(&self, token: &str) -> anyhow::Result<Clients> {
        Clients::connect(&self.endpoint, Some(token)).await
    }

    async fn list(&self) -> anyhow::Result<Vec<Vps>> {
        let mut c = self.clients(&self.operator).await?.vps;
        let r = c
            .list_vps(ListVpsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(r.vps)
    }
}

/// One request of a round.
#[derive(Debug, Clone)]
enum Op {
    Create { request_id: String, direct: bool },
    Approve(String),
    Start(String),
    Stop { id: String, force: bool },
    Resize(String),
    Delete(String),
    Move { id: String, restart: bool },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Approve(_) => "approve",
            Op::Start(_) => "start",
            Op::Stop { .. } => "stop",
            Op::Resize(_) => "resize",
            Op::Delete(_) => "delete",
            Op::Move { restart: false, .. } => "move",
            Op::Move { restart: true, .. } => "move_restart",
        }
    }
}

fn pick_ops(rng: &mut fastrand::Rng, vps: &[Vps], round: usize) -> Vec<Op> {
    let live: Vec<&Vps> = vps
        .iter()
        .filter(|v| matches!(state_of(v), VpsState::Running | VpsState::Stopped))
        .collect();
    let pending: Vec<&Vps> = vps
        .iter()
        .filter(|v| state_of(v) == VpsState::PendingApproval)
        .collect();
    let n = rng.usize(1..=3);
    let mut ops = Vec::new();
    let mut used = BTreeSet::new();
    for k in 0..n {
        let pick = |rng: &mut fastrand::Rng, from: &[&Vps]| -> Option<String> {
            (!from.is_empty()).then(|| from[rng.usize(..from.len())].id.clone())
        };
        let op = match rng.u32(0..100) {
            _ if live.len() < 3 => Op::Create {
                request_id: format!("chaos-{round}-{k}"),
                direct: rng.bool(),
            },
            0..=19 if live.len() < 10 => Op::Create {
                request_id: format!("chaos-{round}-{k}"),
                direct: rng.bool(),
            },
            0..=29 => match pick(rng, &pending) {
                Some(id) => Op::Approve(id),
                None => continue,
            },
            30..=44 => match pick(rng, &live) {
                Some(id) => Op::Start(id),
                None => continue,
            },
            45..=59 => match pick(rng, &live) {
                Some(id) => Op::Stop {
                    id,
                    force: rng.bool(),
                },
                None => continue,
            },
            60..=67 => match pick(rng, &live) {
                Some(id) => Op::Resize(id),
                None => continue,
            },
            68..=77 if live.len() > 4 => match pick(rng, &live) {
                Some(id) => Op::Delete(id),
                None => continue,
            },
            _ => match pick(rng, &live) {
                Some(id) => {
                    let running = live
                        .iter()
                        .any(|v| v.id == id && state_of(v) == VpsState::Running);
                    Op::Move {
                        id,
                        restart: running,
                    }
                }
                None => continue,
            },
        };
        let key = match &op {
            Op::Create { request_id, .. } => request_id.clone(),
            Op::Approve(id) | Op::Start(id) | Op::Resize(id) | Op::Delete(id) => id.clone(),
            Op::Stop { id, .. } | Op::Move { id, .. } => id.clone(),
        };
        if used.insert(key) {
            ops.push(op);
        }
    }
    ops
}

fn spec(name: &str) -> VpsSpec {
    VpsSpec {
        name: name.to_owned(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        image: IMAGE.into(),
        ..Default::default()
    }
}

/// Sends one request; answers the VPS id of an acknowledged create.
async fn send(
    endpoint: String,
    operator: String,
    member: String,
    institution: String,
    op: Op,
) -> Option<(String, String)> {
    let timeout = Duration::from_secs(15);
    let clients = |t: String| {
        let e = endpoint.clone();
        async move { Clients::connect(&e, Some(&t)).await.ok() }
    };
    let op_client = clients(operator).await?;
    let mut c = op_client.vps;
    let call = async {
        match op {
            Op::Create { request_id, direct } => {
                let req = CreateVpsRequest {
                    request_id: request_id.clone(),
                    spec: Some(spec(&request_id)),
                    application: Some(application()),
                    institution_id: if direct { institution } else { String::new() },
                    ..Default::default()
                };
                let answer = if direct {
                    c.create_vps(req).await
                } else {
                    clients(member).await?.vps.create_vps(req).await
                };
                answer.ok().map(|v| (request_id, v.into_inner().id))
            }
            Op::Approve(id) => {
                let _ = c
                    .approve_vps(ApproveVpsRequest {
                        id,
                        ..Default::default()
                    })
                    .await;
                None
            }
            Op::Start(id) => {
                let _ = c.start_vps(StartVpsRequest { id }).await;
                None
            }
            Op::Stop { id, force } => {
                let _ = c
                    .stop_vps(StopVpsRequest {
                        id,
                        timeout_seconds: 1,
                        force,
                    })
                    .await;
                None
            }
            Op::Resize(id) => {
                let _ = c
                    .resize_vps(ResizeVpsRequest {
                        id,
                        disk_gib: 2,
                        ..Default::default()
                    })
                    .await;
                None
            }
            Op::Delete(id) => {
                let _ = c.delete_vps(DeleteVpsRequest { id }).await;
                None
            }
            Op::Move { id, restart } => {
                let _ = c.move_vps(MoveVpsRequest { id, restart }).await;
                None
            }
        }
    };
    tokio::time::timeout(timeout, call).await.ok().flatten()
}

/// What the store says must be on each host, read from its file.
struct Settled {
    /// host id -> VPS ids whose files and domain must be there.
    expected: BTreeMap<String, BTreeSet<String>>,
    /// VPS in ERROR, with their reasons.
    errors: Vec<(String, String)>,
}

/// `None` while anything is still in motion.
fn settled(c: &Connection) -> anyhow::Result<Option<Settled>> {
    let moving: i64 = c.query_row("SELECT COUNT(*) FROM moves", [], |r| r.get(0))?;
    let busy: i64 = c.query_row(
        "SELECT COUNT(*) FROM vps WHERE state IN ('PENDING', 'SCHEDULED', 'PROVISIONING',
             'MIGRATING', 'DELETING')
           OR (state IN ('RUNNING', 'STOPPED') AND (applied_generation < generation
               OR observed_power = 'absent'
               OR (state = 'RUNNING') <> (desired_power = 'running')))
           OR (state = 'ERROR' AND cleanup_pending = 1)",
        [],
        |r| r.get(0),
    )?;
    if moving > 0 || busy > 0 {
        return Ok(None);
    }
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut q = c.prepare(
        "SELECT host_id, id FROM vps WHERE host_id IS NOT NULL AND state IN ('RUNNING', 'STOPPED')",
    )?;
    for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (h, id) = row?;
        expected.entry(h).or_default().insert(id);
    }
    let mut q = c.prepare("SELECT id, state_reason FROM vps WHERE state = 'ERROR'")?;
    let errors = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(Some(Settled { expected, errors }))
}

/// The domains a simulated host holds, from the file it keeps them in.
fn domains_on(vm_dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let path = vm_dir.join(betang_agent::hypervisor::SIMULATED_STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e.into()),
    };
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v.as_object()
        .map(|o| {
            o.keys()
                .filter_map(|k| k.strip_prefix("betang-").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn dirs_on(vm_dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    match crate::vm_dir_entries(vm_dir) {
        Ok(v) => Ok(v.into_iter().collect()),
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
        {
            Ok(BTreeSet::new())
        }
        Err(e) => Err(e),
    }
}

impl World {
    /// Checks every invariant once the round has settled.
    fn check(&mut self, round: usize, s: &Settled, report: &mut ChaosReport) -> anyhow::Result<()> {
        let c = self.db()?;
        for (id, reason) in &s.errors {
            if self.errors_seen.insert(id.clone()) {
                report.violation(round, "vps_in_error", format!("{id}: {reason}"));
            }
        }
        // Every acknowledged create exists, once.
        for (rid, id) in &self.acked {
            let found: Option<String> = c
                .query_row(
                    "SELECT id FROM vps WHERE request_id = ?1",
                    [format!("{}/{rid}", self.institution)],
                    |r| r.get(0),
                )
                .optional()?;
            if found.as_deref() != Some(id.as_str()) {
                report.violation(
                    round,
                    "acknowledged_request_lost",
                    format!("{rid} answered {id}, the store has {found:?}"),
                );
            }
        }
        // The totals the triggers keep equal the sums.
        let kept = betang_controller::store::totals::kept(&c)?;
        let recounted = betang_controller::store::totals::recounted(&c)?;
        if kept != recounted {
            report.violation(
                round,
                "totals_differ",
                format!("kept {kept:?}, summed {recounted:?}"),
            );
        }
        // No quota exceeded.
        let used: (i64, i64) = c.query_row(
            "SELECT vcpus, vps_count FROM institution_usage WHERE institution_id = ?1",
            [&self.institution],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if used.0 > i64::from(self.quota.vcpus) || used.1 > i64::from(self.quota.vps_count) {
            report.violation(round, "quota_exceeded", format!("{used:?}"));
        }
        // Each host holds exactly what the store puts there.
        for (i, h) in self.host_ids.iter().enumerate() {
            let want = s.expected.get(h).cloned().unwrap_or_default();
            let doms = domains_on(&self.vm_dirs[i])?;
            let dirs = dirs_on(&self.vm_dirs[i])?;
            for extra in doms.difference(&want) {
                report.violation(round, "domain_nobody_owns", format!("{extra} on {h}"));
            }
            for extra in dirs.difference(&want) {
                report.violation(round, "files_nobody_owns", format!("{extra} on {h}"));
            }
            for missing in want.difference(&doms) {
                report.violation(round, "domain_missing", format!("{missing} on {h}"));
            }
            for missing in want.difference(&dirs) {
                report.violation(round, "disk_missing", format!("{missing} on {h}"));
            }
            // The pattern in every disk, written once it first settled.
            for id in want.intersection(&dirs) {
                let disk = self.vm_dirs[i].join(id).join("root.qcow2");
                let text = std::fs::read_to_string(&disk).unwrap_or_default();
                match self.patterns.get(id) {
                    Some(p) if !text.lines().any(|l| l == p) => {
                        report.violation(round, "data_lost", format!("{id} on {h}"));
                    }
                    Some(_) => {}
                    None => {
                        let p = format!("pattern {id} {round}");
                        let mut f = std::fs::OpenOptions::new().append(true).open(&disk)?;
                        std::io::Write::write_all(&mut f, format!("{p}\n").as_bytes())?;
                        self.patterns.insert(id.clone(), p);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs the rounds; the processes and files live in a temporary directory
/// that is removed at the end, the processes killed with it.
pub async fn run(opts: ChaosOptions) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("betang-chaos-").tempdir()?;
    let prefix = format!("chaos{}", opts.seed % 100_000);
    let mut world = World::start(tmp.path(), &opts, &prefix).await?;
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut report = ChaosReport::default();
    for round in 0..opts.rounds {
        let vps = world.list().await.unwrap_or_default();
        let ops = pick_ops(&mut rng, &vps, round);
        report.requests += ops.len() as u64;
        for op in &ops {
            *report.requests_by_kind.entry(op.kind()).or_default() += 1;
        }
        let tasks: Vec<_> = ops
            .iter()
            .cloned()
            .map(|op| {
                tokio::spawn(send(
                    world.endpoint.clone(),
                    world.operator.clone(),
                    world.member.clone(),
                    world.institution.clone(),
                    op,
                ))
            })
            .collect();
        // The fault, at a random moment while the requests are in flight.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
        let victim = rng.usize(0..=world.agents.len());
        let down_for = Duration::from_millis(rng.u64(0..500));
        if victim == world.agents.len() {
            world.controller.kill().await;
            tokio::time::sleep(down_for).await;
            world.controller.start()?;
        } else {
            world.agents[victim].kill().await;
            tokio::time::sleep(down_for).await;
            world.agents[victim].start()?;
        }
        report.faults += 1;
        for t in tasks {
            if let Ok(Some((rid, id))) = t.await {
                report.acknowledged += 1;
                world.acked.insert(rid, id);
            }
        }
        // Settle, then check.
        let deadline = Instant::now() + opts.settle;
        let settled = loop {
            let quiet = matches!(world.db().and_then(|c| settled(&c)), Ok(Some(_)))
                && world.wait_hosts_up(Duration::from_secs(1)).await.is_ok();
            if quiet {
                // Once more after the hosts' next heartbeats, so what they
                // report is in.
                tokio::time::sleep(Duration::from_millis(700)).await;
                if let Ok(Some(s)) = world.db().and_then(|c| settled(&c)) {
                    break Some(s);
                }
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for (i, a) in world.agents.iter_mut().enumerate() {
            if let Some(st) = a.exited() {
                report.violation(round, "process_crashed", format!("agent {i}: {st}"));
                a.start()?;
            }
        }
        if let Some(st) = world.controller.exited() {
            report.violation(round, "process_crashed", format!("controller: {st}"));
            world.controller.start()?;
        }
        match settled {
            Some(s) => world.check(round, &s, &mut report)?,
            None => {
                let stuck = world.db().and_then(|c| {
                    let mut q = c.prepare(
                        "SELECT id, state, state_reason FROM vps WHERE state NOT IN
                             ('RUNNING', 'STOPPED', 'DELETED', 'PENDING_APPROVAL', 'REJECTED',
                              'CANCELLED')
                         UNION ALL SELECT vps_id, 'move ' || step, reason FROM moves",
                    )?;
                    let rows: Vec<String> = q
                        .query_map([], |r| {
                            Ok(format!(
                                "{} {} {}",
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, String>(2)?
                            ))
                        })?
                        .collect::<Result<_, _>>()?;
                    Ok(rows.join("; "))
                });
                report.violation(round, "stuck", stuck.unwrap_or_else(|e| e.to_string()));
            }
        }
        report.rounds += 1;
        if opts.verbose {
            println!(
                "round {round}: {} request(s), fault on {}, {} violation(s) so far",
                ops.len(),
                if victim == world.agents.len() {
                    "the controller".to_owned()
                } else {
                    format!("agent {victim}")
                },
                report.total_violations()
            );
        }
    }
    world.controller.kill().await;
    for a in &mut world.agents {
        a.kill().await;
    }
    if report.total_violations() > 0 {
        // Kept for the person who investigates.
        let kept = tmp.keep();
        report
            .examples
            .push(format!("logs and store kept in {}", kept.display()));
    }
    let _ = &world.dir;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
