use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Betang's controller: the gRPC API, the store and the dispatcher.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); see deploy/controller.example.toml.
    #[arg(
        long,
        short,
        env = "BETANG_CONTROLLER_CONFIG",
        default_value = "/etc/betang/controller.toml"
    )]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = betang_controller::config::ControllerConfig::from_toml(&text)
        .with_context(|| format!("in {}", args.config.display()))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let _controller = betang_controller::server::start(cfg, listener).await?;
    tokio::signal::ctrl_c().await?;
    tracing::info!("shutting down");
    Ok(())
}
