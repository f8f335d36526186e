//! Placement: which host gets a VPS. Small filters say whether a host can
//! take it at all; weighers rank the hosts that can. Everything here is a
//! pure function over a snapshot of hosts and their allocations, so the store
//! runs it inside the transaction that claims the capacity.

use std::collections::{BTreeMap, BTreeSet};

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

/// Spread VPS over hosts (the least loaded first), or pack them (the most
/// loaded that still fits first, keeping whole hosts free).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Spread,
    Pack,
}

/// The placement policy from the controller's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub strategy: Strategy,
    /// Kept for the host itself on every host, before overcommit.
    #[serde(default)]
    pub reserved: Resources,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub vcpus: u64,
    #[serde(default)]
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_gib: u64,
}

#[derive(Debug, Clone)]
pub struct HostView {
    pub id: HostId,
    pub up: bool,
    /// True while its agent reports that the hypervisor does not answer.
    pub degraded: bool,
    /// False while an operator has cordoned the host.
    pub schedulable: bool,
    pub capacity: Resources,
    pub allocated: Resources,
    pub images: BTreeSet<String>,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    /// Operator-set preference; 1.0 is neutral.
    pub weight: f64,
    /// Anti-affinity groups that already have a VPS here.
    pub groups: BTreeSet<String>,
}

/// What may be placed on a host of `cap`: capacity less the reserve, times
/// the overcommit ratios.
pub fn allocatable(
    cap: &betang_proto::v1::HostCapacity,
    r: &Ratios,
    p: &Policy,
) -> betang_proto::v1::HostCapacity {
    betang_proto::v1::HostCapacity {
        vcpus: u32::try_from(limit(cap.vcpus.into(), p.reserved.vcpus, r.cpu)).unwrap_or(u32::MAX),
        memory_mib: limit(cap.memory_mib, p.reserved.memory_mib, r.memory),
        disk_gib: limit(cap.disk_gib, p.reserved.disk_gib, r.disk),
    }
}

/// How a host's image set names one version of an image: the name alone
/// matches any version, `name@digest` only that content.
pub fn image_key(name: &str, digest: &str) -> String {
    format!("{name}@{digest}")
}

#[derive(Debug, Clone, Default)]
pub struct Demand {
    pub need: Resources,
    pub image: String,
    /// Set when the VPS already has a disk (a move): the host must hold this
    /// version of the image, as `image_key` names it; empty for new VPS.
    pub image_version: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub anti_affinity_group: String,
}

/// Why a host cannot take a VPS, in the order the filters run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    Down,
    Degraded,
    Cordoned,
    Zone,
    Labels,
    Image,
    AntiAffinity,
    Cpu,
    Memory,
    Disk,
}

impl Reject {
    /// What `n` hosts are, said of one host or of several.
    fn label(self, n: usize) -> &'static str {
        let one = n == 1;
        match self {
            Reject::Down => "down",
            Reject::Degraded => "degraded (hypervisor not answering)",
            Reject::Cordoned => "cordoned",
            Reject::Zone => "in another zone",
            Reject::Labels if one => "lacks the labels",
            Reject::Labels => "lack the labels",
            Reject::Image if one => "lacks the image",
            Reject::Image => "lack the image",
            Reject::AntiAffinity if one => "already holds its anti-affinity group",
            Reject::AntiAffinity => "already hold its anti-affinity group",
            Reject::Cpu if one => "lacks vCPUs",
            Reject::Cpu => "lack vCPUs",
            Reject::Memory if one => "lacks memory",
            Reject::Memory => "lack memory",
            Reject::Disk if one => "lacks disk",
            Reject::Disk => "lack disk",
        }
    }
}

/// What a host may hold of one resource: capacity less the host's reserve,
/// times the overcommit ratio, rounded down. (The cast rounds toward zero,
/// which is down for what is never negative, and saturates; `floor` would be
/// a libm call, made five times per host for every placement.)
pub fn limit(capacity: u64, reserved: u64, ratio: f64) -> u64 {
    (capacity.saturating_sub(reserved) as f64 * ratio) as u64
}

fn fits(alloc: u64, need: u64, limit: u64) -> bool {
    alloc.checked_add(need).is_some_and(|t| t <= limit)
}

#[cfg(test)]
type Filter = fn(&HostView, &Demand, &Ratios, &Policy) -> Option<Reject>;

pub mod filters {
    use super::*;

    pub fn up(h: &HostView, _: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        (!h.up).then_some(Reject::Down)
    }
    pub fn answering(h: &HostView, _: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        h.degraded.then_some(Reject::Degraded)
    }
    pub fn schedulable(h: &HostView, _: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        (!h.schedulable).then_some(Reject::Cordoned)
    }
    pub fn zone(h: &HostView, d: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        (!d.zone.is_empty() && h.zone != d.zone).then_some(Reject::Zone)
    }
    pub fn labels(h: &HostView, d: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        let ok = d.labels.iter().all(|(k, v)| h.labels.get(k) == Some(v));
        (!ok).then_some(Reject::Labels)
    }
    pub fn image(h: &HostView, d: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        let wanted = if d.image_version.is_empty() {
            &d.image
        } else {
            &d.image_version
        };
        (!h.images.contains(wanted)).then_some(Reject::Image)
    }
    pub fn anti_affinity(h: &HostView, d: &Demand, _: &Ratios, _: &Policy) -> Option<Reject> {
        (!d.anti_affinity_group.is_empty() && h.groups.contains(&d.anti_affinity_group))
            .then_some(Reject::AntiAffinity)
    }
    pub fn cpu(h: &HostView, d: &Demand, r: &Ratios, p: &Policy) -> Option<Reject> {
        let l = limit(h.capacity.vcpus, p.reserved.vcpus, r.cpu);
        (!fits(h.allocated.vcpus, d.need.vcpus, l)).then_some(Reject::Cpu)
    }
    pub fn memory(h: &HostView, d: &Demand, r: &Ratios, p: &Policy) -> Option<Reject> {
        let l = limit(h.capacity.memory_mib, p.reserved.memory_mib, r.memory);
        (!fits(h.allocated.memory_mib, d.need.memory_mib, l)).then_some(Reject::Memory)
    }
    pub fn disk(h: &HostView, d: &Demand, r: &Ratios, p: &Policy) -> Option<Reject> {
        let l = limit(h.capacity.disk_gib, p.reserved.disk_gib, r.disk);
        (!fits(h.allocated.disk_gib, d.need.disk_gib, l)).then_some(Reject::Disk)
    }
}

/// Every filter, in the order `first_reject` runs them (a test holds the two
/// together).
#[cfg(test)]
const FILTERS: [Filter; 10] = [
    filters::up,
    filters::answering,
    filters::schedulable,
    filters::zone,
    filters::labels,
    filters::image,
    filters::anti_affinity,
    filters::cpu,
    filters::memory,
    filters::disk,
];

pub mod weighers {
    use super::*;

    /// The host's load after placement: the fuller of CPU and memory, as a
    /// share of what it may hold.
    pub fn load_after(h: &HostView, d: &Demand, r: &Ratios, p: &Policy) -> f64 {
        let share = |alloc: u64, need: u64, cap: u64, res: u64, ratio: f64| {
            (alloc + need) as f64 / limit(cap, res, ratio).max(1) as f64
        };
        share(
            h.allocated.vcpus,
            d.need.vcpus,
            h.capacity.vcpus,
            p.reserved.vcpus,
            r.cpu,
        )
        .max(share(
            h.allocated.memory_mib,
            d.need.memory_mib,
            h.capacity.memory_mib,
            p.reserved.memory_mib,
            r.memory,
        ))
    }

    /// Higher is better. Spread prefers empty hosts, pack full ones; the
    /// operator's host weight scales either.
    pub fn score(h: &HostView, d: &Demand, r: &Ratios, p: &Policy) -> f64 {
        let load = load_after(h, d, r, p);
        let base = match p.strategy {
            Strategy::Spread => 1.0 - load,
            Strategy::Pack => load,
        };
        // Shifted so that a weight still ranks hosts whose base score is 0.
        (base + 1.0) * h.weight.max(0.0)
    }
}

/// The first of `FILTERS` that turns the host away. Called directly, not
/// through the array, so that the filters are inlined: this runs for every
/// host on every placement.
fn first_reject(h: &HostView, d: &Demand, r: &Ratios, p: &Policy) -> Option<Reject> {
    use filters::*;
    up(h, d, r, p)
        .or_else(|| answering(h, d, r, p))
        .or_else(|| schedulable(h, d, r, p))
        .or_else(|| zone(h, d, r, p))
        .or_else(|| labels(h, d, r, p))
        .or_else(|| image(h, d, r, p))
        .or_else(|| anti_affinity(h, d, r, p))
        .or_else(|| cpu(h, d, r, p))
        .or_else(|| memory(h, d, r, p))
        .or_else(|| disk(h, d, r, p))
}

/// The best host that passes every filter, or why none does.
pub fn place(hosts: &[HostView], d: &Demand, r: &Ratios, p: &Policy) -> Result<HostId, NoFit> {
    let mut best: Option<(f64, &HostView)> = None;
    let mut rejects: BTreeMap<Reject, usize> = BTreeMap::new();
    for h in hosts {
        if let Some(why) = first_reject(h, d, r, p) {
            *rejects.entry(why).or_default() += 1;
            continue;
        }
        let s = weighers::score(h, d, r, p);
        if best.is_none_or(|(b, bh)| s > b || (s == b && h.id < bh.id)) {
            best = Some((s, h));
        }
    }
    match best {
        Some((_, h)) => Ok(h.id.clone()),
        None => Err(NoFit {
            need: d.need,
            image: d.image.clone(),
            hosts: hosts.len(),
            rejects,
        }),
    }
}

/// Why no host could take a VPS: what it needed and, per first reason, how
/// many hosts refused it. Kept as figures so that each client (CLI, portal,
/// in either language) can say it in its own words; `Display` is English.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoFit {
    pub need: Resources,
    pub image: String,
    /// Hosts looked at.
    pub hosts: usize,
    pub rejects: BTreeMap<Reject, usize>,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no host fits {} vCPU / {} MiB memory / {} GiB disk with image {}",
            self.need.vcpus, self.need.memory_mib, self.need.disk_gib, self.image
        )?;
        if self.hosts == 0 {
            return f.write_str(": no hosts are registered");
        }
        let parts: Vec<String> = self
            .rejects
            .iter()
            .map(|(r, n)| format!("{n} {}", r.label(*n)))
            .collect();
        write!(f, ": {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, vcpus: u64, mem: u64, alloc_vcpus: u64, alloc_mem: u64) -> HostView {
        HostView {
            id: HostId::parse(id).unwrap(),
            up: true,
            degraded: false,
            schedulable: true,
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
            zone: "a".into(),
            labels: BTreeMap::new(),
            weight: 1.0,
            groups: BTreeSet::new(),
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
            ..Demand::default()
        }
    }

    fn pick(hosts: &[HostView], d: &Demand, p: &Policy) -> String {
        place(hosts, d, &Ratios::default(), p).unwrap().to_string()
    }

    #[test]
    fn the_first_reject_is_the_first_filter_that_refuses() {
        let (r, p) = (Ratios::default(), Policy::default());
        let mut d = demand(4, 4096);
        d.zone = "a".into();
        d.anti_affinity_group = "i/web".into();
        let mut hosts = Vec::new();
        for mask in 0u32..(1 << 8) {
            let mut h = host("h", 8, 8192, 0, 0);
            h.up = mask & 1 == 0;
            h.schedulable = mask & 2 == 0;
            if mask & 4 != 0 {
                h.zone = "b".into();
            }
            if mask & 8 != 0 {
                h.images.clear();
            }
            if mask & 16 != 0 {
                h.groups.insert("i/web".into());
            }
            if mask & 32 != 0 {
                h.allocated.vcpus = 30;
            }
            if mask & 64 != 0 {
                h.allocated.memory_mib = 8000;
            }
            if mask & 128 != 0 {
                h.allocated.disk_gib = 995;
            }
            hosts.push(h);
        }
        let mut labelled = d.clone();
        labelled.labels = [("ssd".to_string(), "yes".to_string())].into();
        for d in [&d, &labelled] {
            for h in &hosts {
                let by_array = FILTERS.iter().find_map(|f| f(h, d, &r, &p));
                assert_eq!(first_reject(h, d, &r, &p), by_array, "{h:?}");
            }
        }
    }

    #[test]
    fn each_filter_on_its_own() {
        let (r, p) = (Ratios::default(), Policy::default());
        let d = demand(1, 1024);
        let ok = host("a", 8, 8192, 0, 0);
        for f in FILTERS {
            assert_eq!(f(&ok, &d, &r, &p), None);
        }
        let mut h = ok.clone();
        h.up = false;
        assert_eq!(filters::up(&h, &d, &r, &p), Some(Reject::Down));
        let mut h = ok.clone();
        h.schedulable = false;
        assert_eq!(filters::schedulable(&h, &d, &r, &p), Some(Reject::Cordoned));
        let zoned = Demand {
            zone: "b".into(),
            ..d.clone()
        };
        assert_eq!(filters::zone(&ok, &zoned, &r, &p), Some(Reject::Zone));
        let labelled = Demand {
            labels: [("ssd".to_string(), "yes".to_string())].into(),
            ..d.clone()
        };
        assert_eq!(
            filters::labels(&ok, &labelled, &r, &p),
            Some(Reject::Labels)
        );
        let mut h = ok.clone();
        h.labels.insert("ssd".into(), "yes".into());
        assert_eq!(filters::labels(&h, &labelled, &r, &p), None);
        let other_image = Demand {
            image: "rocky-9".into(),
            ..d.clone()
        };
        assert_eq!(
            filters::image(&ok, &other_image, &r, &p),
            Some(Reject::Image)
        );
        let grouped = Demand {
            anti_affinity_group: "inst/web".into(),
            ..d.clone()
        };
        let mut h = ok.clone();
        h.groups.insert("inst/web".into());
        assert_eq!(
            filters::anti_affinity(&h, &grouped, &r, &p),
            Some(Reject::AntiAffinity)
        );
        assert_eq!(filters::anti_affinity(&ok, &grouped, &r, &p), None);
        assert_eq!(filters::cpu(&ok, &demand(33, 1), &r, &p), Some(Reject::Cpu));
        assert_eq!(
            filters::memory(&ok, &demand(1, 8193), &r, &p),
            Some(Reject::Memory)
        );
        let big_disk = Demand {
            need: Resources {
                disk_gib: 1001,
                ..d.need
            },
            ..d.clone()
        };
        assert_eq!(filters::disk(&ok, &big_disk, &r, &p), Some(Reject::Disk));
    }

    #[test]
    fn overcommit_ratios_and_the_hosts_reserve_apply() {
        let hosts = [host("a", 2, 8192, 7, 0)];
        let r = Ratios {
            cpu: 4.0,
            ..Ratios::default()
        };
        let p = Policy::default();
        assert!(place(&hosts, &demand(1, 128), &r, &p).is_ok());
        assert!(place(&hosts, &demand(2, 128), &r, &p).is_err());
        let strict = Ratios {
            cpu: 1.0,
            ..Ratios::default()
        };
        assert!(place(&hosts, &demand(1, 128), &strict, &p).is_err());
        let reserve = Policy {
            reserved: Resources {
                memory_mib: 1024,
                ..Resources::default()
            },
            ..Policy::default()
        };
        let hosts = [host("a", 8, 8192, 0, 0)];
        assert!(place(&hosts, &demand(1, 7168), &r, &reserve).is_ok());
        assert!(place(&hosts, &demand(1, 7169), &r, &reserve).is_err());
    }

    #[test]
    fn spread_picks_the_least_loaded_and_pack_the_most() {
        let hosts = [host("a", 8, 8192, 4, 4096), host("b", 8, 8192, 1, 1024)];
        let d = demand(1, 1024);
        assert_eq!(pick(&hosts, &d, &Policy::default()), "b");
        let pack = Policy {
            strategy: Strategy::Pack,
            ..Policy::default()
        };
        assert_eq!(pick(&hosts, &d, &pack), "a");
    }

    #[test]
    fn host_weight_shifts_the_choice() {
        let mut hosts = [host("a", 8, 8192, 2, 2048), host("b", 8, 8192, 1, 1024)];
        let d = demand(1, 1024);
        assert_eq!(pick(&hosts, &d, &Policy::default()), "b");
        hosts[0].weight = 3.0;
        assert_eq!(pick(&hosts, &d, &Policy::default()), "a");
        hosts[0].weight = 0.0;
        hosts[1].weight = 0.0;
        // Equal scores: the lower host id, so placement is deterministic.
        assert_eq!(pick(&hosts, &d, &Policy::default()), "a");
    }

    #[test]
    fn explains_why_nothing_fits() {
        let mut down = host("d", 64, 65536, 0, 0);
        down.up = false;
        let mut no_image = host("e", 64, 65536, 0, 0);
        no_image.images.clear();
        let mut cordoned = host("f", 64, 65536, 0, 0);
        cordoned.schedulable = false;
        let mut degraded = host("g", 64, 65536, 0, 0);
        degraded.degraded = true;
        let hosts = [
            host("a", 8, 1024, 0, 0),
            host("b", 8, 2048, 0, 0),
            host("c", 1, 65536, 4, 0),
            down,
            no_image,
            cordoned,
            degraded,
        ];
        let e = place(
            &hosts,
            &demand(2, 4096),
            &Ratios::default(),
            &Policy::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no host fits 2 vCPU / 4096 MiB memory / 10 GiB disk with image debian-12: 1 down, 1 degraded (hypervisor not answering), 1 cordoned, 1 lacks the image, 1 lacks vCPUs, 2 lack memory"
        );
        assert_eq!((e.hosts, e.rejects[&Reject::Memory]), (7, 2));
        let e = place(&[], &demand(1, 1), &Ratios::default(), &Policy::default()).unwrap_err();
        assert!(e.to_string().ends_with(": no hosts are registered"), "{e}");
    }

    #[test]
    fn huge_demands_do_not_overflow() {
        let hosts = [host("a", 8, 8192, 1, 1)];
        assert!(
            place(
                &hosts,
                &demand(u64::MAX, 1),
                &Ratios::default(),
                &Policy::default()
            )
            .is_err()
        );
    }
}
