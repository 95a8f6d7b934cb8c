//! `stub-engine`: stand-in engines on loopback for the router benchmark.

use clap::Parser;
use kvtier_testkit::StubEngine;

/// Serve instant OpenAI-shaped answers on one or more loopback ports.
#[derive(Parser, Debug)]
struct Args {
    /// Ports to listen on, one stand-in each.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut engines = Vec::new();
    for port in args.ports {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let engine = StubEngine::serve(listener, &format!("stub-{port}"));
        engine.set_record(false);
        engines.push(engine);
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
