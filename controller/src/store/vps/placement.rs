//! Choosing a host for a VPS inside the transaction that claims it.

use betang_proto::v1::{PlacementRequest, VpsSpec};
use rusqlite::Connection;

use crate::{
    error::ApiError,
    ids::HostId,
    scheduler::{self, Demand, HostView, Policy, Ratios, Resources},
    store::{host_index::HostIndex, hosts},
};

pub struct Placement {
    pub ratios: Ratios,
    pub policy: Policy,
    pub down_after_ms: i64,
    /// How many requests an institution may have waiting for approval.
    pub max_pending: u32,
}

fn demand(spec: &VpsSpec, wish: &PlacementRequest, institution: &str, digest: &str) -> Demand {
    Demand {
        need: need(spec),
        image: spec.image.clone(),
        image_version: if digest.is_empty() {
            String::new()
        } else {
            scheduler::image_key(&spec.image, digest)
        },
        zone: wish.zone.clone(),
        labels: wish.host_labels.clone().into_iter().collect(),
        // Groups belong to an institution: two institutions' "web" are unrelated.
        anti_affinity_group: if wish.anti_affinity_group.is_empty() {
            String::new()
        } else {
            format!("{institution}/{}", wish.anti_affinity_group)
        },
    }
}

pub(super) fn no_such_image(name: &str) -> ApiError {
    ApiError::invalid(
        "image",
        format!("no image named {name:?} in the catalogue; see `betangctl image list`"),
    )
}

/// Picks a host for `spec` (or checks the pinned one) inside the caller's
/// transaction; the caller's UPDATE or INSERT of the VPS with that host is
/// the claim. The choice comes from the in-memory host index; unless the
/// index is known to agree with the rows, the chosen host is then judged
/// again from its rows in this transaction, so a stale index can cost a
/// retry but never a double booking. `digest`, when not empty, asks for a
/// host holding that version of the image (a VPS that already has a disk).
#[allow(clippy::too_many_arguments)]
pub(in crate::store) fn place(
    c: &Connection,
    index: &mut HostIndex,
    spec: &VpsSpec,
    wish: &PlacementRequest,
    institution: &str,
    digest: &str,
    target: Target<'_>,
    placement: &Placement,
    now_ms: i64,
) -> Result<HostId, ApiError> {
    check_image_needs(c, spec)?;
    let demand = demand(spec, wish, institution, digest);
    let (r, p, down) = (
        &placement.ratios,
        &placement.policy,
        placement.down_after_ms,
    );
    let judge = |views: &[HostView]| match target {
        Target::Elsewhere(away) => {
            let others: Vec<HostView> = views.iter().filter(|h| &h.id != away).cloned().collect();
            scheduler::place(&others, &demand, r, p)
        }
        _ => scheduler::place(views, &demand, r, p),
    };
    if let Target::Pinned(pin) = target {
        let Some(view) = hosts::view(c, pin, now_ms, down)? else {
            return Err(ApiError::invalid("host_id", format!("no host {pin}")));
        };
        return judge(&[view]).map_err(ApiError::NoHostFits);
    }
    let (views, in_step) = index.hosts_in_step(c, now_ms, down)?;
    let chosen = judge(views).map_err(ApiError::NoHostFits)?;
    // Judging the host again from its rows is needed only when the index may
    // be behind them; reading them is a tenth of the store's work per placement.
    if in_step || confirm(c, &chosen, &judge, placement, now_ms)? {
        return Ok(chosen);
    }
    tracing::warn!(host_id = %chosen, "host index was out of step with the store; reloading it");
    index.reload(c)?;
    judge(index.hosts(c, now_ms, down)?).map_err(ApiError::NoHostFits)
}

/// The image exists and the VPS is big enough for it (disk and memory): a
/// guest with less memory than its image needs never boots.
pub(super) fn check_image_needs(c: &Connection, spec: &VpsSpec) -> Result<(), ApiError> {
    let image =
        hosts::catalogue_image(c, &spec.image)?.ok_or_else(|| no_such_image(&spec.image))?;
    if spec.disk_gib < image.min_disk_gib {
        return Err(ApiError::invalid(
            "disk_gib",
            format!(
                "image {} needs a disk of at least {} GiB, {} GiB was asked",
                image.name, image.min_disk_gib, spec.disk_gib
            ),
        ));
    }
    if spec.memory_mib < image.min_memory_mib {
        return Err(ApiError::invalid(
            "memory_mib",
            format!(
                "image {} needs at least {} MiB of memory to boot, {} MiB was asked",
                image.name, image.min_memory_mib, spec.memory_mib
            ),
        ));
    }
    Ok(())
}

/// Where `place` may put a VPS.
#[derive(Clone, Copy)]
pub(in crate::store) enum Target<'a> {
    Anywhere,
    /// Only on this host (an operator's choice).
    Pinned(&'a HostId),
    /// Anywhere but this host (a VPS moving off it).
    Elsewhere(&'a HostId),
}

impl<'a> Target<'a> {
    pub(super) fn pinned(pin: Option<&'a HostId>) -> Self {
        pin.map_or(Target::Anywhere, Target::Pinned)
    }
}

/// The chosen host judged again from its own rows, inside the transaction
/// that will claim it.
fn confirm(
    c: &Connection,
    chosen: &HostId,
    judge: &dyn Fn(&[HostView]) -> Result<HostId, scheduler::NoFit>,
    placement: &Placement,
    now_ms: i64,
) -> Result<bool, ApiError> {
    Ok(hosts::view(c, chosen, now_ms, placement.down_after_ms)?
        .is_some_and(|v| judge(std::slice::from_ref(&v)).is_ok()))
}

pub(super) fn need(spec: &VpsSpec) -> Resources {
    Resources {
        vcpus: spec.vcpus.into(),
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
    }
}
