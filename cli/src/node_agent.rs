//! `kvtier node-agent`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::net::TcpListener;

use crate::shutdown_signal;

#[derive(Args, Debug)]
pub(crate) struct NodeAgentArgs {
    /// Unix socket the connectors attach to.
    #[arg(long, env = "KVTIER_AGENT_SOCKET", default_value = "/run/kvtier/agent.sock")]
    socket: PathBuf,
    /// The socket's permission bits, in octal (owner and group by default: give the engines'
    /// Pods the group with --socket-gid).
    #[arg(long, env = "KVTIER_AGENT_SOCKET_MODE", default_value = "660", value_parser = octal_mode)]
    socket_mode: u32,
    /// Group that owns the socket (numeric gid); default: the agent's own.
    #[arg(long, env = "KVTIER_AGENT_SOCKET_GID")]
    socket_gid: Option<u32>,
    /// A file holding the token the control routes (`/residency`, `/prefetch`) require as
    /// `Authorization: Bearer`; without it they are open to whoever reaches the port.
    #[arg(long, env = "KVTIER_AGENT_CONTROL_TOKEN_FILE")]
    control_token_file: Option<PathBuf>,
    /// Connectors served at once; more are refused at connect.
    #[arg(long, env = "KVTIER_AGENT_MAX_CLIENTS", default_value = "256")]
    max_clients: usize,
    /// The share of the DRAM pool one connector may hold reserved at once, and pinned: one
    /// engine cannot take the pool from the others.
    #[arg(long, env = "KVTIER_AGENT_CLIENT_SHARE", default_value = "0.5", value_parser = share)]
    client_share: f64,
    /// The share of the DRAM pool that holds may keep from eviction: the chunks clients said
    /// they will resend (Anthropic `cache_control` breakpoints, passed on by the router with
    /// `--cache-control-holds`; ADR 0013). 0: no holds.
    #[arg(long, env = "KVTIER_AGENT_HOLD_SHARE", default_value_t = kvtier_api::residency::HOLD_SHARE, value_parser = share_or_none)]
    hold_share: f64,
    /// Only processes running as these uids may attach (comma-separated; checked with the
    /// kernel's peer credentials). Default: whoever may open the socket.
    #[arg(long, env = "KVTIER_AGENT_PEER_UIDS", value_delimiter = ',')]
    peer_uids: Vec<u32>,
    /// DRAM pool size (e.g. 64GiB).
    #[arg(long, env = "KVTIER_AGENT_DRAM", value_parser = bytes_arg)]
    dram: u64,
    /// Staging area, beside the pool, that engines write new chunks into before the agent
    /// copies them into the pool at commit (engines map the pool itself read-only). Default:
    /// an eighth of the pool, at least 32 slots, at most the pool.
    #[arg(long, env = "KVTIER_AGENT_STAGING", value_parser = bytes_arg)]
    staging: Option<u64>,
    /// Bytes per slot: one KV chunk (at least 512KiB).
    #[arg(long, env = "KVTIER_AGENT_SLOT", default_value = "2MiB", value_parser = bytes_arg)]
    slot: u64,
    /// Lock the pool in memory: required, best-effort or off.
    #[arg(long, env = "KVTIER_AGENT_MLOCK", default_value = "required")]
    mlock: kvtier_node_agent::LockMode,
    /// Back the pool with huge pages (reserve them on the node first).
    #[arg(long, env = "KVTIER_AGENT_HUGE_PAGES")]
    huge_pages: bool,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long, env = "KVTIER_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Directory of the NVMe tier (one file per chunk); none: DRAM only.
    #[arg(long, env = "KVTIER_AGENT_NVME_DIR")]
    nvme_dir: Option<PathBuf>,
    /// NVMe tier capacity (e.g. 1TiB).
    #[arg(long, env = "KVTIER_AGENT_NVME_BYTES", value_parser = bytes_arg, requires = "nvme_dir")]
    nvme_bytes: Option<u64>,
    /// When chunks go to NVMe: `through` (at commit; they survive an agent restart) or
    /// `back` (when DRAM evicts them; less NVMe traffic).
    #[arg(long, env = "KVTIER_AGENT_NVME_MODE", value_enum, default_value = "through")]
    nvme_mode: NvmeMode,
    /// DRAM eviction order: `lru` (behind the engines' HBM it keeps a conversation's chunks
    /// across an agent's think time; ADR 0011) or `s3-fifo` (for caches that see most chunks
    /// once; 1.15-1.25x LRU's hits on the traces replayed without HBM in front).
    #[arg(long, env = "KVTIER_AGENT_EVICTION", value_enum, default_value = "lru")]
    eviction: Eviction,
    /// The remote tier: an existing Redis or Valkey shared by every node of the resource
    /// (`redis://host:6379`, `rediss://` for TLS; with --remote-cluster, seed nodes of a
    /// Redis Cluster, comma-separated). New chunks are written to it at commit, in the
    /// background; a local miss is looked up there. None: the node's tiers only.
    #[arg(long, env = "KVTIER_AGENT_REMOTE", value_delimiter = ',')]
    remote: Vec<String>,
    /// The --remote URLs are seed nodes of a Redis Cluster.
    #[arg(long, env = "KVTIER_AGENT_REMOTE_CLUSTER", requires = "remote")]
    remote_cluster: bool,
    /// ACL user for the remote tier (when not in the URL).
    #[arg(long, env = "KVTIER_AGENT_REMOTE_USER", requires = "remote")]
    remote_user: Option<String>,
    /// File holding the remote tier's password (e.g. a mounted Secret). The environment's
    /// KVTIER_AGENT_REMOTE_PASSWORD is read when no file is given.
    #[arg(long, env = "KVTIER_AGENT_REMOTE_PASSWORD_FILE", requires = "remote")]
    remote_password_file: Option<PathBuf>,
    /// This resource's namespace in the remote store (keys `kvtier:<namespace>:<chunk>`);
    /// resources sharing a store must differ.
    #[arg(long, env = "KVTIER_AGENT_REMOTE_NAMESPACE", default_value = "default")]
    remote_namespace: String,
    /// How long a chunk stays in the remote tier after it was written.
    #[arg(long, env = "KVTIER_AGENT_REMOTE_TTL", default_value = "1h", value_parser = kvtier_router::parse_duration)]
    remote_ttl: std::time::Duration,
    /// Timeout of each call to the remote tier (connect, read, write).
    #[arg(long, env = "KVTIER_AGENT_REMOTE_TIMEOUT", default_value = "100ms", value_parser = kvtier_router::parse_duration)]
    remote_timeout: std::time::Duration,
    /// Writes waiting for the remote tier at most; past it new chunks are not written there.
    #[arg(long, env = "KVTIER_AGENT_REMOTE_QUEUE", default_value = "256MiB", value_parser = bytes_arg)]
    remote_queue: u64,
    /// With `rediss://` URLs: a PEM file of the CA certificates the store's certificate must
    /// chain to (a private CA), instead of the system's roots.
    #[arg(long, env = "KVTIER_AGENT_REMOTE_CA_FILE", requires = "remote")]
    remote_ca_file: Option<PathBuf>,
    /// Connections one fetch from the remote tier uses at once (a cluster's shards serve
    /// them in parallel).
    #[arg(long, env = "KVTIER_AGENT_REMOTE_PARALLEL", default_value_t = 4)]
    remote_parallel: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Eviction {
    Lru,
    S3Fifo,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NvmeMode {
    Through,
    Back,
}

fn share(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0 && *v <= 1.0)
        .ok_or_else(|| format!("`{s}` is not a share of the pool in (0, 1]"))
}

fn share_or_none(s: &str) -> Result<f64, String> {
    if s.parse::<f64>().ok() == Some(0.0) {
        return Ok(0.0);
    }
    share(s)
}

fn octal_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not a permission mode in octal (e.g. 660)"))
}

pub(crate) fn bytes_arg(s: &str) -> Result<u64, String> {
    kvtier_api::units::parse_bytes(s)
}

pub(crate) async fn run(a: NodeAgentArgs) -> anyhow::Result<()> {
    use kvtier_node_agent::{server, Agent, DramPool, Index, Lru, PoolConfig};
    let slot_bytes = u32::try_from(a.slot).context("--slot is too large")?;
    let pool = DramPool::create(PoolConfig {
        bytes: a.dram,
        staging_bytes: a.staging,
        slot_bytes,
        lock: a.mlock,
        huge_pages: a.huge_pages,
    })?;
    tracing::info!(
        socket = %a.socket.display(),
        bytes = pool.bytes(),
        slots = pool.slots(),
        staging_slots = pool.staging_slots(),
        slot_bytes,
        locked = pool.locked(),
        "node-agent serving"
    );
    let policy: Box<dyn kvtier_api::eviction::EvictionPolicy> = match a.eviction {
        Eviction::Lru => Box::<Lru>::default(),
        Eviction::S3Fifo => Box::new(kvtier_api::eviction::S3Fifo::new(pool.slots() as usize)),
    };
    // At least one slot, whatever the share of a tiny pool.
    let quota = ((f64::from(pool.slots()) * a.client_share) as u32).max(1);
    let index = Index::new(pool.slots(), slot_bytes, policy)
        .with_client_quota(quota)
        .with_hold_share(a.hold_share);
    let mut agent = Agent::new(pool, index);
    if let Some(dir) = &a.nvme_dir {
        let bytes = a.nvme_bytes.context("--nvme-bytes is required with --nvme-dir")?;
        let (tier, recovery) = kvtier_node_agent::nvme::NvmeTier::open(dir, bytes)
            .with_context(|| format!("opening the NVMe tier in {}", dir.display()))?;
        tracing::info!(
            dir = %dir.display(),
            bytes,
            direct = tier.direct(),
            kept = recovery.kept,
            discarded = recovery.discarded,
            "NVMe tier ready"
        );
        agent = agent.with_nvme(tier).nvme_write_back(matches!(a.nvme_mode, NvmeMode::Back));
    }
    if !a.remote.is_empty() {
        let password = match &a.remote_password_file {
            Some(f) => Some(crate::read_token(f)?),
            None => std::env::var("KVTIER_AGENT_REMOTE_PASSWORD").ok().filter(|p| !p.is_empty()),
        };
        let cfg = kvtier_node_agent::remote::RemoteConfig {
            urls: a.remote.clone(),
            cluster: a.remote_cluster,
            username: a.remote_user.clone(),
            password,
            namespace: a.remote_namespace.clone(),
            ttl: a.remote_ttl,
            timeout: a.remote_timeout,
            queue_bytes: a.remote_queue,
            ca_pem: match &a.remote_ca_file {
                Some(f) => Some(
                    std::fs::read(f)
                        .with_context(|| format!("--remote-ca-file {}", f.display()))?,
                ),
                None => None,
            },
            parallel: a.remote_parallel.max(1),
        };
        let tier = kvtier_node_agent::remote::RemoteTier::new(cfg).context("--remote")?;
        // Unreachable now is not fatal: the node's tiers serve, and the tier retries.
        let reachable = tier.ping();
        tracing::info!(
            urls = a.remote.len(),
            cluster = a.remote_cluster,
            namespace = %a.remote_namespace,
            reachable,
            "remote tier configured"
        );
        agent = agent.with_remote(tier);
    }
    let agent = Arc::new(agent);
    if let Some(dir) = a.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let options = server::SocketOptions { mode: a.socket_mode, gid: a.socket_gid };
    let limits = server::Limits { max_clients: a.max_clients, ..server::Limits::default() };
    let mut listener = server::bind_with(&a.socket, options)
        .with_context(|| format!("binding {}", a.socket.display()))?
        .limits(limits);
    if !a.peer_uids.is_empty() {
        listener = listener.peer_uids(a.peer_uids.clone());
    }
    let token = match &a.control_token_file {
        Some(f) => Some(crate::read_token(f)?),
        None => {
            if a.metrics_listen.is_some() {
                tracing::warn!(
                    "no --control-token-file: /residency and /prefetch are open to anyone who \
                     reaches the HTTP port"
                );
            }
            None
        }
    };
    let shutdown = kvtier_serve::CancellationToken::new();
    let http = match a.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            let serving = kvtier_node_agent::http::serve(l, agent.clone(), token, shutdown.clone());
            Some(tokio::spawn(serving))
        }
        None => None,
    };
    tokio::select! {
        () = server::serve(listener, agent) => {}
        () = shutdown_signal() => {}
    }
    // Engines stop reaching the pool; HTTP requests in flight finish and residency streams
    // end cleanly (the router resubscribes elsewhere or later).
    let _ = std::fs::remove_file(&a.socket);
    shutdown.cancel();
    if let Some(http) = http {
        let _ = http.await;
    }
    tracing::info!("node-agent stopped");
    Ok(())
}
