//! A guest network of a test's own: a bridge with no uplink and no address,
//! and a client in a network namespace holding one end of a veth pair whose
//! other end is on the bridge. Addresses come from 198.18.0.0/15, so nothing
//! can route off the machine. Removed when dropped; what a killed run left
//! behind is swept by the next.

use std::{process::Command, time::Duration};

use betang_proto::v1::{CreateNetworkRequest, GrantNetworkRequest, Network};

use crate::Clients;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub struct Lan {
    pub bridge: String,
    pub ns: String,
    subnet: u8,
}

impl Lan {
    /// Removes what a run killed outright (no Drop ran) left behind: only
    /// this module makes `btb…` bridges and `btn…` namespaces.
    fn sweep() {
        let list = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for line in list(&["netns", "list"]).lines() {
            if let Some(ns) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with("btn"))
            {
                let _ = ip(&["netns", "del", ns]);
            }
        }
        for line in list(&["-o", "link", "show", "type", "bridge"]).lines() {
            if let Some(br) = line.split(": ").nth(1).filter(|n| n.starts_with("btb")) {
                let _ = ip(&["link", "del", br]);
            }
        }
    }

    pub fn create() -> anyhow::Result<Lan> {
        Lan::sweep();
        let tag = format!("{:08x}", fastrand::u32(..));
        let lan = Lan {
            bridge: format!("btb{tag}"),
            ns: format!("btn{tag}"),
            subnet: fastrand::u8(1..=250),
        };
        let (host_end, ns_end) = (format!("btv{tag}h"), format!("btv{tag}n"));
        ip(&["link", "add", &lan.bridge, "type", "bridge"])?;
        ip(&["link", "set", &lan.bridge, "up"])?;
        ip(&["netns", "add", &lan.ns])?;
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
        ])?;
        ip(&["link", "set", &host_end, "master", &lan.bridge])?;
        ip(&["link", "set", &host_end, "up"])?;
        ip(&["link", "set", &ns_end, "netns", &lan.ns])?;
        let me = format!("{}/28", lan.client());
        ip(&["-n", &lan.ns, "addr", "add", &me, "dev", &ns_end])?;
        ip(&["-n", &lan.ns, "link", "set", &ns_end, "up"])?;
        ip(&["-n", &lan.ns, "link", "set", "lo", "up"])?;
        // Asks who has an address every 50 ms (not every second), for a
        // minute before giving up: a guest that comes up is heard at once.
        let neigh = format!("/proc/sys/net/ipv4/neigh/{ns_end}");
        let out = Command::new("ip")
            .args(["netns", "exec", &lan.ns, "sh", "-c"])
            .arg(format!(
                "echo 50 > {neigh}/retrans_time_ms && echo 1200 > {neigh}/mcast_solicit"
            ))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "neighbour settings in {}: {}",
            lan.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(lan)
    }

    /// A Betang network on this bridge (the client's address kept out of
    /// it), granted to `institution` as its default; its name.
    pub async fn define_network(&self, op: &Clients, institution: &str) -> anyhow::Result<String> {
        let name = format!("n{:08x}", fastrand::u32(..));
        op.networks
            .clone()
            .create_network(CreateNetworkRequest {
                network: Some(Network {
                    name: name.clone(),
                    attach_kind: "bridge".into(),
                    attach_source: self.bridge.clone(),
                    cidr: self.cidr(),
                    reserved: self.client(),
                    ..Default::default()
                }),
            })
            .await?;
        op.networks
            .clone()
            .grant_network(GrantNetworkRequest {
                name: name.clone(),
                institution_id: institution.to_owned(),
                is_default: true,
            })
            .await?;
        Ok(name)
    }

    pub fn cidr(&self) -> String {
        format!("198.18.{}.0/28", self.subnet)
    }

    /// The namespace's own address, kept out of the network's allocation.
    pub fn client(&self) -> String {
        format!("198.18.{}.14", self.subnet)
    }

    /// The first line that answers on TCP port 80 at `addr`, asked once from
    /// the namespace.
    pub fn ask(&self, addr: &str) -> Option<String> {
        let _ = Command::new("ip")
            .args(["-n", &self.ns, "neigh", "flush", "all"])
            .status();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", "3", "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{addr}/80 && timeout 2 head -n 1 <&3"
            ))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!text.is_empty()).then_some(text)
    }

    /// Asks `addr` from the namespace every 20 ms until it answers (one
    /// process in the namespace, so that what is measured is the guest, not
    /// starting processes); the first line it answered. The namespace first
    /// forgets the MACs it learnt: an address that served another guest
    /// before would otherwise be sent to that guest's MAC until the entry
    /// went stale, many seconds later (the test guest announces nothing).
    pub async fn wait_answer(&self, addr: &str, within: Duration) -> anyhow::Result<String> {
        ip(&["-n", &self.ns, "neigh", "flush", "all"])?;
        let script = format!(
            "while :; do \
               r=$(timeout 0.5 bash -c 'exec 3<>/dev/tcp/{addr}/80 && head -n 1 <&3' 2>/dev/null); \
               [ -n \"$r\" ] && {{ echo \"$r\"; exit 0; }}; sleep 0.02; \
             done"
        );
        let out = tokio::time::timeout(
            within,
            tokio::process::Command::new("ip")
                .args(["netns", "exec", &self.ns, "bash", "-c", &script])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("nothing answered at {addr} within {within:?}"))??;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
