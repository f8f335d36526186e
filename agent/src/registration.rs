//! Registering with the controller and sending heartbeats that carry host and
//! per-VM usage. A controller that forgot this host (or restarted on an empty
//! store) answers `NotFound`, and the agent registers again.

use std::{sync::Arc, time::Duration};

use betang_proto::v1::{
    HeartbeatRequest, RegisterHostRequest, registry_service_client::RegistryServiceClient,
};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::{error::AgentError, host::HostReporter, usage::now_ms, vms::VmManager};

/// VM directories go with one heartbeat in this many (every 30 s at the
/// default 2 s interval).
const DIRS_EVERY: u64 = 15;

pub struct Registration {
    pub controller: Channel,
    pub advertise: String,
    pub host: Arc<HostReporter>,
    pub vms: Arc<VmManager>,
    pub interval: Duration,
    /// The revoked certificates, refreshed from each answer.
    pub revoked: Arc<crate::tls::Revoked>,
}

impl Registration {
    async fn register(&self, client: &mut RegistryServiceClient<Channel>) -> anyhow::Result<()> {
        let info = self.host.info(&self.vms).await?;
        let answer = client
            .register_host(RegisterHostRequest {
                info: Some(info),
                agent_endpoint: self.advertise.clone(),
            })
            .await?;
        self.revoked.replace(answer.into_inner().revoked_serials);
        info!(host_id = %self.host.host_id(), "registered with the controller");
        Ok(())
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let mut client = RegistryServiceClient::new(self.controller.clone());
        let mut registered = false;
        let mut beats: u64 = 0;
        // What of the hypervisor does not answer, and since when (Unix ms).
        let mut problem: Option<(String, i64)> = None;
        // The listing under way, if the last heartbeat did not see it end.
        let mut listing: Option<
            tokio::task::JoinHandle<Result<Vec<betang_proto::v1::VmStatus>, AgentError>>,
        > = None;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if !registered {
                match self.register(&mut client).await {
                    Ok(()) => registered = true,
                    Err(e) => {
                        warn!(error = %e, "cannot register with the controller yet");
                        continue;
                    }
                }
            }
            // The heartbeat never waits long for the listing: a guest that is
            // starting holds its domain's lock in libvirtd for seconds, and
            // a silent libvirtd for ever. A listing still under way is left
            // running (one at a time) and this heartbeat says nothing of the
            // VMs; past the watchdog's patience it says libvirt is silent.
            let handle = listing.get_or_insert_with(|| {
                let vms = self.vms.clone();
                tokio::spawn(async move { vms.list().await })
            });
            let wait = (self.interval / 2).min(Duration::from_secs(1));
            let outcome = match tokio::time::timeout(wait, &mut *handle).await {
                Ok(joined) => {
                    listing = None;
                    Some(joined.unwrap_or_else(|e| Err(AgentError::Internal(e.to_string()))))
                }
                Err(_) => None,
            };
            let silent = self.vms.hypervisor().watchdog().silent_for();
            let (vms, vms_listed) = match outcome {
                Some(Ok(v)) => {
                    problem = None;
                    (v, true)
                }
                Some(Err(e)) => {
                    if problem.is_none() {
                        warn!(error = %e, "cannot list VMs for the heartbeat");
                    }
                    // Said the same way each time, so the controller records
                    // a change only when there is one.
                    let what = match e {
                        AgentError::HypervisorSilent(_) | AgentError::HypervisorTimeout(_) => {
                            "libvirt does not answer".to_owned()
                        }
                        other => other.to_string(),
                    };
                    let since = problem.as_ref().map_or_else(
                        || now_ms() - silent.map_or(0, |d| d.as_millis() as i64),
                        |(_, since)| *since,
                    );
                    problem = Some((what, since));
                    (Vec::new(), false)
                }
                None => {
                    if let (None, Some(d)) = (&problem, silent) {
                        warn!(silent_for = ?d, "libvirt does not answer");
                        problem = Some((
                            "libvirt does not answer".to_owned(),
                            now_ms() - d.as_millis() as i64,
                        ));
                    }
                    (Vec::new(), false)
                }
            };
            // Leftovers are looked for on the first heartbeat and then every
            // DIRS_EVERY-th: an operator hears of them within a minute, and
            // hundreds of hosts do not read their directories twice a second.
            let (vm_dirs, vm_dirs_listed) = if beats.is_multiple_of(DIRS_EVERY) {
                // Cheap, but a directory read still blocks: off the runtime.
                let vms_of = self.vms.clone();
                let dirs = tokio::task::spawn_blocking(move || vms_of.vm_dirs())
                    .await
                    .unwrap_or_else(|e| Err(AgentError::Internal(format!("listing task: {e}"))));
                match dirs {
                    Ok(d) => (d, true),
                    Err(e) => {
                        warn!(error = %e, "cannot list VM directories for the heartbeat");
                        (Vec::new(), false)
                    }
                }
            } else {
                (Vec::new(), false)
            };
            beats += 1;
            let hb = HeartbeatRequest {
                host_id: self.host.host_id().to_owned(),
                usage: Some(self.host.usage(&self.vms)),
                vms,
                vms_listed,
                vm_dirs,
                vm_dirs_listed,
                hypervisor_problem: problem.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                hypervisor_problem_since_ms: problem.as_ref().map_or(0, |p| p.1),
            };
            match client.heartbeat(hb).await {
                Ok(answer) => {
                    self.revoked.replace(answer.into_inner().revoked_serials);
                    self.host.heartbeat_accepted();
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    warn!("controller does not know this host; registering again");
                    registered = false;
                }
                Err(s) => warn!(error = %s, "heartbeat failed"),
            }
        }
    }
}
