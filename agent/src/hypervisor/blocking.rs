use std::{sync::Arc, time::Duration};

use super::{Hypervisor, Watchdog};
use crate::{
    disks::DiskTool,
    error::{AgentError, Result},
};

/// Runs hypervisor calls on tokio's blocking pool with a deadline. A call that
/// overruns keeps its blocking thread, but the caller gets an error at once and
/// other domains go on. While libvirt itself does not answer (the watchdog
/// says so), calls are refused at once instead of adding threads that would
/// wait on it too.
#[derive(Clone)]
pub struct Blocking {
    hv: Arc<dyn Hypervisor>,
    deadline: Duration,
    watchdog: Arc<Watchdog>,
}

impl Blocking {
    pub fn new(hv: Arc<dyn Hypervisor>, deadline: Duration, watchdog: Arc<Watchdog>) -> Self {
        Blocking {
            hv,
            deadline,
            watchdog,
        }
    }

    pub fn watchdog(&self) -> &Arc<Watchdog> {
        &self.watchdog
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
        self.run(false, self.deadline, f).await
    }

    /// A call that never waits on a guest (listing, a lookup, the quick
    /// stats): it gets the watchdog's patience, and one that overruns it
    /// marks libvirt as not answering.
    pub async fn quick<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T> + Send + 'static,
    {
        self.run(true, self.watchdog.patience(), f).await
    }

    /// Starts a call that may wait on a guest and has no deadline of its
    /// own; the caller decides how long to wait for the handle. The thread is
    /// counted by the watchdog until the call returns.
    pub fn start<T, F>(&self, f: F) -> Result<tokio::task::JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T> + Send + 'static,
    {
        self.refuse_while_silent()?;
        let (hv, dog) = (self.hv.clone(), self.watchdog.clone());
        Ok(tokio::task::spawn_blocking(move || {
            let _running = dog.enter(false);
            f(hv.as_ref())
        }))
    }

    fn refuse_while_silent(&self) -> Result<()> {
        match self.watchdog.silent_for() {
            Some(d) => Err(AgentError::HypervisorSilent(d)),
            None => Ok(()),
        }
    }

    async fn run<T, F>(&self, quick: bool, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T> + Send + 'static,
    {
        self.refuse_while_silent()?;
        let (hv, dog) = (self.hv.clone(), self.watchdog.clone());
        let task = tokio::task::spawn_blocking(move || {
            let _running = dog.enter(quick);
            f(hv.as_ref())
        });
        match tokio::time::timeout(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(AgentError::Internal(format!("hypervisor task: {join}"))),
            Err(_) if quick => Err(AgentError::HypervisorSilent(deadline)),
            Err(_) => Err(AgentError::HypervisorTimeout(deadline)),
        }
    }
}
