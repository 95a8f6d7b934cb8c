//! `kvtier`: one binary, one subcommand per role.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kvtier_router::{PodDiscovery, RouterArgs, StaticDiscovery};
use kvtier_sim::{Profile, Sim, SimOptions, Strategy};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

mod bench;
mod install;
mod node_agent;
mod plan;

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
    Router(Box<RouterArgs>),
    /// A simulated engine: vLLM's OpenAI surface over a model of batching, prefill, an HBM
    /// prefix cache and host KV tiers, at a chosen multiple of real time.
    Sim(SimArgs),
    /// Replay agent traces against an OpenAI endpoint and report TTFT, throughput and cache
    /// hits.
    Bench(bench::BenchArgs),
    /// The whole stack on this machine: simulated replicas, the router and trace replay,
    /// for each KV strategy and routing policy, under stress and at low load.
    Demo(bench::DemoArgs),
    /// KV arithmetic and the recommended strategy for a model, GPUs and load.
    Plan(plan::PlanArgs),
    /// The node's KV tiers: a locked DRAM pool shared with every engine replica on the node
    /// over a Unix socket.
    NodeAgent(node_agent::NodeAgentArgs),
    /// Print the KVCachedInference CRD (YAML), as `crds/` holds it.
    Crdgen {
        /// Print the Helm chart's template of it instead (`charts/kvtier/templates/crd.yaml`).
        #[arg(long)]
        chart: bool,
    },
    /// The Kubernetes operator: reconciles KVCachedInference resources into engine replicas,
    /// the router and node-agents.
    Operator(kvtier_operator::cli::OperatorArgs),
    /// Copy the connector's Python package out of the kvtier image into a folder (what the
    /// operator's init container runs in tiered engine Pods).
    InstallConnector(install::InstallConnectorArgs),
}

/// Parses a duration in simulated seconds: `90`, `90s`, `20m`, `1h`.
pub(crate) fn sim_seconds(s: &str) -> Result<f64, String> {
    if let Ok(v) = s.parse::<f64>() {
        if v.is_finite() && v >= 0.0 {
            return Ok(v);
        }
        return Err(format!("{s:?} is not a duration"));
    }
    humantime::parse_duration(s).map(|d| d.as_secs_f64()).map_err(|e| format!("{s:?}: {e}"))
}

pub(crate) fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: std::net::SocketAddr,
    /// A built-in profile (minimax-m2.5-2xmi300x, llama-3.1-8b-h100) or a profile file.
    #[arg(long, default_value = "minimax-m2.5-2xmi300x")]
    profile: String,
    /// Simulated seconds per real second.
    #[arg(long, default_value = "1", value_parser = positive)]
    time_scale: f64,
    /// How KV is kept between requests.
    #[arg(long, default_value = "hbm")]
    strategy: Strategy,
    /// Model id to serve instead of the profile's.
    #[arg(long)]
    served_model_name: Option<String>,
    /// How long the model's answers are: a request whose token limit is larger ends its turn
    /// after this many tokens, as a model does (agents send a large `max_tokens` as a cap).
    /// Without it every request generates its whole limit.
    #[arg(long)]
    answer_tokens: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The control runtime: accepting, discovery, health checks, the simulator's engine and
    // the replay. Each role starts the threads its work needs (the router: one worker
    // runtime per CPU).
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

pub(crate) fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The demo starts and stops a router per run; its lifecycle lines would bury the table.
    let default_filter = if matches!(cli.role, Role::Demo(_)) { "warn" } else { "info" };
    let filter =
        EnvFilter::try_from_env("KVTIER_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // KVTIER_LOG_FORMAT=json: one JSON object per line, for log pipelines in a cluster.
    if std::env::var("KVTIER_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    match cli.role {
        Role::Router(args) => {
            let pods = args.pod_selector();
            let agents = args.residency_pods.clone().map(|sel| (sel, args.residency_port));
            let (mut config, listen, metrics_listen) = args.into_config()?;
            if let Some((selector, port)) = agents {
                let client = kube::Client::try_default().await.context(
                    "--residency-pods needs a cluster: set KUBECONFIG or run inside a Pod",
                )?;
                let ns = pods
                    .as_ref()
                    .and_then(|p| p.namespace.clone())
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                tracing::info!(namespace = %ns, %selector, "following node-agent residency");
                let found = PodDiscovery::start(client, &ns, &selector, port);
                if let Some(t) = config.tiers.as_mut() {
                    // The watch task keeps the channel open after `found` goes.
                    t.agents = Some(kvtier_router::Discovery::subscribe(&found));
                }
            }
            let listener =
                TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
            let metrics_listener = match metrics_listen {
                Some(addr) => {
                    Some(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?)
                }
                None => None,
            };
            let discovery: Arc<dyn kvtier_router::Discovery> = match pods {
                None => Arc::new(StaticDiscovery::new(config.endpoints.clone())),
                Some(p) => {
                    let client = kube::Client::try_default().await.context(
                        "--discover-pods needs a cluster: set KUBECONFIG or run inside a Pod",
                    )?;
                    let ns = p.namespace.unwrap_or_else(|| client.default_namespace().to_owned());
                    tracing::info!(namespace = %ns, selector = %p.selector, "discovering engine Pods");
                    Arc::new(PodDiscovery::start(client, &ns, &p.selector, p.port))
                }
            };
            kvtier_router::run(config, listener, metrics_listener, discovery, shutdown_signal())
                .await?;
        }
        Role::Sim(a) => sim(a).await?,
        Role::Bench(a) => bench::bench(a).await?,
        Role::Demo(a) => bench::demo_cmd(a).await?,
        Role::Plan(a) => out(&plan::run(&a)?),
        Role::NodeAgent(a) => node_agent::run(a).await?,
        Role::Crdgen { chart: false } => out(&kvtier_api::crd::crd_yaml()),
        Role::Crdgen { chart: true } => out(&kvtier_api::crd::crd_chart_template()),
        Role::Operator(a) => kvtier_operator::cli::run(a, shutdown_signal()).await?,
        Role::InstallConnector(a) => out(&install::run(&a)?),
    }
    Ok(())
}

async fn sim(a: SimArgs) -> anyhow::Result<()> {
    let profile = Profile::load(&a.profile)?;
    let listener =
        TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let c = profile.engine_config(a.strategy);
    tracing::info!(
        listen = %a.listen,
        profile = %profile.name,
        strategy = a.strategy.label(),
        time_scale = a.time_scale,
        hbm_kv_tokens = c.hbm_blocks * u64::from(c.block_tokens),
        dram_kv_tokens = c.dram_blocks * u64::from(c.block_tokens),
        "simulated engine serving"
    );
    let sim = Sim::serve(
        listener,
        SimOptions {
            profile,
            strategy: a.strategy,
            time_scale: a.time_scale,
            served_model: a.served_model_name,
            answer_tokens: a.answer_tokens,
        },
    );
    shutdown_signal().await;
    tracing::info!("stopping: finishing the requests in flight");
    sim.shutdown().await;
    Ok(())
}

pub(crate) async fn shutdown_signal() {
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

/// A secret token from a file (a mounted Secret): its content without surrounding whitespace.
pub(crate) fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token in {}", path.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(!token.is_empty(), "{} holds no token", path.display());
    Ok(token)
}
