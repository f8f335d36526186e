use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Betang's host agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); see deploy/agent.example.toml.
    #[arg(
        long,
        short,
        env = "BETANG_AGENT_CONFIG",
        default_value = "/etc/betang/agent.toml"
    )]
    config: PathBuf,
}

// Two workers whatever the host's size: the agent waits on libvirt and the
// network, and the host's cores belong to its guests.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    betang_agent::memory::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Plain text in log files, colours on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = betang_agent::config::AgentConfig::from_toml(&text)
        .with_context(|| format!("in {}", args.config.display()))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let agent = betang_agent::server::start(cfg, listener).await?;
    betang_exposition::stop_requested().await?;
    tracing::info!("stopping: no new calls; finishing those under way; guests keep running");
    agent.drain(betang_exposition::DRAIN_WITHIN).await;
    tracing::info!("stopped");
    Ok(())
}
