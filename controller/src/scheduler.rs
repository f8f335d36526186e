//! Placement: which host gets a VPS. Pure functions over a snapshot of hosts
//! and their allocations, so the store can run them inside the transaction
//! that claims the capacity.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::ids::HostId;

/// How far each resource may be overcommitted.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ratios {
    #[serde(default = "default_cpu_ratio")]
    pub cpu: f64,
    #[serde(default = "one")]
    pub memory: f64,
    #[serde(default = "one")]
    pub disk: f64,
}

fn default_cpu_ratio() -> f64 {
    4.0
}
fn one() -> f64 {
    1.0
}

impl Default for Ratios {
    fn default() -> Self {
        Ratios {
            cpu: default_cpu_ratio(),
            memory: 1.0,
            disk: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Clone)]
pub struct HostView {
    pub id: HostId,
    pub up: bool,
    pub capacity: Resources,
    pub allocated: Resources,
    pub images: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct Demand {
    pub need: Resources,
    pub image: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    Down,
    NoImage,
    Cpu,
    Memory,
    Disk,
}

fn limit(capacity: u64, ratio: f64) -> u64 {
    (capacity as f64 * ratio).floor() as u64
}

fn check(h: &HostView, d: &Demand, r: &Ratios) -> Result<f64, Reject> {
    if !h.up {
        return Err(Reject::Down);
    }
    if !h.images.contains(&d.image) {
        return Err(Reject::NoImage);
    }
    let fits = |alloc: u64, need: u64, cap: u64, ratio: f64| {
        alloc
            .checked_add(need)
            .is_some_and(|t| t <= limit(cap, ratio))
    };
    if !fits(h.allocated.vcpus, d.need.vcpus, h.capacity.vcpus, r.cpu) {
        return Err(Reject::Cpu);
    }
    if !fits(
        h.allocated.memory_mib,
        d.need.memory_mib,
        h.capacity.memory_mib,
        r.memory,
    ) {
        return Err(Reject::Memory);
    }
    if !fits(
        h.allocated.disk_gib,
        d.need.disk_gib,
        h.capacity.disk_gib,
        r.disk,
    ) {
        return Err(Reject::Disk);
    }
    // Load after placement: the fuller of CPU and memory, as a share of the limit.
    let share = |alloc: u64, need: u64, cap: u64, ratio: f64| {
        (alloc + need) as f64 / limit(cap, ratio).max(1) as f64
    };
    Ok(
        share(h.allocated.vcpus, d.need.vcpus, h.capacity.vcpus, r.cpu).max(share(
            h.allocated.memory_mib,
            d.need.memory_mib,
            h.capacity.memory_mib,
            r.memory,
        )),
    )
}

/// The least loaded host that fits, or why none does.
pub fn place(hosts: &[HostView], d: &Demand, r: &Ratios) -> Result<HostId, String> {
    let mut best: Option<(f64, &HostView)> = None;
    let mut rejects = [0usize; 5];
    for h in hosts {
        match check(h, d, r) {
            Ok(load) => {
                if best.is_none_or(|(b, bh)| load < b || (load == b && h.id < bh.id)) {
                    best = Some((load, h));
                }
            }
            Err(why) => rejects[why as usize] += 1,
        }
    }
    if let Some((_, h)) = best {
        return Ok(h.id.clone());
    }
    Err(explain(hosts.len(), d, &rejects))
}

fn explain(total: usize, d: &Demand, rejects: &[usize; 5]) -> String {
    let head = format!(
        "no host fits {} vCPU / {} MiB memory / {} GiB disk with image {}",
        d.need.vcpus, d.need.memory_mib, d.need.disk_gib, d.image
    );
    if total == 0 {
        return format!("{head}: no hosts are registered");
    }
    let labels = [
        (Reject::Down, "down"),
        (Reject::NoImage, "lack the image"),
        (Reject::Cpu, "lack vCPUs"),
        (Reject::Memory, "lack memory"),
        (Reject::Disk, "lack disk"),
    ];
    let parts: Vec<String> = labels
        .iter()
        .filter(|(r, _)| rejects[*r as usize] > 0)
        .map(|(r, label)| format!("{} {label}", rejects[*r as usize]))
        .collect();
    format!("{head}: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, vcpus: u64, mem: u64, alloc_vcpus: u64, alloc_mem: u64) -> HostView {
        HostView {
            id: HostId::parse(id).unwrap(),
            up: true,
            capacity: Resources {
                vcpus,
                memory_mib: mem,
                disk_gib: 1000,
            },
            allocated: Resources {
                vcpus: alloc_vcpus,
                memory_mib: alloc_mem,
                disk_gib: 0,
            },
            images: ["debian-12".to_string()].into(),
        }
    }

    fn demand(vcpus: u64, mem: u64) -> Demand {
        Demand {
            need: Resources {
                vcpus,
                memory_mib: mem,
                disk_gib: 10,
            },
            image: "debian-12".into(),
        }
    }

    #[test]
    fn picks_the_least_loaded_host() {
        let hosts = [host("a", 8, 8192, 4, 4096), host("b", 8, 8192, 1, 1024)];
        assert_eq!(
            place(&hosts, &demand(1, 1024), &Ratios::default())
                .unwrap()
                .as_str(),
            "b"
        );
    }

    #[test]
    fn overcommit_ratios_apply() {
        let hosts = [host("a", 2, 8192, 7, 0)];
        let r = Ratios {
            cpu: 4.0,
            ..Ratios::default()
        };
        assert!(place(&hosts, &demand(1, 128), &r).is_ok());
        assert!(place(&hosts, &demand(2, 128), &r).is_err());
        let strict = Ratios {
            cpu: 1.0,
            ..Ratios::default()
        };
        assert!(place(&hosts, &demand(1, 128), &strict).is_err());
    }

    #[test]
    fn explains_why_nothing_fits() {
        let mut down = host("d", 64, 65536, 0, 0);
        down.up = false;
        let mut no_image = host("e", 64, 65536, 0, 0);
        no_image.images.clear();
        let hosts = [
            host("a", 8, 1024, 0, 0),
            host("b", 8, 2048, 0, 0),
            host("c", 1, 65536, 4, 0),
            down,
            no_image,
        ];
        let e = place(&hosts, &demand(2, 4096), &Ratios::default()).unwrap_err();
        assert_eq!(
            e,
            "no host fits 2 vCPU / 4096 MiB memory / 10 GiB disk with image debian-12: 1 down, 1 lack the image, 1 lack vCPUs, 2 lack memory"
        );
        let e = place(&[], &demand(1, 1), &Ratios::default()).unwrap_err();
        assert!(e.ends_with(": no hosts are registered"), "{e}");
    }

    #[test]
    fn huge_demands_do_not_overflow() {
        let hosts = [host("a", 8, 8192, 1, 1)];
        assert!(place(&hosts, &demand(u64::MAX, 1), &Ratios::default()).is_err());
    }
}
