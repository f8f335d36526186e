//! Usage measurement: per-VM counters turned into rates between two samples,
//! and host figures from `sysinfo`.

use std::{
    collections::HashMap,
    path::Path,
    sync::Mutex,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use betang_proto::v1::{HostUsage, VmUsage};

use crate::hypervisor::DomainStats;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Remembers the previous CPU-time sample of each VM to report a rate.
#[derive(Default)]
pub struct CpuRates {
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl CpuRates {
    pub fn usage(&self, vps_id: &str, s: &DomainStats) -> VmUsage {
        self.usage_at(vps_id, s, Instant::now())
    }

    pub fn usage_at(&self, vps_id: &str, s: &DomainStats, at: Instant) -> VmUsage {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let rate = match last.get(vps_id) {
            Some((t, prev)) if s.cpu_time_ns >= *prev && at > *t => {
                (s.cpu_time_ns - prev) as f64 / at.duration_since(*t).as_nanos() as f64
            }
            _ => 0.0,
        };
        last.insert(vps_id.to_owned(), (at, s.cpu_time_ns));
        VmUsage {
            cpu_rate: rate,
            cpu_time_ns: s.cpu_time_ns,
            memory_max_bytes: s.memory_max_kib * 1024,
            memory_used_bytes: s.memory_used_kib * 1024,
            memory_rss_bytes: s.memory_rss_kib * 1024,
            disk_read_bytes: s.disk_read_bytes,
            disk_write_bytes: s.disk_write_bytes,
            net_rx_bytes: s.net_rx_bytes,
            net_tx_bytes: s.net_tx_bytes,
            sampled_at_ms: now_ms(),
            memory_current_bytes: s.memory_current_kib * 1024,
            disk_read_requests: s.disk_read_requests,
            disk_write_requests: s.disk_write_requests,
            net_rx_packets: s.net_rx_packets,
            net_tx_packets: s.net_tx_packets,
            net_rx_errors: s.net_rx_errors,
            net_tx_errors: s.net_tx_errors,
            net_rx_drops: s.net_rx_drops,
            net_tx_drops: s.net_tx_drops,
        }
    }

    pub fn forget(&self, vps_id: &str) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vps_id);
    }
}

/// Host figures. `sysinfo` needs two CPU refreshes to give a percentage, so
/// the `System` is kept between samples.
pub struct HostSampler {
    sys: Mutex<sysinfo::System>,
}

impl HostSampler {
    pub fn cpus(&self) -> usize {
        self.sys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cpus()
            .len()
    }
}

impl Default for HostSampler {
    fn default() -> Self {
        let mut sys = sysinfo::System::new();
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        HostSampler {
            sys: Mutex::new(sys),
        }
    }
}

impl HostSampler {
    pub fn sample(&self, vm_dir: &Path) -> HostUsage {
        let mut sys = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let load = sysinfo::System::load_average();
        let (disk_used, disk_total) = disk_of(vm_dir);
        HostUsage {
            cpu_percent: f64::from(sys.global_cpu_usage()),
            memory_used_bytes: sys.used_memory(),
            memory_total_bytes: sys.total_memory(),
            disk_used_bytes: disk_used,
            disk_total_bytes: disk_total,
            load_1m: load.one,
            load_5m: load.five,
            load_15m: load.fifteen,
            sampled_at_ms: now_ms(),
        }
    }
}

/// (used, total) bytes of the file system holding `dir`.
pub fn disk_of(dir: &Path) -> (u64, u64) {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.total_space() - d.available_space(), d.total_space()))
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cpu_rate_comes_from_two_samples() {
        let r = CpuRates::default();
        let t0 = Instant::now();
        let mut s = DomainStats {
            cpu_time_ns: 1_000_000_000,
            memory_max_kib: 131072,
            ..Default::default()
        };
        let first = r.usage_at("a", &s, t0);
        assert_eq!(first.cpu_rate, 0.0);
        assert_eq!(first.memory_max_bytes, 128 << 20);
        s.cpu_time_ns += 3_000_000_000;
        let second = r.usage_at("a", &s, t0 + Duration::from_secs(2));
        assert!((second.cpu_rate - 1.5).abs() < 1e-9, "{}", second.cpu_rate);
        // A restarted guest's counter goes back to zero: no negative rate.
        s.cpu_time_ns = 10;
        let third = r.usage_at("a", &s, t0 + Duration::from_secs(3));
        assert_eq!(third.cpu_rate, 0.0);
    }

    #[test]
    fn host_sample_has_memory_and_disk() {
        let h = HostSampler::default().sample(Path::new("/"));
        assert!(h.memory_total_bytes > 0);
        assert!(h.disk_total_bytes > 0);
    }
}
