use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the API (the default).
    Serve,
    /// Create the data center's own institution and the first admin (if they
    /// do not exist) and print a new token for that admin. Run on the
    /// controller's machine; it writes to the store directly.
    BootstrapAdmin {
        #[arg(long, default_value = "admin")]
        username: String,
        #[arg(long, default_value = "diskominfo")]
        institution_code: String,
        #[arg(long, default_value = "Data center operators")]
        institution_name: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let cfg = betang_controller::config::ControllerConfig::from_toml(&text)
        .with_context(|| format!("in {}", args.config.display()))?;
    match args.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => {
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("binding {}", cfg.listen))?;
            let agent_listener = tokio::net::TcpListener::bind(cfg.agent_listen)
                .await
                .with_context(|| format!("binding {}", cfg.agent_listen))?;
            let controller =
                betang_controller::server::start(cfg, listener, agent_listener).await?;
            betang_exposition::stop_requested().await?;
            tracing::info!("stopping: no new calls; finishing those under way");
            controller.drain(betang_exposition::DRAIN_WITHIN).await;
            tracing::info!("stopped");
        }
        Cmd::BootstrapAdmin {
            username,
            institution_code,
            institution_name,
        } => {
            let store = betang_controller::server::open_store(&cfg)?;
            let now = betang_controller::now_ms();
            let (user, secret) = store.run_sync(|c| {
                betang_controller::store::identity::bootstrap_admin(
                    c,
                    &institution_code,
                    &institution_name,
                    &username,
                    now,
                )
            })?;
            eprintln!(
                "admin {} (user {}) — keep this token secret:",
                user.username, user.id
            );
            println!("{secret}");
        }
    }
    Ok(())
}
