//! betangctl: the command line for Betang's gRPC API.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use betang_proto::v1::{
    CreateVpsRequest, DeleteVpsRequest, GetHostRequest, GetVpsRequest, Host, ListHostsRequest,
    ListImagesRequest, ListVpsRequest, RebootVpsRequest, StartVpsRequest, StopVpsRequest, Vps,
    VpsSpec, VpsState, host_service_client::HostServiceClient,
    vps_service_client::VpsServiceClient,
};
use clap::{Parser, Subcommand};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(version, about = "Manage Betang virtual private servers")]
struct Cli {
    /// The controller's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "BETANG_ENDPOINT",
        default_value = "http://127.0.0.1:7000"
    )]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Virtual private servers.
    #[command(subcommand)]
    Vps(VpsCmd),
    /// Hosts (operators).
    #[command(subcommand)]
    Host(HostCmd),
    /// The image catalogue.
    #[command(subcommand)]
    Image(ImageCmd),
}

#[derive(Subcommand)]
enum VpsCmd {
    /// Request a new VPS.
    Create {
        /// Server name; it becomes the hostname (a-z, 0-9, '-').
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        #[arg(long, default_value_t = 10)]
        disk_gib: u64,
        #[arg(long)]
        image: String,
        /// SSH public key file, e.g. ~/.ssh/id_ed25519.pub.
        #[arg(long)]
        ssh_key_file: Option<PathBuf>,
        /// cloud-init user-data file.
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        /// Makes retries safe: the same id never creates a second VPS.
        #[arg(long)]
        request_id: Option<String>,
        /// Wait until the VPS is RUNNING (or fails).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        wait_seconds: u64,
    },
    /// List VPS.
    List {
        /// Include deleted VPS.
        #[arg(long)]
        all: bool,
    },
    /// Show one VPS with its usage.
    Get { id: String },
    Start {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Stop gracefully (ACPI), forcing off after the timeout.
    Stop {
        id: String,
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u32,
        /// Power off at once.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        wait: bool,
    },
    Reboot {
        id: String,
        /// Hard reset instead of asking the guest.
        #[arg(long)]
        force: bool,
    },
    Delete {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Wait until a VPS reaches a state (RUNNING, STOPPED, DELETED, ...).
    Wait {
        id: String,
        state: String,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    List,
    Get { id: String },
}

#[derive(Subcommand)]
enum ImageCmd {
    List,
}

fn state_name(v: &Vps) -> &'static str {
    VpsState::try_from(v.state)
        .unwrap_or(VpsState::Unspecified)
        .as_str_name()
        .trim_start_matches("VPS_STATE_")
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn print_vps(v: &Vps) {
    let spec = v.spec.clone().unwrap_or_default();
    println!("id:        {}", v.id);
    println!("name:      {}", spec.name);
    println!("state:     {}", state_name(v));
    if !v.state_reason.is_empty() {
        println!("reason:    {}", v.state_reason);
    }
    println!(
        "size:      {} vCPU, {} MiB memory, {} GiB disk",
        spec.vcpus, spec.memory_mib, spec.disk_gib
    );
    println!("image:     {}", spec.image);
    println!(
        "host:      {}",
        if v.host_id.is_empty() {
            "-"
        } else {
            &v.host_id
        }
    );
    if let Some(u) = &v.usage {
        println!(
            "cpu:       {:.1}% of one vCPU ({:.1} s in total)",
            u.cpu_rate * 100.0,
            u.cpu_time_ns as f64 / 1e9
        );
        if u.memory_used_bytes > 0 {
            println!(
                "memory:    {} used by the guest of {}",
                mib(u.memory_used_bytes),
                mib(u.memory_max_bytes)
            );
        } else {
            println!(
                "memory:    {} (the guest does not report its own use)",
                mib(u.memory_max_bytes)
            );
        }
        println!("host RSS:  {}", mib(u.memory_rss_bytes));
        println!(
            "disk:      {} read, {} written",
            mib(u.disk_read_bytes),
            mib(u.disk_write_bytes)
        );
        println!(
            "network:   {} received, {} sent",
            mib(u.net_rx_bytes),
            mib(u.net_tx_bytes)
        );
    }
}

fn print_host(h: &Host) {
    let cap = h.capacity.unwrap_or_default();
    let alloc = h.allocated.unwrap_or_default();
    let state = betang_proto::v1::HostState::try_from(h.state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("HOST_STATE_");
    println!("id:         {}", h.id);
    println!("hostname:   {}", h.hostname);
    println!("state:      {state}");
    println!("endpoint:   {}", h.agent_endpoint);
    println!("guests:     {} ({} domains)", h.vps_count, h.domain_type);
    println!(
        "allocated:  {}/{} vCPU, {}/{} MiB, {}/{} GiB",
        alloc.vcpus, cap.vcpus, alloc.memory_mib, cap.memory_mib, alloc.disk_gib, cap.disk_gib
    );
    if let Some(u) = &h.usage {
        println!(
            "usage:      cpu {:.1}%, memory {} of {}, disk {} of {}, load {:.2}",
            u.cpu_percent,
            gib(u.memory_used_bytes),
            gib(u.memory_total_bytes),
            gib(u.disk_used_bytes),
            gib(u.disk_total_bytes),
            u.load_1m
        );
    }
    let images: Vec<_> = h.images.iter().map(|i| i.name.as_str()).collect();
    println!("images:     {}", images.join(", "));
}

async fn wait_for(
    c: &mut VpsServiceClient<Channel>,
    id: &str,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<Vps> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let v = c
            .get_vps(GetVpsRequest { id: id.to_owned() })
            .await?
            .into_inner();
        let s = state_name(&v);
        if s == want {
            return Ok(v);
        }
        if s == "ERROR" && want != "ERROR" {
            bail!("VPS {id} is in ERROR: {}", v.state_reason);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("VPS {id} is {s}, not {want}, after {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", s.code().description(), s.message())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let channel = tonic::transport::Endpoint::from_shared(cli.endpoint.clone())
        .context("--endpoint")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the controller at {}", cli.endpoint))?;
    let mut vps = VpsServiceClient::new(channel.clone());
    let mut hosts = HostServiceClient::new(channel);
    match cli.cmd {
        Cmd::Vps(cmd) => match cmd {
            VpsCmd::Create {
                name,
                vcpus,
                memory_mib,
                disk_gib,
                image,
                ssh_key_file,
                user_data_file,
                request_id,
                wait,
                wait_seconds,
            } => {
                let ssh_public_key = match ssh_key_file {
                    Some(p) => std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?
                        .trim()
                        .to_owned(),
                    None => String::new(),
                };
                let user_data = match user_data_file {
                    Some(p) => std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                    None => String::new(),
                };
                let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                let v = vps
                    .create_vps(CreateVpsRequest {
                        request_id,
                        spec: Some(VpsSpec {
                            name,
                            vcpus,
                            memory_mib,
                            disk_gib,
                            image,
                            ssh_public_key,
                            user_data,
                        }),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let v = if wait {
                    wait_for(
                        &mut vps,
                        &v.id,
                        "RUNNING",
                        Duration::from_secs(wait_seconds),
                    )
                    .await?
                } else {
                    v
                };
                print_vps(&v);
            }
            VpsCmd::List { all } => {
                println!(
                    "{:<36}  {:<20}  {:<12}  {:>5}  {:>8}  {:>6}  {:<16}  {:>6}",
                    "ID", "NAME", "STATE", "VCPU", "MEM MiB", "DISK G", "HOST", "CPU %"
                );
                let mut token = String::new();
                loop {
                    let page = vps
                        .list_vps(ListVpsRequest {
                            page_size: 500,
                            page_token: token.clone(),
                            include_deleted: all,
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    for v in &page.vps {
                        let s = v.spec.clone().unwrap_or_default();
                        println!(
                            "{:<36}  {:<20}  {:<12}  {:>5}  {:>8}  {:>6}  {:<16}  {:>6.1}",
                            v.id,
                            s.name,
                            state_name(v),
                            s.vcpus,
                            s.memory_mib,
                            s.disk_gib,
                            v.host_id,
                            v.usage.map_or(0.0, |u| u.cpu_rate * 100.0)
                        );
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
            }
            VpsCmd::Get { id } => {
                let v = vps
                    .get_vps(GetVpsRequest { id })
                    .await
                    .map_err(status_error)?;
                print_vps(v.get_ref());
            }
            VpsCmd::Start { id, wait } => {
                vps.start_vps(StartVpsRequest { id: id.clone() })
                    .await
                    .map_err(status_error)?;
                if wait {
                    wait_for(&mut vps, &id, "RUNNING", Duration::from_secs(300)).await?;
                }
                println!("{id}: starting");
            }
            VpsCmd::Stop {
                id,
                timeout_seconds,
                force,
                wait,
            } => {
                vps.stop_vps(StopVpsRequest {
                    id: id.clone(),
                    timeout_seconds,
                    force,
                })
                .await
                .map_err(status_error)?;
                if wait {
                    let limit = u64::from(timeout_seconds) + 120;
                    wait_for(&mut vps, &id, "STOPPED", Duration::from_secs(limit)).await?;
                }
                println!("{id}: stopping");
            }
            VpsCmd::Reboot { id, force } => {
                vps.reboot_vps(RebootVpsRequest {
                    id: id.clone(),
                    force,
                })
                .await
                .map_err(status_error)?;
                println!("{id}: rebooted");
            }
            VpsCmd::Delete { id, wait } => {
                vps.delete_vps(DeleteVpsRequest { id: id.clone() })
                    .await
                    .map_err(status_error)?;
                if wait {
                    wait_for(&mut vps, &id, "DELETED", Duration::from_secs(300)).await?;
                }
                println!("{id}: deleting");
            }
            VpsCmd::Wait {
                id,
                state,
                timeout_seconds,
            } => {
                let v = wait_for(
                    &mut vps,
                    &id,
                    &state.to_uppercase(),
                    Duration::from_secs(timeout_seconds),
                )
                .await?;
                print_vps(&v);
            }
        },
        Cmd::Host(HostCmd::List) => {
            let list = hosts
                .list_hosts(ListHostsRequest {})
                .await
                .map_err(status_error)?;
            for (i, h) in list.get_ref().hosts.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_host(h);
            }
        }
        Cmd::Host(HostCmd::Get { id }) => {
            let h = hosts
                .get_host(GetHostRequest { id })
                .await
                .map_err(status_error)?;
            print_host(h.get_ref());
        }
        Cmd::Image(ImageCmd::List) => {
            let list = vps
                .list_images(ListImagesRequest {})
                .await
                .map_err(status_error)?;
            println!(
                "{:<24}  {:<10}  {:>8}  DESCRIPTION",
                "NAME", "OS", "MIN GiB"
            );
            for i in &list.get_ref().images {
                println!(
                    "{:<24}  {:<10}  {:>8}  {}",
                    i.name, i.os, i.min_disk_gib, i.description
                );
            }
        }
    }
    Ok(())
}
