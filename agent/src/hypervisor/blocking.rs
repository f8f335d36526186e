use std::{sync::Arc, time::Duration};

use super::Hypervisor;
use crate::{
    disks::DiskTool,
    error::{AgentError, Result},
};

/// Runs hypervisor calls on tokio's blocking pool with a deadline. A call that
/// overruns keeps its blocking thread, but the caller gets an error at once and
/// other domains go on.
#[derive(Clone)]
pub struct Blocking {
    hv: Arc<dyn Hypervisor>,
    deadline: Duration,
}

impl Blocking {
    pub fn new(hv: Arc<dyn Hypervisor>, deadline: Duration) -> Self {
        Blocking { hv, deadline }
    }

    /// Disk work on the blocking pool. It has no deadline: copying or
    /// creating a file is bounded by its size, not by a guest that may hang.
    pub async fn disks<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn DiskTool) -> Result<T> + Send + 'static,
    {
        let hv = self.hv.clone();
        tokio::task::spawn_blocking(move || f(hv.disks()))
            .await
            .map_err(|e| AgentError::Internal(format!("disk task: {e}")))?
    }

    /// For synchronous callers that are already off the async runtime.
    pub fn disk_tool(&self) -> &dyn DiskTool {
        self.hv.disks()
    }

    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T> + Send + 'static,
    {
        self.call_within(self.deadline, f).await
    }

    pub async fn call_within<T, F>(&self, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T> + Send + 'static,
    {
        let hv = self.hv.clone();
        let task = tokio::task::spawn_blocking(move || f(hv.as_ref()));
        match tokio::time::timeout(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(AgentError::Internal(format!("hypervisor task: {join}"))),
            Err(_) => Err(AgentError::HypervisorTimeout(deadline)),
        }
    }
}
