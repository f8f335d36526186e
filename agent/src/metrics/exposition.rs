//! The agent's `/metrics`: the last snapshot rendered by `prometheus-client`
//! at scrape time. Metric names and labels are listed in the README.

use std::{fmt::Error, sync::Arc};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use betang_exposition::{Labels, counters as counter, escape, gauges as gauge};

use super::collector::{Snapshot, StatsCache, VmEntry};
use crate::{
    hypervisor::{Power, Watchdog},
    usage::now_ms,
};

#[derive(Debug)]
pub struct AgentMetrics {
    pub cache: Arc<StatsCache>,
    pub host_id: String,
    /// Whether libvirtd answers, and how many calls are in it now.
    pub watchdog: Arc<Watchdog>,
}

/// One counter of a VM's usage.
type UsageField = fn(&betang_proto::v1::VmUsage) -> u64;

fn vm_labels(v: &VmEntry) -> Labels {
    vec![
        ("vps_id", escape(&v.vps_id)),
        ("vps_name", escape(&v.vps_name)),
        ("institution", escape(&v.institution)),
        ("domain", escape(&v.domain)),
    ]
}

/// A per-VM figure taken from the VM's last counters, for VMs that have some.
fn per_vm<T>(
    s: &Snapshot,
    f: impl Fn(&VmEntry, &betang_proto::v1::VmUsage) -> T,
) -> Vec<(Labels, T)> {
    s.vms
        .values()
        .filter_map(|v| v.usage.as_ref().map(|u| (vm_labels(v), f(v, u))))
        .collect()
}

fn power_name(p: Power) -> &'static str {
    match p {
        Power::Running => "running",
        Power::Stopped => "stopped",
        Power::Paused => "paused",
        Power::Crashed => "crashed",
    }
}

impl Collector for AgentMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let s = self.cache.snapshot();
        let host: Labels = vec![("host_id", escape(&self.host_id))];
        let one = |v: f64| vec![(host.clone(), v)];
        let now = now_ms();

        // The collector's own health.
        gauge(
            &mut e,
            "betang_agent_collection_duration_seconds",
            "How long the last stats pass took.",
            &one(s.last_duration_seconds),
        )?;
        gauge(
            &mut e,
            "betang_agent_collection_last_success_timestamp_seconds",
            "When the last stats pass finished (Unix time; 0: none yet).",
            &one(s.last_success_ms as f64 / 1000.0),
        )?;
        counter(
            &mut e,
            "betang_agent_collections",
            "Stats passes that finished.",
            &[(host.clone(), s.passes_total)],
        )?;
        counter(
            &mut e,
            "betang_agent_collection_failures",
            "Stats passes that failed or did not finish in time.",
            &[(host.clone(), s.failures_total)],
        )?;
        gauge(
            &mut e,
            "betang_agent_libvirt_responding",
            "0 while libvirtd itself does not answer (a listing has waited past libvirt_unresponsive_after_ms).",
            &[(
                host.clone(),
                i64::from(self.watchdog.silent_for().is_none()),
            )],
        )?;
        gauge(
            &mut e,
            "betang_agent_libvirt_calls_running",
            "Threads inside a libvirt call now; a hung guest holds at most one.",
            &[(host.clone(), self.watchdog.running() as i64)],
        )?;
        gauge(
            &mut e,
            "betang_agent_domains",
            "Betang's domains on this host.",
            &[(host.clone(), s.vms.len() as i64)],
        )?;

        if let Some(h) = &s.host {
            gauge(
                &mut e,
                "betang_host_cpus",
                "Logical CPUs of the host.",
                &[(host.clone(), s.host_cpus as i64)],
            )?;
            gauge(
                &mut e,
                "betang_host_cpu_usage_ratio",
                "Share of the host's CPU time in use (0 to 1).",
                &one(h.cpu_percent / 100.0),
            )?;
            gauge(
                &mut e,
                "betang_host_memory_total_bytes",
                "Host memory.",
                &[(host.clone(), h.memory_total_bytes)],
            )?;
            gauge(
                &mut e,
                "betang_host_memory_used_bytes",
                "Host memory in use.",
                &[(host.clone(), h.memory_used_bytes)],
            )?;
            gauge(
                &mut e,
                "betang_host_disk_total_bytes",
                "Size of the file system holding the VM disks.",
                &[(host.clone(), h.disk_total_bytes)],
            )?;
            gauge(
                &mut e,
                "betang_host_disk_used_bytes",
                "Used space on the file system holding the VM disks.",
                &[(host.clone(), h.disk_used_bytes)],
            )?;
            gauge(
                &mut e,
                "betang_host_load1",
                "Load average over 1 minute.",
                &one(h.load_1m),
            )?;
            gauge(
                &mut e,
                "betang_host_load5",
                "Load average over 5 minutes.",
                &one(h.load_5m),
            )?;
            gauge(
                &mut e,
                "betang_host_load15",
                "Load average over 15 minutes.",
                &one(h.load_15m),
            )?;
        }

        let power: Vec<(Labels, i64)> = s
            .vms
            .values()
            .map(|v| {
                let mut l = vm_labels(v);
                l.push(("state", power_name(v.power).to_owned()));
                (l, 1)
            })
            .collect();
        gauge(
            &mut e,
            "betang_vm_power_state",
            "The VM's power state, as the label `state` with value 1.",
            &power,
        )?;
        let addresses: Vec<(Labels, i64)> = s
            .vms
            .values()
            .filter_map(|v| {
                let m = v
                    .state
                    .metadata
                    .as_ref()
                    .filter(|m| !m.address.is_empty())?;
                let mut l = vm_labels(v);
                l.push(("network", escape(&m.network)));
                l.push(("address", escape(&m.address)));
                Some((l, 1))
            })
            .collect();
        gauge(
            &mut e,
            "betang_vm_address_info",
            "The VM's address on its Betang network, as labels with value 1.",
            &addresses,
        )?;
        let stale: Vec<(Labels, i64)> = s
            .vms
            .values()
            .map(|v| (vm_labels(v), i64::from(v.stale)))
            .collect();
        gauge(
            &mut e,
            "betang_vm_stats_stale",
            "1 when the last pass could not ask this VM's monitor (busy or hung): its memory and disk figures are older.",
            &stale,
        )?;
        let responding: Vec<(Labels, i64)> = s
            .vms
            .values()
            .map(|v| (vm_labels(v), i64::from(v.unresponsive_since_ms.is_none())))
            .collect();
        gauge(
            &mut e,
            "betang_vm_responding",
            "0 while the guest's QEMU leaves its monitor unanswered (hung or stopped).",
            &responding,
        )?;
        let silent: Vec<(Labels, f64)> = s
            .vms
            .values()
            .filter_map(|v| {
                let since = v.unresponsive_since_ms?;
                Some((vm_labels(v), (now - since).max(0) as f64 / 1000.0))
            })
            .collect();
        gauge(
            &mut e,
            "betang_vm_unresponsive_seconds",
            "How long the guest has not answered (only for guests that do not).",
            &silent,
        )?;
        gauge(
            &mut e,
            "betang_vm_stats_age_seconds",
            "Age of this VM's figures.",
            &per_vm(&s, |_, u| ((now - u.sampled_at_ms).max(0)) as f64 / 1000.0),
        )?;
        let vcpus: Vec<(Labels, i64)> = s
            .vms
            .values()
            .map(|v| (vm_labels(v), i64::from(v.vcpus)))
            .collect();
        gauge(&mut e, "betang_vm_vcpus", "Virtual CPUs of the VM.", &vcpus)?;
        counter(
            &mut e,
            "betang_vm_cpu_seconds",
            "CPU time the VM has used.",
            &per_vm(&s, |_, u| u.cpu_time_ns as f64 / 1e9),
        )?;
        gauge(
            &mut e,
            "betang_vm_memory_max_bytes",
            "Memory the VM may use.",
            &per_vm(&s, |_, u| u.memory_max_bytes),
        )?;
        gauge(
            &mut e,
            "betang_vm_memory_current_bytes",
            "Memory the balloon currently gives the VM.",
            &per_vm(&s, |_, u| u.memory_current_bytes),
        )?;
        gauge(
            &mut e,
            "betang_vm_memory_used_bytes",
            "Memory in use inside the guest, where its balloon driver reports it (else 0).",
            &per_vm(&s, |_, u| u.memory_used_bytes),
        )?;
        gauge(
            &mut e,
            "betang_vm_memory_rss_bytes",
            "Host memory the VM's process holds.",
            &per_vm(&s, |_, u| u.memory_rss_bytes),
        )?;
        let counters: [(&str, &str, UsageField); 12] = [
            (
                "betang_vm_disk_read_bytes",
                "Bytes read from the VM's disks.",
                |u| u.disk_read_bytes,
            ),
            (
                "betang_vm_disk_written_bytes",
                "Bytes written to the VM's disks.",
                |u| u.disk_write_bytes,
            ),
            (
                "betang_vm_disk_read_requests",
                "Read requests on the VM's disks.",
                |u| u.disk_read_requests,
            ),
            (
                "betang_vm_disk_write_requests",
                "Write requests on the VM's disks.",
                |u| u.disk_write_requests,
            ),
            (
                "betang_vm_network_receive_bytes",
                "Bytes received by the VM's interfaces.",
                |u| u.net_rx_bytes,
            ),
            (
                "betang_vm_network_transmit_bytes",
                "Bytes sent by the VM's interfaces.",
                |u| u.net_tx_bytes,
            ),
            (
                "betang_vm_network_receive_packets",
                "Packets received.",
                |u| u.net_rx_packets,
            ),
            ("betang_vm_network_transmit_packets", "Packets sent.", |u| {
                u.net_tx_packets
            }),
            ("betang_vm_network_receive_errors", "Receive errors.", |u| {
                u.net_rx_errors
            }),
            (
                "betang_vm_network_transmit_errors",
                "Transmit errors.",
                |u| u.net_tx_errors,
            ),
            (
                "betang_vm_network_receive_drops",
                "Received packets dropped.",
                |u| u.net_rx_drops,
            ),
            (
                "betang_vm_network_transmit_drops",
                "Packets to send that were dropped.",
                |u| u.net_tx_drops,
            ),
        ];
        for (name, help, f) in counters {
            counter(&mut e, name, help, &per_vm(&s, |_, u| f(u)))?;
        }
        Ok(())
    }
}
