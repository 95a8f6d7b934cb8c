//! `kvtier`: one binary, one subcommand per role.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvtier_router::{RouterArgs, StaticDiscovery};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// KV-cache-aware LLM serving for agent workloads.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// OpenAI-compatible router: sticky sessions, whole-prompt prefix affinity, token-cost
    /// load balancing, failover.
    Router(RouterArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The control runtime: accepting, discovery, health checks. Each role starts the
    // threads its work needs (the router: one worker runtime per CPU).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvtier: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line, not a backtrace: bad flags are the usual cause.
            eprintln!("kvtier: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("KVTIER_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match cli.role {
        Role::Router(args) => {
            let (config, listen, metrics_listen) = args.into_config()?;
            let listener =
                TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
            let metrics_listener = match metrics_listen {
                Some(addr) => {
                    Some(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?)
                }
                None => None,
            };
            let discovery = Arc::new(StaticDiscovery::new(config.endpoints.clone()));
            kvtier_router::run(config, listener, metrics_listener, discovery, shutdown_signal())
                .await?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
