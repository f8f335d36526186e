//! Converging one VPS's VM to what the controller asked for. Every operation
//! measures before it acts, so calling it again after a failure or a crash
//! picks up where the last call stopped; a new VM that fails half-way is
//! undone step by step, leaving neither a domain nor files behind.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use betang_proto::v1::{PowerState, VmStatus, VpsSpec};
use tracing::{info, instrument, warn};

mod transfer;

pub use transfer::{CHUNK_BYTES, Incoming};

use crate::{
    config::NetworkConfig,
    digests::{self, DigestCache},
    disks,
    domain_xml::{DomainSpec, DomainType, VpsMetadata},
    error::{AgentError, Result},
    hypervisor::{Blocking, DomainState, Power},
    images::{Catalog, CatalogImage},
    metrics::VmEntry,
    names,
    seed::SeedContent,
    usage::now_ms,
};

/// A domain as the controller hears of it, with what the collector's last
/// snapshot says of it (usage, and whether its guest answers).
fn vm_status(vps_id: &str, state: &DomainState, seen: Option<&VmEntry>) -> VmStatus {
    VmStatus {
        usage: seen.and_then(|v| v.usage),
        unresponsive_since_ms: seen.and_then(|v| v.unresponsive_since_ms).unwrap_or(0),
        vps_id: vps_id.to_owned(),
        power: state.power.to_proto() as i32,
        generation: state.metadata.as_ref().map_or(0, |m| m.generation),
        vcpus: state.vcpus,
        memory_mib: state.memory_kib / 1024,
        domain_name: state.name.clone(),
    }
}

pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct EnsureArgs {
    pub vps_id: String,
    pub spec: VpsSpec,
    pub desired: PowerState,
    pub generation: u64,
    pub stop_timeout: Duration,
    pub force_stop: bool,
    pub institution_id: String,
    /// SHA-256 of the image the VPS was built on ("" for VPS recorded
    /// before digests were kept).
    pub image_digest: String,
    /// Its network, address and MAC, when it has a Betang network.
    pub attachment: Option<crate::attachment::Attachment>,
}

pub struct VmManager {
    hv: Blocking,
    catalog: RwLock<Arc<Catalog>>,
    image_dir: PathBuf,
    vm_dir: PathBuf,
    domain_type: DomainType,
    network: NetworkConfig,
    /// One ensure/delete at a time per VPS; different VPS proceed in parallel.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The background collector's snapshot, which heartbeats report from.
    pub stats: Arc<crate::metrics::StatsCache>,
    digests: Arc<DigestCache>,
}

impl VmManager {
    pub fn new(
        hv: Blocking,
        image_dir: PathBuf,
        vm_dir: PathBuf,
        domain_type: DomainType,
        network: NetworkConfig,
    ) -> Result<Self> {
        std::fs::create_dir_all(&vm_dir).map_err(|e| AgentError::io(&vm_dir, e))?;
        let digests = Arc::new(DigestCache::open(vm_dir.join(digests::CACHE_FILE)));
        let m = VmManager {
            hv,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            image_dir,
            vm_dir,
            domain_type,
            network,
            locks: Mutex::new(HashMap::new()),
            stats: Arc::default(),
            digests,
        };
        m.reload_catalog()?;
        Ok(m)
    }

    pub fn domain_type(&self) -> DomainType {
        self.domain_type
    }

    pub fn vm_dir(&self) -> &Path {
        &self.vm_dir
    }

    pub fn hypervisor(&self) -> &Blocking {
        &self.hv
    }

    pub fn reload_catalog(&self) -> Result<Arc<Catalog>> {
        let c = Arc::new(Catalog::load(
            &self.image_dir,
            self.hv.disk_tool(),
            &self.digests,
        )?);
        for r in &c.refused {
            warn!(entry = %r, "image refused");
        }
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = c.clone();
        Ok(c)
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_for(&self, vps_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vps_id.to_owned())
            .or_default()
            .clone()
    }

    /// The directory of one VPS's files. Only called with a validated id.
    fn dir_of(&self, vps_id: &str) -> PathBuf {
        self.vm_dir.join(vps_id)
    }

    /// The running guest's console pty.
    pub async fn console_pty(&self, vps_id: &str) -> Result<PathBuf> {
        names::check_vps_id(vps_id)?;
        let name = names::domain_name(vps_id);
        self.hv
            .call(move |hv| hv.console_pty(&name))
            .await?
            .ok_or_else(|| AgentError::InvalidArgument {
                field: "vps_id",
                rule: format!("VPS {vps_id} is not running here: its console exists while it runs"),
            })
    }

    pub fn serial_log(&self, vps_id: &str) -> Result<PathBuf> {
        names::check_vps_id(vps_id)?;
        Ok(self.dir_of(vps_id).join(SERIAL_LOG))
    }

    #[instrument(skip_all, fields(vps_id = %args.vps_id, generation = args.generation))]
    pub async fn ensure(&self, args: EnsureArgs) -> Result<VmStatus> {
        names::check_vps_id(&args.vps_id)?;
        check_spec(&args.spec)?;
        let desired = match args.desired {
            PowerState::Running | PowerState::Stopped => args.desired,
            other => {
                return Err(AgentError::InvalidArgument {
                    field: "desired_power",
                    rule: format!("must be RUNNING or STOPPED, not {}", other.as_str_name()),
                });
            }
        };
        let lock = self.lock_for(&args.vps_id);
        let _guard = lock.lock().await;
        let name = names::domain_name(&args.vps_id);
        // Pulling the plug needs no answer from the guest; anything else
        // would only add a thread waiting on it.
        if !(desired == PowerState::Stopped && args.force_stop) {
            self.refuse_if_unresponsive(&args.vps_id, &name)?;
        }
        let existing = self
            .hv
            .call({
                let name = name.clone();
                move |hv| hv.lookup(&name)
            })
            .await?;
        let meta = VpsMetadata {
            vps_id: args.vps_id.clone(),
            generation: args.generation,
            name: args.spec.name.clone(),
            institution: args.institution_id.clone(),
            network: args
                .attachment
                .as_ref()
                .map(|a| a.network.clone())
                .unwrap_or_default(),
            address: args
                .attachment
                .as_ref()
                .map(|a| a.ip.to_string())
                .unwrap_or_default(),
        };
        match existing {
            // The create applied the desired power and saw the result.
            None => {
                let state = self.create(&args, &name, &meta, desired).await?;
                return Ok(self.reported(&args.vps_id, &state));
            }
            Some(state) => {
                self.apply_size(&args, &name, &meta, &state).await?;
                // Power first: on a running guest the metadata is changed
                // through its monitor too, which a hung guest never answers,
                // while a forced stop needs no answer from it.
                self.converge_power(&name, desired, args.stop_timeout, args.force_stop)
                    .await?;
                let known = state.metadata.as_ref().map_or(0, |m| m.generation);
                if args.generation > known {
                    self.hv
                        .call({
                            let (name, meta) = (name.clone(), meta.clone());
                            move |hv| hv.set_metadata(&name, &meta)
                        })
                        .await?;
                }
            }
        }
        let state = self
            .hv
            .call(move |hv| hv.lookup(&name))
            .await?
            .ok_or_else(|| AgentError::NoSuchVm(args.vps_id.clone()))?;
        Ok(self.reported(&args.vps_id, &state))
    }

    /// What an ensure answers: the domain as it is now, with the usage of
    /// the collector's last pass. The controller records only the power;
    /// usage reaches it with heartbeats, so an ensure never waits on a
    /// guest's statistics.
    fn reported(&self, vps_id: &str, state: &DomainState) -> VmStatus {
        vm_status(vps_id, state, self.stats.snapshot().vm(&state.name))
    }

    /// Refuses, at once, work that needs an answer from a guest whose QEMU
    /// has stopped answering.
    fn refuse_if_unresponsive(&self, vps_id: &str, domain: &str) -> Result<()> {
        let since = self
            .stats
            .snapshot()
            .vm(domain)
            .and_then(|v| v.unresponsive_since_ms);
        match since {
            Some(ms) => Err(AgentError::GuestNotAnswering {
                vps_id: vps_id.to_owned(),
                silent_for: Duration::from_millis((now_ms() - ms).max(0) as u64),
            }),
            None => Ok(()),
        }
    }

    /// Disk, seed, define (and start when asked). A disk the VPS already has
    /// is used as it is, or not at all (`check_existing_disk`); a new one is
    /// made from the catalogue. Each step this call took is undone if a later
    /// one fails, and nothing else. Returns the new domain as the hypervisor
    /// then sees it.
    async fn create(
        &self,
        args: &EnsureArgs,
        name: &str,
        meta: &VpsMetadata,
        desired: PowerState,
    ) -> Result<DomainState> {
        let dir = self.dir_of(&args.vps_id);
        let root = dir.join(ROOT_DISK);
        // Only "not found" means there is no disk: a file that cannot even be
        // looked at may still be one.
        let had_disk = present(&root).map_err(|e| AgentError::DiskMismatch {
            path: root.display().to_string(),
            what: format!("it could not be looked at ({e})"),
        })?;
        let new_disk = if had_disk {
            self.check_existing_disk(&root, args).await?;
            None
        } else {
            Some(self.image_for_new_disk(args)?)
        };
        let created_dir = !present(&dir)?;
        let made_disk = Arc::new(AtomicBool::new(false));
        let result = self
            .create_steps(args, name, meta, desired, new_disk, &dir, made_disk.clone())
            .await;
        let Err(e) = result else {
            return result;
        };
        warn!(error = %e, "provisioning failed; undoing what this call did");
        let undo_name = name.to_owned();
        match self.hv.call(move |hv| hv.undefine(&undo_name)).await {
            Ok(()) => undo_files(&dir, made_disk.load(Ordering::SeqCst), created_dir),
            // The domain may still stand on the new disk: both stay, and the
            // next ensure finds the domain and carries on from there.
            Err(u) => warn!(error = %u, "the domain could not be undefined; its files stay"),
        }
        if had_disk {
            // Not the disk's fault, but the controller must not clean up
            // after this failure: that would remove the disk.
            return Err(AgentError::KeptDisk {
                path: root.display().to_string(),
                source: Box::new(e),
            });
        }
        Err(e)
    }

    /// The catalogue's image of that name, reading the catalogue again when
    /// it does not have it (an image added since the agent started).
    fn catalogue_image(&self, name: &str) -> Result<CatalogImage> {
        match self.catalog().get(name).cloned() {
            Some(i) => Ok(i),
            None => self
                .reload_catalog()?
                .get(name)
                .cloned()
                .ok_or_else(|| AgentError::UnknownImage(name.to_owned())),
        }
    }

    /// The catalogue image a new disk is made from: the one named, with the
    /// content the VPS was built on, and large enough.
    fn image_for_new_disk(&self, args: &EnsureArgs) -> Result<(PathBuf, u64)> {
        let image = self.catalogue_image(&args.spec.image)?;
        check_image_digest(&image, &args.image_digest)?;
        let disk_bytes = args.spec.disk_gib.saturating_mul(disks::GIB);
        if disk_bytes < image.virtual_size {
            return Err(AgentError::InvalidArgument {
                field: "disk_gib",
                rule: format!(
                    "image {} needs at least {} GiB, {} GiB was asked",
                    image.name,
                    image.min_disk_gib(),
                    args.spec.disk_gib
                ),
            });
        }
        Ok((image.path, disk_bytes))
    }

    /// A disk that is already there (a domain lost from libvirt, an
    /// interrupted ensure, a move) is used only when it is a plain overlay
    /// standing on the base the VPS was built on, known by its digest.
    /// Anything else is kept as it is and refused with a reason for a person:
    /// it may hold the tenant's data. Nothing here writes to the disk.
    async fn check_existing_disk(&self, root: &Path, args: &EnsureArgs) -> Result<()> {
        let want = args.image_digest.clone();
        let image_name = args.spec.image.clone();
        let catalogue = self.catalog().get(&image_name).cloned();
        let (root, cache) = (root.to_path_buf(), self.digests.clone());
        self.hv
            .disks(move |disks| {
                let kept = |what: String| AgentError::DiskMismatch {
                    path: root.display().to_string(),
                    what,
                };
                // The agent makes disks as regular files; a link or anything
                // else was put there by someone else.
                let meta = std::fs::symlink_metadata(&root)
                    .map_err(|e| kept(format!("it could not be looked at ({e})")))?;
                if !meta.is_file() {
                    return Err(kept("it is not a regular file".to_owned()));
                }
                let base = disks
                    .backing_of(&root)
                    .map_err(|e| kept(format!("it could not be read as a disk ({e})")))?;
                let have = cache.digest(disks, &base).map_err(|e| {
                    kept(format!(
                        "its base {} could not be read ({e})",
                        base.display()
                    ))
                })?;
                let matches = if want.is_empty() {
                    // Recorded before digests were kept: the catalogue's
                    // file, or a file with the same content.
                    catalogue
                        .as_ref()
                        .is_some_and(|i| i.path == base || i.digest == have)
                } else {
                    have == want
                };
                if matches {
                    return Ok(());
                }
                let built_on = if want.is_empty() {
                    match &catalogue {
                        Some(i) => format!(
                            "the catalogue's {} is {} (sha256 {})",
                            i.name,
                            i.path.display(),
                            digests::short(&i.digest)
                        ),
                        None => format!("the catalogue has no image {image_name}"),
                    }
                } else {
                    format!("the VPS was built on sha256 {}", digests::short(&want))
                };
                Err(kept(format!(
                    "it is based on {} (sha256 {}), but {built_on}",
                    base.display(),
                    digests::short(&have)
                )))
            })
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_steps(
        &self,
        args: &EnsureArgs,
        name: &str,
        meta: &VpsMetadata,
        desired: PowerState,
        new_disk: Option<(PathBuf, u64)>,
        dir: &Path,
        made_disk: Arc<AtomicBool>,
    ) -> Result<DomainState> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        let root = dir.join(ROOT_DISK);
        let seed = dir.join(SEED_DISK);
        let d = dir.to_path_buf();
        let content = SeedContent {
            instance_id: args.vps_id.clone(),
            hostname: args.spec.name.clone(),
            ssh_public_key: args.spec.ssh_public_key.clone(),
            user_data: args.spec.user_data.clone(),
            network: args.attachment.clone(),
        };
        // Both disks in one trip to the blocking pool (and the domain in
        // one more): the hand-over costs more than a simulated host's work.
        // Each is made under a temporary name and renamed when complete, so
        // a half-made file never looks like a disk.
        self.hv
            .disks(move |disks| {
                if let Some((base, bytes)) = new_disk {
                    let part = d.join(ROOT_PART);
                    remove_temporary(&part)?;
                    disks.create_overlay(&base, &part, bytes)?;
                    commit_new_file(&part, &root, &d, &made_disk)?;
                }
                // The seed holds no tenant data and is written anew each
                // time, so it may replace the one there.
                let part = d.join(SEED_PART);
                remove_temporary(&part)?;
                disks.write_seed(&part, &content)?;
                commit_file(&part, &seed, &d)
            })
            .await?;
        let xml = self.domain_xml(args, name, meta, dir)?;
        let (n, running) = (name.to_owned(), desired == PowerState::Running);
        let state = self
            .hv
            .call(move |hv| {
                hv.define(&xml)?;
                hv.set_autostart(&n, running)?;
                if running {
                    hv.start(&n)?;
                }
                hv.lookup(&n)?.ok_or(AgentError::NoSuchVm(n))
            })
            .await?;
        info!(domain = %name, "VM defined");
        Ok(state)
    }

    fn domain_xml(
        &self,
        args: &EnsureArgs,
        name: &str,
        meta: &VpsMetadata,
        dir: &Path,
    ) -> Result<String> {
        DomainSpec {
            domain_type: self.domain_type,
            name: name.to_owned(),
            uuid: args.vps_id.clone(),
            title: args.spec.name.clone(),
            metadata: meta.clone(),
            vcpus: args.spec.vcpus,
            memory_mib: args.spec.memory_mib,
            root_disk: dir.join(ROOT_DISK),
            seed_disk: dir.join(SEED_DISK),
            serial_log: dir.join(SERIAL_LOG),
            network: self.network.clone(),
            attachment: args.attachment.clone(),
        }
        .to_xml()
    }

    /// A stopped guest takes a new size: the domain is redefined with the new
    /// vCPUs and memory, and its disk grows (never shrinks). A running guest
    /// keeps its size until it is stopped.
    async fn apply_size(
        &self,
        args: &EnsureArgs,
        name: &str,
        meta: &VpsMetadata,
        state: &DomainState,
    ) -> Result<()> {
        if state.power != Power::Stopped {
            return Ok(());
        }
        let dir = self.dir_of(&args.vps_id);
        if state.vcpus != args.spec.vcpus || state.memory_kib != args.spec.memory_mib * 1024 {
            let xml = self.domain_xml(args, name, meta, &dir)?;
            self.hv.call(move |hv| hv.define(&xml)).await?;
            info!(
                vcpus = args.spec.vcpus,
                memory_mib = args.spec.memory_mib,
                "resized"
            );
        }
        let root = dir.join(ROOT_DISK);
        let want = args.spec.disk_gib.saturating_mul(disks::GIB);
        self.hv.disks(move |disks| disks.grow(&root, want)).await?;
        Ok(())
    }

    async fn converge_power(
        &self,
        name: &str,
        desired: PowerState,
        stop_timeout: Duration,
        force: bool,
    ) -> Result<()> {
        let running = desired == PowerState::Running;
        let n = name.to_owned();
        let power = self
            .hv
            .call(move |hv| {
                hv.set_autostart(&n, running)?;
                hv.lookup(&n)?
                    .map(|s| s.power)
                    .ok_or_else(|| AgentError::NoSuchVm(n.clone()))
            })
            .await?;
        match (desired, power) {
            (PowerState::Running, Power::Stopped | Power::Crashed) => {
                let n = name.to_owned();
                self.hv.call(move |hv| hv.start(&n)).await?;
                info!(domain = %name, "started");
            }
            (PowerState::Stopped, Power::Running | Power::Paused) => {
                self.stop(name, stop_timeout.min(MAX_STOP_TIMEOUT), force)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// ACPI power button, then wait; pull the plug when the guest does not
    /// power off in time.
    async fn stop(&self, name: &str, timeout: Duration, force: bool) -> Result<()> {
        if !force {
            let n = name.to_owned();
            self.hv.call(move |hv| hv.shutdown(&n)).await?;
            let deadline = tokio::time::Instant::now() + timeout;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let n = name.to_owned();
                let state = self.hv.call(move |hv| hv.lookup(&n)).await?;
                if state.is_none_or(|s| s.power == Power::Stopped) {
                    info!(domain = %name, "stopped gracefully");
                    return Ok(());
                }
            }
            warn!(domain = %name, ?timeout, "guest did not power off in time; forcing");
        }
        let n = name.to_owned();
        self.hv.call(move |hv| hv.destroy(&n)).await?;
        info!(domain = %name, "stopped by force");
        Ok(())
    }

    #[instrument(skip(self))]
    pub async fn delete(&self, vps_id: &str) -> Result<()> {
        names::check_vps_id(vps_id)?;
        let lock = self.lock_for(vps_id);
        let _guard = lock.lock().await;
        let name = names::domain_name(vps_id);
        self.hv.call(move |hv| hv.undefine(&name)).await?;
        let dir = self.dir_of(vps_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io(&dir, e)),
        }
        info!("VM deleted");
        Ok(())
    }

    #[instrument(skip(self))]
    pub async fn reboot(&self, vps_id: &str, force: bool) -> Result<VmStatus> {
        names::check_vps_id(vps_id)?;
        let name = names::domain_name(vps_id);
        // Even a reset goes through the guest's monitor.
        self.refuse_if_unresponsive(vps_id, &name)?;
        self.hv.call(move |hv| hv.reboot(&name, force)).await?;
        self.status(vps_id).await
    }

    pub async fn status(&self, vps_id: &str) -> Result<VmStatus> {
        let name = names::domain_name(vps_id);
        let state = self
            .hv
            .quick(move |hv| hv.lookup(&name))
            .await?
            .ok_or_else(|| AgentError::NoSuchVm(vps_id.to_owned()))?;
        Ok(self.reported(vps_id, &state))
    }

    /// Every VM this agent owns, with its usage from the collector's last
    /// snapshot: listing never waits on a guest, and a libvirtd that does not
    /// answer is an error within the watchdog's patience.
    pub async fn list(&self) -> Result<Vec<VmStatus>> {
        let states = self.hv.quick(|hv| hv.list_owned()).await?;
        let snapshot = self.stats.snapshot();
        Ok(states
            .iter()
            .filter_map(|s| {
                let id = names::vps_id_of_domain(&s.name)?;
                Some(vm_status(id, s, snapshot.vm(&s.name)))
            })
            .collect())
    }

    /// The VPS ids that have a directory under `vm_dir`, whatever is in it;
    /// the controller shows those no VPS owns. A directory read is cheap.
    pub fn vm_dirs(&self) -> Result<Vec<String>> {
        let entries =
            std::fs::read_dir(&self.vm_dir).map_err(|e| AgentError::io(&self.vm_dir, e))?;
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| AgentError::io(&self.vm_dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // The entry's own type: no stat per directory.
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && names::check_vps_id(&name).is_ok() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Adopts the domains libvirt already has (after an agent restart, a
    /// libvirtd restart or a host reboot) and restarts those that crashed
    /// while they should run. Desired power is what the last ensure recorded
    /// in the domain's autostart flag. Running guests are never touched, and a
    /// guest that powered itself off is left off: the controller hears of it
    /// from the next heartbeat and records it as stopped.
    pub async fn reconcile(&self) -> Result<usize> {
        let states = self.hv.call(|hv| hv.list_owned()).await?;
        let count = states.len();
        for s in states {
            let Some(id) = names::vps_id_of_domain(&s.name) else {
                continue;
            };
            if s.metadata.as_ref().is_none_or(|m| m.vps_id != id) {
                warn!(domain = %s.name, "domain has Betang's prefix but no matching metadata; left alone");
                continue;
            }
            if s.autostart && s.power == Power::Crashed {
                warn!(domain = %s.name, vps_id = %id, "crashed guest; starting it again");
                let n = s.name.clone();
                if let Err(e) = self
                    .hv
                    .call(move |hv| {
                        hv.destroy(&n)?;
                        hv.start(&n)
                    })
                    .await
                {
                    warn!(domain = %s.name, error = %e, "restart failed");
                }
            }
        }
        Ok(count)
    }
}

/// The names of a VPS's files in its directory.
const ROOT_DISK: &str = "root.qcow2";
const ROOT_PART: &str = "root.qcow2.part";
const SEED_DISK: &str = "seed.img";
const SEED_PART: &str = "seed.img.part";
const SERIAL_LOG: &str = "console.log";

/// Whether something is at `path`, whatever it is (a dangling link counts).
/// Only "not found" is an answer of no: a directory that cannot be read
/// never passes for an empty one.
fn present(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(AgentError::io(path, e)),
    }
}

/// A new image that is not the content the VPS was built on is refused
/// before anything is made. An empty digest (a VPS recorded before digests
/// were kept, or a new one) takes the catalogue's image as it is.
fn check_image_digest(image: &CatalogImage, want: &str) -> Result<()> {
    if want.is_empty() || image.digest == want {
        return Ok(());
    }
    Err(AgentError::ImageChanged {
        image: image.name.clone(),
        have: digests::short(&image.digest).to_owned(),
        want: digests::short(want).to_owned(),
        file: image.path.display().to_string(),
    })
}

/// Removes a temporary file an interrupted call may have left. Only ever
/// called with a `.part` name, which no disk has.
fn remove_temporary(part: &Path) -> Result<()> {
    match std::fs::remove_file(part) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(part, e)),
    }
}

fn sync_path(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| AgentError::io(p, e))
}

/// Gives a finished file its real name, durably: its data, then the name.
/// Replaces what had that name; only for files that hold no tenant data.
fn commit_file(part: &Path, to: &Path, dir: &Path) -> Result<()> {
    sync_path(part)?;
    std::fs::rename(part, to).map_err(|e| AgentError::io(to, e))?;
    sync_path(dir)
}

/// Gives a finished new disk its real name, durably, and never in place of
/// a file already there: a hard link fails when the name is taken, where a
/// rename would replace it. `made` is set once the name is this call's, so
/// an undo removes the disk only then.
fn commit_new_file(part: &Path, to: &Path, dir: &Path, made: &AtomicBool) -> Result<()> {
    sync_path(part)?;
    std::fs::hard_link(part, to).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => AgentError::DiskMismatch {
            path: to.display().to_string(),
            what: "it appeared while a new disk was being made, and was not replaced".to_owned(),
        },
        _ => AgentError::io(to, e),
    })?;
    made.store(true, Ordering::SeqCst);
    remove_temporary(part)?;
    sync_path(dir)
}

/// Removes what a failed create made, by name, and nothing else: the new
/// disk when this call made it (never one that was there before), the
/// temporary files, and, in a directory this call made, the seed, the
/// console log and then the directory, which stays if anything else is in it.
fn undo_files(dir: &Path, made_disk: bool, created_dir: bool) {
    let mut made = vec![ROOT_PART, SEED_PART];
    if made_disk {
        made.push(ROOT_DISK);
    }
    if created_dir {
        made.extend([SEED_DISK, SERIAL_LOG]);
    }
    for f in made {
        let p = dir.join(f);
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %p.display(), error = %e, "could not remove a file this call made");
        }
    }
    if created_dir && let Err(e) = std::fs::remove_dir(dir) {
        warn!(path = %dir.display(), error = %e, "the VPS's directory stays");
    }
}

/// The agent checks what it relies on itself; the controller's validation is
/// stricter and speaks to people.
fn check_spec(spec: &VpsSpec) -> Result<()> {
    names::check_hostname(&spec.name)?;
    names::check_image_name(&spec.image)?;
    let bad = |field: &'static str, rule: &str| {
        Err(AgentError::InvalidArgument {
            field,
            rule: rule.to_owned(),
        })
    };
    if spec.vcpus == 0 || spec.vcpus > 256 {
        return bad("vcpus", "must be between 1 and 256");
    }
    if spec.memory_mib < 16 || spec.memory_mib > 4 * 1024 * 1024 {
        return bad("memory_mib", "must be between 16 and 4194304");
    }
    if spec.disk_gib == 0 || spec.disk_gib > 64 * 1024 {
        return bad("disk_gib", "must be between 1 and 65536");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        disks::DiskTool,
        hypervisor::{Hypervisor, NodeFacts, SimulatedHypervisor},
    };

    struct Host {
        _dir: tempfile::TempDir,
        images: PathBuf,
        vms: VmManager,
        hv: Arc<SimulatedHypervisor>,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("v1.img"), "the first build\n").unwrap();
        std::fs::write(images.join("v2.img"), "a refreshed build\n").unwrap();
        point_catalogue(&images, "v1.img");
        let hv = Arc::new(SimulatedHypervisor::new(NodeFacts {
            cpus: 4,
            memory_kib: 4 << 20,
        }));
        let vms = VmManager::new(
            Blocking::new(
                hv.clone(),
                Duration::from_secs(5),
                crate::hypervisor::Watchdog::new(Duration::from_secs(5)),
            ),
            images.clone(),
            dir.path().join("vms"),
            DomainType::Qemu,
            NetworkConfig::None,
        )
        .unwrap();
        Host {
            _dir: dir,
            images,
            vms,
            hv,
        }
    }

    fn point_catalogue(images: &Path, file: &str) {
        std::fs::write(
            images.join(crate::images::MANIFEST),
            format!("[[image]]\nname = \"tiny\"\nfile = \"{file}\"\n"),
        )
        .unwrap();
    }

    fn args(id: &str, digest: &str) -> EnsureArgs {
        EnsureArgs {
            vps_id: id.into(),
            spec: VpsSpec {
                name: "web".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
                image: "tiny".into(),
                ..Default::default()
            },
            desired: PowerState::Stopped,
            generation: 1,
            stop_timeout: Duration::from_secs(1),
            force_stop: true,
            institution_id: "inst".into(),
            image_digest: digest.into(),
            attachment: None,
        }
    }

    const ID: &str = "01234567-89ab-cdef-0123-456789abcdef";

    /// The tenant's disk after a pattern was written into it.
    fn write_pattern(h: &Host) -> (PathBuf, String) {
        let root = h.vms.vm_dir().join(ID).join("root.qcow2");
        let mut text = std::fs::read_to_string(&root).unwrap();
        text.push_str("tenant data 0xab\n");
        std::fs::write(&root, &text).unwrap();
        (root, text)
    }

    #[tokio::test]
    async fn a_lost_domain_comes_back_on_the_disk_it_had_after_an_image_refresh() {
        let h = host();
        let v1 = crate::digests::sha256_file(&h.images.join("v1.img")).unwrap();
        h.vms.ensure(args(ID, &v1)).await.unwrap();
        let (root, text) = write_pattern(&h);
        // A refreshed image under the same name; the domain is lost.
        point_catalogue(&h.images, "v2.img");
        h.vms.reload_catalog().unwrap();
        h.hv.undefine(&names::domain_name(ID)).unwrap();
        let st = h.vms.ensure(args(ID, &v1)).await.unwrap();
        assert_eq!(st.power, PowerState::Stopped as i32);
        assert_eq!(std::fs::read_to_string(&root).unwrap(), text, "data kept");
        // A new VPS asking for the old content is refused: the catalogue
        // no longer has it, and nothing is made.
        let other = "11234567-89ab-cdef-0123-456789abcdef";
        let e = h.vms.ensure(args(other, &v1)).await.unwrap_err();
        assert!(matches!(e, AgentError::ImageChanged { .. }), "{e}");
        assert!(!h.vms.vm_dir().join(other).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_guest_is_refused_at_once_except_a_forced_stop() {
        let h = host();
        let v1 = crate::digests::sha256_file(&h.images.join("v1.img")).unwrap();
        let mut run = args(ID, &v1);
        run.desired = PowerState::Running;
        h.vms.ensure(run).await.unwrap();
        let collector = crate::metrics::Collector::new(
            h.vms.hypervisor().clone(),
            h.vms.stats.clone(),
            Arc::new(crate::usage::HostSampler::default()),
            h.vms.vm_dir().to_owned(),
            Duration::from_millis(50),
            Duration::from_millis(100),
        );
        let name = names::domain_name(ID);
        h.hv.hang(&name);
        for _ in 0..40 {
            collector.pass_once().await;
            let seen = h.vms.stats.snapshot();
            if seen
                .vm(&name)
                .is_some_and(|v| v.unresponsive_since_ms.is_some())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listed = h.vms.list().await.unwrap();
        assert!(listed[0].unresponsive_since_ms > 0, "the heartbeat says so");
        // A graceful stop needs the guest: refused at once, no thread added.
        let running = h.vms.hypervisor().watchdog().running();
        let t = std::time::Instant::now();
        let mut stop = args(ID, &v1);
        stop.force_stop = false;
        let e = h.vms.ensure(stop).await.unwrap_err();
        assert!(matches!(e, AgentError::GuestNotAnswering { .. }), "{e}");
        assert!(
            e.to_string().contains("only a forced stop or a delete"),
            "{e}"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        assert!(h.vms.reboot(ID, true).await.is_err());
        assert!(t.elapsed() < Duration::from_millis(500));
        assert_eq!(h.vms.hypervisor().watchdog().running(), running);
        // Pulling the plug needs no answer from it.
        let mut force = args(ID, &v1);
        force.generation = 2;
        let st = h.vms.ensure(force).await.unwrap();
        assert_eq!(st.power, PowerState::Stopped as i32);
        assert_eq!(st.generation, 2);
    }

    #[tokio::test]
    async fn a_disk_that_does_not_match_is_kept_and_refused() {
        let h = host();
        let v1 = crate::digests::sha256_file(&h.images.join("v1.img")).unwrap();
        h.vms.ensure(args(ID, &v1)).await.unwrap();
        let (root, text) = write_pattern(&h);
        h.hv.undefine(&names::domain_name(ID)).unwrap();
        // The base overwritten in place: another digest under the same name.
        std::fs::write(h.images.join("v1.img"), "overwritten in place\n").unwrap();
        h.vms.reload_catalog().unwrap();
        let e = h.vms.ensure(args(ID, &v1)).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AgentError::DiskMismatch { .. }), "{msg}");
        assert!(
            msg.contains("root.qcow2 was kept") && msg.contains("sha256"),
            "{msg}"
        );
        assert_eq!(std::fs::read_to_string(&root).unwrap(), text, "not touched");
        assert!(h.hv.lookup(&names::domain_name(ID)).unwrap().is_none());
        // Nor is a file that is no disk at all replaced.
        std::fs::write(&root, "not a disk").unwrap();
        let e = h.vms.ensure(args(ID, "")).await.unwrap_err();
        assert!(e.to_string().contains("could not be read"), "{e}");
        assert_eq!(std::fs::read_to_string(&root).unwrap(), "not a disk");
        // Only a delete removes it.
        h.vms.delete(ID).await.unwrap();
        assert!(!root.exists());
    }

    #[tokio::test]
    async fn a_disk_arrives_only_on_the_same_image_and_never_over_another() {
        let h = host();
        let v1 = crate::digests::sha256_file(&h.images.join("v1.img")).unwrap();
        let v2 = crate::digests::sha256_file(&h.images.join("v2.img")).unwrap();
        let incoming = |digest: &str| {
            let data = b"betang-simulated-overlay\n/elsewhere/v1.img\n1073741824\n".to_vec();
            futures::stream::iter(vec![Ok(Incoming {
                vps_id: ID.into(),
                image: "tiny".into(),
                total_bytes: data.len() as u64,
                data,
                image_digest: digest.into(),
            })])
        };
        let e = h.vms.import_disk(incoming(&v2)).await.unwrap_err();
        assert!(matches!(e, AgentError::ImageChanged { .. }), "{e}");
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::FailedPrecondition
        );
        assert!(!h.vms.vm_dir().join(ID).exists(), "nothing left behind");
        // A transfer cut short leaves no temporary file either.
        let short = futures::stream::iter(vec![Ok(Incoming {
            vps_id: ID.into(),
            image: "tiny".into(),
            total_bytes: 1 << 20,
            data: b"betang-simulated-overlay\n".to_vec(),
            image_digest: v1.clone(),
        })]);
        let e = h.vms.import_disk(short).await.unwrap_err();
        assert!(e.to_string().contains("were announced"), "{e}");
        assert!(!h.vms.vm_dir().join(ID).exists(), "nothing left behind");
        h.vms.import_disk(incoming(&v1)).await.unwrap();
        let root = h.vms.vm_dir().join(ID).join("root.qcow2");
        assert!(std::fs::read_to_string(&root).unwrap().contains("v1.img"));
        let e = h.vms.import_disk(incoming(&v1)).await.unwrap_err();
        assert!(e.to_string().contains("already has a disk"), "{e}");
    }

    #[tokio::test]
    async fn a_failed_build_undoes_only_what_it_made() {
        let h = host();
        let v1 = crate::digests::sha256_file(&h.images.join("v1.img")).unwrap();
        // A directory with something of someone else's in it, and a seed
        // that cannot be written (its temporary name taken by a directory).
        let dir = h.vms.vm_dir().join(ID);
        std::fs::create_dir_all(dir.join(SEED_PART)).unwrap();
        std::fs::write(dir.join("notes.txt"), "an operator's").unwrap();
        let e = h.vms.ensure(args(ID, &v1)).await.unwrap_err();
        assert!(!matches!(e, AgentError::KeptDisk { .. }), "{e}");
        assert!(!dir.join(ROOT_DISK).exists(), "the new disk is undone");
        assert_eq!(
            std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
            "an operator's"
        );
        assert!(h.hv.lookup(&names::domain_name(ID)).unwrap().is_none());
        // With a disk that was there, the same failure keeps it and says so.
        std::fs::remove_dir(dir.join(SEED_PART)).unwrap();
        h.vms.ensure(args(ID, &v1)).await.unwrap();
        let (root, text) = write_pattern(&h);
        h.hv.undefine(&names::domain_name(ID)).unwrap();
        std::fs::create_dir_all(dir.join(SEED_PART)).unwrap();
        let e = h.vms.ensure(args(ID, &v1)).await.unwrap_err();
        assert!(matches!(e, AgentError::KeptDisk { .. }), "{e}");
        let status = tonic::Status::from(e);
        assert!(
            status
                .metadata()
                .contains_key(crate::error::DISK_KEPT_METADATA)
        );
        assert_eq!(std::fs::read_to_string(&root).unwrap(), text, "not touched");
    }

    /// Real qcow2 files made and read by `qemu-img`, on libvirt's test
    /// driver: base A, and A2, a copy of it with other content.
    struct RealHost {
        _dir: tempfile::TempDir,
        images: PathBuf,
        vms: VmManager,
        hv: Arc<crate::hypervisor::LibvirtHypervisor>,
        a: String,
        a2: String,
    }

    fn qemu(program: &str, args: &[&str], file: &Path) {
        let out = std::process::Command::new(program)
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write_bytes(file: &Path, pattern: &str) {
        let cmd = format!("write -P {pattern} 0 64k");
        qemu("qemu-io", &["-f", "qcow2", "-c", &cmd], file);
    }

    fn reads_bytes(file: &Path, pattern: &str) -> bool {
        let cmd = format!("read -P {pattern} 0 64k");
        // qemu-io fails a read whose bytes differ from the pattern.
        std::process::Command::new("qemu-io")
            .args(["-r", "-U", "-f", "qcow2", "-c", &cmd])
            .arg(file)
            .output()
            .unwrap()
            .status
            .success()
    }

    fn real_host() -> RealHost {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let a = images.join("a.qcow2");
        qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", "size=64M"],
            &a,
        );
        write_bytes(&a, "0x11");
        let a2 = images.join("a2.qcow2");
        std::fs::copy(&a, &a2).unwrap();
        write_bytes(&a2, "0x22");
        point_catalogue(&images, "a.qcow2");
        let hv = Arc::new(crate::hypervisor::LibvirtHypervisor::new("test:///default").unwrap());
        let vms = VmManager::new(
            Blocking::new(
                hv.clone(),
                Duration::from_secs(10),
                crate::hypervisor::Watchdog::new(Duration::from_secs(10)),
            ),
            images.clone(),
            dir.path().join("vms"),
            DomainType::Qemu,
            NetworkConfig::None,
        )
        .unwrap();
        RealHost {
            a: crate::digests::sha256_file(&a).unwrap(),
            a2: crate::digests::sha256_file(&a2).unwrap(),
            _dir: dir,
            images,
            vms,
            hv,
        }
    }

    fn sha(p: &Path) -> String {
        crate::digests::sha256_file(p).unwrap()
    }

    #[tokio::test]
    async fn a_real_disk_is_used_again_on_its_old_base_or_kept_byte_for_byte() {
        let id = "31234567-89ab-cdef-0123-456789abcdef";
        let h = real_host();
        assert_ne!(h.a, h.a2);
        h.vms.ensure(args(id, &h.a)).await.unwrap();
        let root = h.vms.vm_dir().join(id).join(ROOT_DISK);
        write_bytes(&root, "0xab");
        let before = sha(&root);
        let domain = names::domain_name(id);
        // The image is refreshed (the entry now names A2) and the domain is
        // lost: the disk still stands on A, which the VPS was built on.
        point_catalogue(&h.images, "a2.qcow2");
        h.vms.reload_catalog().unwrap();
        h.hv.undefine(&domain).unwrap();
        h.vms.ensure(args(id, &h.a)).await.unwrap();
        assert!(h.hv.lookup(&domain).unwrap().is_some(), "defined again");
        assert_eq!(sha(&root), before, "the disk is used as it is");
        assert!(reads_bytes(&root, "0xab"), "the tenant's data is there");
        assert!(!reads_bytes(&root, "0x22"), "and not A2's");
        // A VPS said to be built on A2 does not take a disk based on A.
        h.hv.undefine(&domain).unwrap();
        let e = h.vms.ensure(args(id, &h.a2)).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AgentError::DiskMismatch { .. }), "{msg}");
        assert!(
            msg.contains(&root.display().to_string())
                && msg.contains(&h.images.join("a.qcow2").display().to_string())
                && msg.contains(crate::digests::short(&h.a))
                && msg.contains(crate::digests::short(&h.a2)),
            "{msg}"
        );
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status
                .metadata()
                .contains_key(crate::error::DISK_KEPT_METADATA)
        );
        assert_eq!(sha(&root), before, "kept byte for byte");
        assert!(h.hv.lookup(&domain).unwrap().is_none(), "nothing defined");
        // Recorded before digests were kept: neither A2's file nor its
        // content is what the disk stands on.
        let e = h.vms.ensure(args(id, "")).await.unwrap_err();
        assert!(matches!(e, AgentError::DiskMismatch { .. }), "{e}");
        assert_eq!(sha(&root), before);
        // ... but the catalogue's file is.
        point_catalogue(&h.images, "a.qcow2");
        h.vms.reload_catalog().unwrap();
        h.vms.ensure(args(id, "")).await.unwrap();
        assert_eq!(sha(&root), before);
        h.vms.delete(id).await.unwrap();
        assert!(!h.vms.vm_dir().join(id).exists());
    }

    /// An ensure that must refuse the disk there, say `what` and keep it.
    async fn refused(vms: &VmManager, id: &str, digest: &str, root: &Path, what: String) {
        let before = sha(root);
        let e = vms.ensure(args(id, digest)).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AgentError::DiskMismatch { .. }), "{msg}");
        assert!(msg.contains(&what), "{msg}");
        assert_eq!(sha(root), before, "kept byte for byte");
    }

    #[tokio::test]
    async fn a_real_file_that_is_no_usable_overlay_is_kept_and_refused() {
        let id = "41234567-89ab-cdef-0123-456789abcdef";
        let h = real_host();
        let dir = h.vms.vm_dir().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join(ROOT_DISK);
        let refused = |what: &str| refused(&h.vms, id, &h.a, &root, what.to_owned());
        // Not qcow2 at all.
        std::fs::write(&root, b"not a disk").unwrap();
        refused("could not be read as a disk").await;
        // A qcow2 standing on nothing.
        std::fs::copy(h.images.join("a.qcow2"), &root).unwrap();
        refused("it has no base image").await;
        // An overlay whose base is gone.
        std::fs::remove_file(&root).unwrap();
        let gone = dir.join("gone.qcow2");
        std::fs::copy(h.images.join("a.qcow2"), &gone).unwrap();
        disks::QemuImg
            .create_overlay(&gone, &root, disks::GIB)
            .unwrap();
        std::fs::remove_file(&gone).unwrap();
        refused(&format!("its base {} could not be read", gone.display())).await;
        // A link to a disk elsewhere is nothing the agent made.
        std::fs::remove_file(&root).unwrap();
        let elsewhere = dir.join("elsewhere.qcow2");
        disks::QemuImg
            .create_overlay(&h.images.join("a.qcow2"), &elsewhere, disks::GIB)
            .unwrap();
        std::os::unix::fs::symlink(&elsewhere, &root).unwrap();
        refused("not a regular file").await;
        assert!(h.hv.lookup(&names::domain_name(id)).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_real_build_whose_base_is_gone_leaves_nothing() {
        let id = "51234567-89ab-cdef-0123-456789abcdef";
        let h = real_host();
        std::fs::remove_file(h.images.join("a.qcow2")).unwrap();
        let e = h.vms.ensure(args(id, &h.a)).await.unwrap_err();
        assert!(matches!(e, AgentError::Disk(_)), "{e}");
        assert!(!h.vms.vm_dir().join(id).exists(), "{e}");
        // A new disk on the image the VPS asks for, and no other.
        let e = h.vms.ensure(args(id, &h.a2)).await.unwrap_err();
        assert!(matches!(e, AgentError::ImageChanged { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!(
                "this VPS was built on sha256 {}",
                crate::digests::short(&h.a2)
            )),
            "{e}"
        );
        assert!(!h.vms.vm_dir().join(id).exists());
    }
}
