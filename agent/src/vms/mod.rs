//! Converging one VPS's VM to what the controller asked for. Every operation
//! measures before it acts, so calling it again after a failure or a crash
//! picks up where the last call stopped; a new VM that fails half-way is
//! undone step by step, leaving neither a domain nor files behind.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use betang_proto::v1::{PowerState, VmStatus, VmUsage, VpsSpec};
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
    images::Catalog,
    names,
    seed::SeedContent,
    usage::CpuRates,
};

/// A domain as the controller hears of it, with the usage the caller has.
fn vm_status(vps_id: &str, state: &DomainState, usage: Option<VmUsage>) -> VmStatus {
    VmStatus {
        vps_id: vps_id.to_owned(),
        power: state.power.to_proto() as i32,
        generation: state.metadata.as_ref().map_or(0, |m| m.generation),
        usage,
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
    pub rates: CpuRates,
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
            rates: CpuRates::default(),
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

    pub fn serial_log(&self, vps_id: &str) -> Result<PathBuf> {
        names::check_vps_id(vps_id)?;
        Ok(self.dir_of(vps_id).join("console.log"))
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
        };
        match existing {
            // The create applied the desired power and saw the result.
            None => {
                let state = self.create(&args, &name, &meta, desired).await?;
                return Ok(self.reported(&args.vps_id, &state));
            }
            Some(state) => {
                self.apply_size(&args, &name, &meta, &state).await?;
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
        self.converge_power(&name, desired, args.stop_timeout, args.force_stop)
            .await?;
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
        let usage = self.stats.snapshot().vm(&state.name).and_then(|v| v.usage);
        vm_status(vps_id, state, usage)
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
        let root = dir.join("root.qcow2");
        let has_disk = root.exists();
        let new_disk = if has_disk {
            self.check_existing_disk(&root, args).await?;
            None
        } else {
            Some(self.image_for_new_disk(args)?)
        };
        let created_dir = !dir.exists();
        let result = self
            .create_steps(args, name, meta, desired, new_disk, &dir)
            .await;
        if let Err(e) = &result {
            warn!(error = %e, "provisioning failed; undoing what this call did");
            let undo_name = name.to_owned();
            let _ = self.hv.call(move |hv| hv.undefine(&undo_name)).await;
            if created_dir {
                let _ = std::fs::remove_dir_all(&dir);
            } else if !has_disk {
                let _ = std::fs::remove_file(&root);
            }
        }
        result
    }

    /// The catalogue image a new disk is made from: the one named, with the
    /// content the VPS was built on, and large enough.
    fn image_for_new_disk(&self, args: &EnsureArgs) -> Result<(PathBuf, u64)> {
        let image = match self.catalog().get(&args.spec.image).cloned() {
            Some(i) => i,
            None => self
                .reload_catalog()?
                .get(&args.spec.image)
                .cloned()
                .ok_or_else(|| AgentError::UnknownImage(args.spec.image.clone()))?,
        };
        if !args.image_digest.is_empty() && image.digest != args.image_digest {
            return Err(AgentError::ImageChanged {
                image: image.name,
                have: digests::short(&image.digest).to_owned(),
                want: digests::short(&args.image_digest).to_owned(),
                file: image.path.display().to_string(),
            });
        }
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
    /// interrupted ensure, a move) is used only when it stands on the base
    /// the VPS was built on, known by its digest. Anything else is kept as it
    /// is and refused with a reason for a person: it may hold the tenant's data.
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
                let base = disks
                    .backing_of(&root)
                    .map_err(|e| kept(format!("it could not be read as a disk ({e})")))?;
                let have = cache.digest(&base).map_err(|e| {
                    kept(format!(
                        "its base {} could not be read ({e})",
                        base.display()
                    ))
                })?;
                let matches = if want.is_empty() {
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
                            "the catalogue's {} is sha256 {}",
                            i.name,
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

    async fn create_steps(
        &self,
        args: &EnsureArgs,
        name: &str,
        meta: &VpsMetadata,
        desired: PowerState,
        new_disk: Option<(PathBuf, u64)>,
        dir: &Path,
    ) -> Result<DomainState> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        let root = dir.join("root.qcow2");
        let seed = dir.join("seed.img");
        let d = dir.to_path_buf();
        let content = SeedContent {
            instance_id: args.vps_id.clone(),
            hostname: args.spec.name.clone(),
            ssh_public_key: args.spec.ssh_public_key.clone(),
            user_data: args.spec.user_data.clone(),
        };
        // Both disks in one trip to the blocking pool (and the domain in
        // one more): the hand-over costs more than a simulated host's work.
        // Each is made under a temporary name and renamed when complete, so
        // a half-made file never looks like a disk.
        self.hv
            .disks(move |disks| {
                if let Some((base, bytes)) = new_disk {
                    let part = d.join("root.qcow2.part");
                    remove_temporary(&part)?;
                    disks.create_overlay(&base, &part, bytes)?;
                    commit_file(&part, &root, &d)?;
                }
                let part = d.join("seed.img.part");
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
            root_disk: dir.join("root.qcow2"),
            seed_disk: dir.join("seed.img"),
            serial_log: dir.join("console.log"),
            network: self.network.clone(),
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
        let root = dir.join("root.qcow2");
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
        self.rates.forget(vps_id);
        info!("VM deleted");
        Ok(())
    }

    #[instrument(skip(self))]
    pub async fn reboot(&self, vps_id: &str, force: bool) -> Result<VmStatus> {
        names::check_vps_id(vps_id)?;
        let name = names::domain_name(vps_id);
        self.hv.call(move |hv| hv.reboot(&name, force)).await?;
        self.status(vps_id).await
    }

    pub async fn status(&self, vps_id: &str) -> Result<VmStatus> {
        let name = names::domain_name(vps_id);
        let n = name.clone();
        let state = self
            .hv
            .call(move |hv| hv.lookup(&n))
            .await?
            .ok_or_else(|| AgentError::NoSuchVm(vps_id.to_owned()))?;
        Ok(self.status_of(vps_id, &state).await)
    }

    /// Status with usage; a domain whose stats do not come in time is still
    /// reported, without usage.
    async fn status_of(&self, vps_id: &str, state: &DomainState) -> VmStatus {
        let n = state.name.clone();
        let usage = self
            .hv
            .call_within(Duration::from_secs(5), move |hv| hv.stats(&n))
            .await
            .ok()
            .map(|s| self.rates.usage(vps_id, &s));
        vm_status(vps_id, state, usage)
    }

    /// Every VM this agent owns, with its usage from the collector's last
    /// snapshot, so a heartbeat never waits on a slow domain.
    pub async fn list(&self) -> Result<Vec<VmStatus>> {
        let states = self.hv.call(|hv| hv.list_owned()).await?;
        let snapshot = self.stats.snapshot();
        Ok(states
            .iter()
            .filter_map(|s| {
                let id = names::vps_id_of_domain(&s.name)?;
                Some(vm_status(id, s, snapshot.vm(&s.name).and_then(|v| v.usage)))
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
            if names::check_vps_id(&name).is_ok() && e.path().is_dir() {
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

/// Removes a temporary file an interrupted call may have left. Only ever
/// called with a `.part` name, which no disk has.
fn remove_temporary(part: &Path) -> Result<()> {
    match std::fs::remove_file(part) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(part, e)),
    }
}

/// Gives a finished file its real name, durably: its data, then the name.
fn commit_file(part: &Path, to: &Path, dir: &Path) -> Result<()> {
    let sync = |p: &Path| {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| AgentError::io(p, e))
    };
    sync(part)?;
    std::fs::rename(part, to).map_err(|e| AgentError::io(to, e))?;
    sync(dir)
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
    use crate::hypervisor::{Hypervisor, NodeFacts, SimulatedHypervisor};

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
            Blocking::new(hv.clone(), Duration::from_secs(5)),
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
        assert!(!h.vms.vm_dir().join(ID).exists(), "nothing left behind");
        h.vms.import_disk(incoming(&v1)).await.unwrap();
        let root = h.vms.vm_dir().join(ID).join("root.qcow2");
        assert!(std::fs::read_to_string(&root).unwrap().contains("v1.img"));
        let e = h.vms.import_disk(incoming(&v1)).await.unwrap_err();
        assert!(e.to_string().contains("already has a disk"), "{e}");
    }
}
