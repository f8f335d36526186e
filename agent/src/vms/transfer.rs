//! Moving a VPS's root disk between hosts. The source sends its overlay while
//! the VM is stopped; the target writes it beside its other VMs under a
//! temporary name, bases it on its own copy of the catalogue image and only
//! then gives it its real name, so a broken transfer never looks like a disk.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, instrument};

use super::{ROOT_DISK, ROOT_PART, VmManager, check_image_digest, commit_new_file, present};
use crate::{
    error::{AgentError, Result},
    hypervisor::Power,
    names,
};

/// Big enough to keep the link busy, small enough to stay well under gRPC's
/// default 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;

pub struct Incoming {
    pub vps_id: String,
    pub image: String,
    pub data: Vec<u8>,
    pub total_bytes: u64,
    /// The digest of the image the disk was built on ("" when unknown).
    pub image_digest: String,
}

impl VmManager {
    /// The size and the contents of the root disk of a VPS whose VM is
    /// stopped (or not defined here).
    #[instrument(skip(self))]
    pub async fn export_disk(
        &self,
        vps_id: &str,
    ) -> Result<(u64, impl Stream<Item = Result<Vec<u8>>> + use<>)> {
        names::check_vps_id(vps_id)?;
        // Held until the stream ends or is dropped: no ensure or delete of
        // this VPS runs while its disk is being read.
        let guard = self.lock_for(vps_id).lock_owned().await;
        let name = names::domain_name(vps_id);
        let state = self.hv.call(move |hv| hv.lookup(&name)).await?;
        if state.is_some_and(|s| s.power != Power::Stopped) {
            return Err(AgentError::WrongState {
                vps_id: vps_id.to_owned(),
                rule: "its VM must be stopped before its disk can be moved",
            });
        }
        let path = self.dir_of(vps_id).join(ROOT_DISK);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => AgentError::NoSuchVm(vps_id.to_owned()),
                _ => AgentError::io(&path, e),
            })?;
        let size = file
            .metadata()
            .await
            .map_err(|e| AgentError::io(&path, e))?
            .len();
        let chunks = futures::stream::unfold(Some((file, path, guard)), |state| async move {
            let (mut file, path, guard) = state?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), Some((file, path, guard))))
                }
                Err(e) => Some((Err(AgentError::io(&path, e)), None)),
            }
        });
        Ok((size, chunks))
    }

    /// Writes a disk sent by another host. Refused while this host has a VM
    /// or a disk for the VPS, so a move can never overwrite a guest's disk,
    /// and refused unless this host's image has the content the disk was
    /// built on. A refused or broken transfer leaves nothing behind.
    #[instrument(skip_all)]
    pub async fn import_disk(
        &self,
        mut chunks: impl Stream<Item = Result<Incoming>> + Unpin,
    ) -> Result<u64> {
        let first = chunks.next().await.ok_or(AgentError::InvalidArgument {
            field: "vps_id",
            rule: "the first message must name the VPS and its image".into(),
        })??;
        let vps_id = first.vps_id.clone();
        names::check_vps_id(&vps_id)?;
        names::check_image_name(&first.image)?;
        let lock = self.lock_for(&vps_id);
        let _guard = lock.lock().await;
        let image = self.catalogue_image(&first.image)?;
        check_image_digest(&image, &names::check_digest(&first.image_digest)?)?;
        let name = names::domain_name(&vps_id);
        if self.hv.call(move |hv| hv.lookup(&name)).await?.is_some() {
            return Err(AgentError::WrongState {
                vps_id,
                rule: "this host already has a VM for it",
            });
        }
        let dir = self.dir_of(&vps_id);
        let root = dir.join(ROOT_DISK);
        if present(&root)? {
            // Never written over: it may be a disk someone still needs.
            return Err(AgentError::WrongState {
                vps_id,
                rule: "this host already has a disk for it",
            });
        }
        let created_dir = !present(&dir)?;
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
        let part = dir.join(ROOT_PART);
        let result = match receive(&part, first.data, &mut chunks).await {
            Ok(n) if n == first.total_bytes => Ok(n),
            Ok(n) => Err(AgentError::InvalidArgument {
                field: "total_bytes",
                rule: format!("{n} bytes arrived, {} were announced", first.total_bytes),
            }),
            Err(e) => Err(e),
        };
        let made = Arc::new(AtomicBool::new(false));
        let result = match result {
            Ok(bytes) => {
                let (p, base, r, d, m) = (
                    part.clone(),
                    image.path.clone(),
                    root.clone(),
                    dir.clone(),
                    made.clone(),
                );
                self.hv
                    .disks(move |disks| {
                        disks.rebase(&p, &base)?;
                        commit_new_file(&p, &r, &d, &m)
                    })
                    .await
                    .map(|()| bytes)
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(bytes) => info!(%vps_id, bytes, "disk imported"),
            // Only what this call wrote: the temporary file, the disk when
            // it got its name (a later step failed), the directory if this
            // call made it and it is empty again.
            Err(_) => {
                let _ = std::fs::remove_file(&part);
                if made.load(Ordering::SeqCst) {
                    let _ = std::fs::remove_file(&root);
                }
                if created_dir {
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        result
    }
}

async fn receive(
    part: &Path,
    first: Vec<u8>,
    rest: &mut (impl Stream<Item = Result<Incoming>> + Unpin),
) -> Result<u64> {
    let mut file = tokio::fs::File::create(part)
        .await
        .map_err(|e| AgentError::io(part, e))?;
    let mut bytes = first.len() as u64;
    file.write_all(&first)
        .await
        .map_err(|e| AgentError::io(part, e))?;
    while let Some(chunk) = rest.next().await {
        let chunk = chunk?;
        bytes += chunk.data.len() as u64;
        file.write_all(&chunk.data)
            .await
            .map_err(|e| AgentError::io(part, e))?;
    }
    file.sync_all().await.map_err(|e| AgentError::io(part, e))?;
    Ok(bytes)
}
