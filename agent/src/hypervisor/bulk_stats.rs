//! Every domain's counters in one libvirt call (`virConnectGetAllDomainStats`),
//! always with the no-wait flag: libvirt skips the domains whose monitor is
//! busy instead of queueing behind them. Two passes use it: the quick one asks
//! only what the host knows (state, cgroup CPU time, tap counters) and never
//! touches a guest; the guest one asks the monitors (balloon, block, vCPU) and
//! can be held by a guest that stops answering while it runs.
//! The `virt` crate exposes the records only as raw pointers, hence the one
//! unsafe block here; everything it reads is copied out before the list is
//! freed.
#![allow(unsafe_code)]

use std::{collections::BTreeMap, ffi::CStr, ptr};

use virt::{connect::Connect, domain::Domain, sys};

use super::{Control, DomainSample, DomainStats, Power};
use crate::names;

/// One typed parameter's value, widened.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Int(i64),
    Uint(u64),
    Double(f64),
    Other,
}

impl Value {
    fn as_u64(self) -> u64 {
        match self {
            Value::Int(v) => v.max(0) as u64,
            Value::Uint(v) => v,
            Value::Double(v) if v > 0.0 => v as u64,
            _ => 0,
        }
    }
}

/// A domain's record: its name and each `field=value`.
struct Record {
    name: String,
    fields: BTreeMap<String, Value>,
    /// For what is asked of the domain call by call: its CPU time, and for
    /// libvirt's test driver (which reports nothing but the state in bulk)
    /// the guest figures.
    domain: Option<Domain>,
}

/// What the host itself knows; needs no job on the domain. Not CPU_TOTAL:
/// since libvirt 9.0 that group takes the domain's job and asks its monitor
/// (`query-stats`, for halt-polling time), so a guest that hung an instant
/// before would hold the quick pass and, with it, every listing behind it.
/// CPU time comes from `virDomainGetInfo` instead, which reads `/proc`.
const QUICK: sys::virDomainStatsTypes =
    sys::VIR_DOMAIN_STATS_STATE | sys::VIR_DOMAIN_STATS_INTERFACE;

/// What only the guest's monitor gives.
const GUEST: sys::virDomainStatsTypes =
    sys::VIR_DOMAIN_STATS_BALLOON | sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_BLOCK;

fn records(
    conn: &Connect,
    groups: sys::virDomainStatsTypes,
    flags: u32,
    keep_domains: bool,
) -> Result<Vec<Record>, virt::error::Error> {
    let mut list: *mut sys::virDomainStatsRecordPtr = ptr::null_mut();
    // SAFETY: `conn` is open for the whole call; libvirt allocates `list`, a
    // NULL-terminated array that is read only before the single
    // `virDomainStatsRecordListFree` below. Every string is copied into an
    // owned `String`, and a domain kept past the free gets its own reference.
    unsafe {
        let n = sys::virConnectGetAllDomainStats(
            conn.as_ptr(),
            groups,
            &mut list,
            flags | sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT,
        );
        if n < 0 {
            return Err(virt::error::Error::last_error());
        }
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let rec = *list.add(i);
            let name_ptr = sys::virDomainGetName((*rec).dom);
            if name_ptr.is_null() {
                continue;
            }
            let name = CStr::from_ptr(name_ptr).to_string_lossy().into_owned();
            if names::vps_id_of_domain(&name).is_none() {
                continue;
            }
            let mut fields = BTreeMap::new();
            for j in 0..(*rec).nparams.max(0) as usize {
                let p = &*(*rec).params.add(j);
                let key = CStr::from_ptr(p.field.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                let v = match p.type_ as u32 {
                    sys::VIR_TYPED_PARAM_INT => Value::Int(i64::from(p.value.i)),
                    sys::VIR_TYPED_PARAM_UINT => Value::Uint(u64::from(p.value.ui)),
                    sys::VIR_TYPED_PARAM_LLONG => Value::Int(p.value.l),
                    sys::VIR_TYPED_PARAM_ULLONG => Value::Uint(p.value.ul),
                    sys::VIR_TYPED_PARAM_DOUBLE => Value::Double(p.value.d),
                    _ => Value::Other,
                };
                fields.insert(key, v);
            }
            let domain = if !keep_domains {
                None
            } else if sys::virDomainRef((*rec).dom) == 0 {
                Some(Domain::from_ptr((*rec).dom))
            } else {
                None
            };
            out.push(Record {
                name,
                fields,
                domain,
            });
        }
        sys::virDomainStatsRecordListFree(list);
        Ok(out)
    }
}

/// Power, CPU time and network counters of Betang's domains on `conn`.
pub fn quick(conn: &Connect) -> Result<Vec<DomainSample>, virt::error::Error> {
    Ok(records(conn, QUICK, 0, true)?
        .into_iter()
        .map(|r| {
            let mut sample = sample_of(&r.name, &r.fields);
            if let Some(info) = r.domain.and_then(|d| d.info().ok()) {
                sample.stats.cpu_time_ns = info.cpu_time;
            }
            sample
        })
        .collect())
}

/// Memory, disk and vCPU figures of Betang's running domains on `conn`, for
/// those whose monitor answered (a domain it skipped has only what its
/// definition says).
pub fn guest(conn: &Connect, test_driver: bool) -> Result<Vec<DomainSample>, virt::error::Error> {
    Ok(records(
        conn,
        GUEST,
        sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
        test_driver,
    )?
    .into_iter()
    .filter_map(|r| match r.domain {
        Some(d) => {
            let mut sample = sample_of(&r.name, &r.fields);
            sample.stats = super::libvirt::domain_stats(&d).ok()?;
            Some(sample)
        }
        None => monitor_answered(&r.fields).then(|| sample_of(&r.name, &r.fields)),
    })
    .collect())
}

/// `virDomainGetControlInfo`, which the `virt` crate does not wrap: whether
/// the domain's monitor answers, from libvirt's own bookkeeping (no job, no
/// monitor command).
pub fn control(dom: &Domain) -> Result<Control, virt::error::Error> {
    let mut info = sys::virDomainControlInfo {
        state: 0,
        details: 0,
        stateTime: 0,
    };
    // SAFETY: `dom` holds a reference for the whole call, and libvirt only
    // fills the struct it is given.
    let rc = unsafe { sys::virDomainGetControlInfo(dom.as_ptr(), &mut info, 0) };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(match info.state {
        sys::VIR_DOMAIN_CONTROL_OCCUPIED => {
            Control::Busy(std::time::Duration::from_millis(info.stateTime))
        }
        sys::VIR_DOMAIN_CONTROL_ERROR => Control::Broken,
        _ => Control::Answering,
    })
}

/// Counters that libvirt reads from the monitor, present only when it could
/// ask it (the balloon's and the disks' figures).
fn monitor_answered(f: &BTreeMap<String, Value>) -> bool {
    f.contains_key("balloon.rss") || f.contains_key("block.0.rd.reqs")
}

fn sample_of(name: &str, f: &BTreeMap<String, Value>) -> DomainSample {
    let get = |k: &str| f.get(k).map_or(0, |v| v.as_u64());
    let sum = |group: &str, field: &str| {
        (0..get(&format!("{group}.count")))
            .map(|i| get(&format!("{group}.{i}.{field}")))
            .sum::<u64>()
    };
    let (available, unused) = (get("balloon.available"), get("balloon.unused"));
    let stats = DomainStats {
        cpu_time_ns: get("cpu.time"),
        vcpus: get("vcpu.current") as u32,
        memory_max_kib: get("balloon.maximum"),
        memory_current_kib: get("balloon.current"),
        memory_used_kib: if available > 0 {
            available.saturating_sub(unused)
        } else {
            0
        },
        memory_rss_kib: get("balloon.rss"),
        disk_read_bytes: sum("block", "rd.bytes"),
        disk_write_bytes: sum("block", "wr.bytes"),
        disk_read_requests: sum("block", "rd.reqs"),
        disk_write_requests: sum("block", "wr.reqs"),
        net_rx_bytes: sum("net", "rx.bytes"),
        net_tx_bytes: sum("net", "tx.bytes"),
        net_rx_packets: sum("net", "rx.pkts"),
        net_tx_packets: sum("net", "tx.pkts"),
        net_rx_errors: sum("net", "rx.errs"),
        net_tx_errors: sum("net", "tx.errs"),
        net_rx_drops: sum("net", "rx.drop"),
        net_tx_drops: sum("net", "tx.drop"),
    };
    DomainSample {
        name: name.to_owned(),
        power: power_of_state(get("state.state") as u32),
        stats,
    }
}

fn power_of_state(state: u32) -> Power {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED | sys::VIR_DOMAIN_SHUTDOWN => {
            Power::Running
        }
        sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_PMSUSPENDED => Power::Paused,
        sys::VIR_DOMAIN_CRASHED => Power::Crashed,
        _ => Power::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_becomes_summed_counters() {
        let mut f = BTreeMap::new();
        for (k, v) in [
            ("state.state", Value::Int(1)),
            ("cpu.time", Value::Uint(5_000_000_000)),
            ("vcpu.current", Value::Uint(2)),
            ("balloon.maximum", Value::Uint(1 << 20)),
            ("balloon.current", Value::Uint(1 << 19)),
            ("balloon.available", Value::Uint(500_000)),
            ("balloon.unused", Value::Uint(200_000)),
            ("block.count", Value::Uint(2)),
            ("block.0.rd.bytes", Value::Uint(100)),
            ("block.1.rd.bytes", Value::Uint(23)),
            ("block.1.wr.reqs", Value::Uint(7)),
            ("net.count", Value::Uint(1)),
            ("net.0.rx.pkts", Value::Uint(9)),
            ("net.0.tx.drop", Value::Uint(4)),
            // Counters past `count` belong to nothing and are ignored.
            ("net.1.rx.pkts", Value::Uint(1000)),
        ] {
            f.insert(k.to_owned(), v);
        }
        let s = sample_of("betang-x", &f);
        assert_eq!(s.power, Power::Running);
        assert_eq!(s.stats.cpu_time_ns, 5_000_000_000);
        assert_eq!(s.stats.vcpus, 2);
        assert_eq!(s.stats.memory_current_kib, 1 << 19);
        assert_eq!(s.stats.memory_used_kib, 300_000);
        assert_eq!(s.stats.disk_read_bytes, 123);
        assert_eq!(s.stats.disk_write_requests, 7);
        assert_eq!(s.stats.net_rx_packets, 9);
        assert_eq!(s.stats.net_tx_drops, 4);
    }

    #[test]
    fn power_follows_the_libvirt_state() {
        assert_eq!(power_of_state(sys::VIR_DOMAIN_SHUTOFF), Power::Stopped);
        assert_eq!(power_of_state(sys::VIR_DOMAIN_PAUSED), Power::Paused);
        assert_eq!(power_of_state(sys::VIR_DOMAIN_CRASHED), Power::Crashed);
        assert_eq!(power_of_state(99), Power::Stopped);
    }
}
