//! What this host offers and uses, as the controller sees it.

use betang_proto::v1::{HostCapacity, HostInfoResponse, Image};

use crate::{config::CapacityConfig, error::Result, vms::VmManager};

pub struct HostReporter {
    host_id: String,
    zone: String,
    labels: std::collections::BTreeMap<String, String>,
    hostname: String,
    capacity: Option<CapacityConfig>,
    /// Unix milliseconds of the last heartbeat the controller accepted; 0 before.
    last_heartbeat_ms: std::sync::atomic::AtomicI64,
}

impl HostReporter {
    pub fn new(
        host_id: String,
        capacity: Option<CapacityConfig>,
        zone: String,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Self {
        HostReporter {
            host_id,
            zone,
            labels,
            hostname: sysinfo::System::host_name().unwrap_or_default(),
            capacity,
            last_heartbeat_ms: Default::default(),
        }
    }

    pub fn heartbeat_accepted(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.last_heartbeat_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn last_heartbeat_ms(&self) -> i64 {
        self.last_heartbeat_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The collector's last host figures (zeros until its first pass
    /// succeeds; the agent makes one before it starts).
    pub fn usage(&self, vms: &VmManager) -> betang_proto::v1::HostUsage {
        vms.stats.snapshot().host.unwrap_or_default()
    }

    pub async fn info(&self, vms: &VmManager) -> Result<HostInfoResponse> {
        let capacity = match self.capacity {
            Some(c) => HostCapacity {
                vcpus: c.vcpus,
                memory_mib: c.memory_mib,
                disk_gib: c.disk_gib,
            },
            None => {
                let node = vms.hypervisor().call(|hv| hv.node()).await?;
                let (_, disk_total) = crate::usage::disk_of(vms.vm_dir());
                // libvirt's node memory can be a NUMA cell's share of it;
                // the kernel's total is what guests can be given.
                let total = self.usage(vms).memory_total_bytes;
                HostCapacity {
                    vcpus: node.cpus,
                    memory_mib: if total > 0 {
                        total >> 20
                    } else {
                        node.memory_kib / 1024
                    },
                    disk_gib: disk_total / crate::disks::GIB,
                }
            }
        };
        let images = vms
            .catalog()
            .images()
            .map(|i| Image {
                name: i.name.clone(),
                description: i.description.clone(),
                os: i.os.clone(),
                min_disk_gib: i.min_disk_gib(),
                size_bytes: i.size_bytes,
                digest: i.digest.clone(),
                min_memory_mib: i.min_memory_mib,
                ..Image::default()
            })
            .collect();
        Ok(HostInfoResponse {
            host_id: self.host_id.clone(),
            hostname: self.hostname.clone(),
            capacity: Some(capacity),
            usage: Some(self.usage(vms)),
            images,
            domain_type: vms.domain_type().as_str().to_owned(),
            zone: self.zone.clone(),
            labels: self.labels.clone().into_iter().collect(),
        })
    }
}
