//! `kvtier router` command-line flags; every flag can also come from a `KVTIER_ROUTER_*`
//! environment variable.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use http::HeaderName;

use crate::config::{parse_bytes, parse_duration, Policy, RouterConfig};
use crate::endpoint::{EndpointSpec, EndpointSpecError};

/// A remote-tier hit's cost when `--tier-costs` names only DRAM's and NVMe's.
const DEFAULT_REMOTE_COST: f64 = 0.35;

/// Flags of `kvtier router`.
#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    /// Address the OpenAI-compatible API listens on.
    #[arg(long, env = "KVTIER_ROUTER_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// An engine endpoint, `http://host:port`. Repeat the flag, or comma-separate in the env var.
    #[arg(
        long = "endpoint",
        env = "KVTIER_ROUTER_ENDPOINTS",
        value_delimiter = ',',
        required_unless_present = "discover_pods"
    )]
    pub endpoints: Vec<String>,
    /// Find the engines as the Ready Pods matching this label selector (e.g.
    /// `app.kubernetes.io/component=engine`) instead of `--endpoint`, watching the cluster
    /// from `KUBECONFIG` or the Pod's service account.
    #[arg(long, env = "KVTIER_ROUTER_DISCOVER_PODS", conflicts_with = "endpoints")]
    pub discover_pods: Option<String>,
    /// Namespace of those Pods (default: the router's own, from `POD_NAMESPACE` or the
    /// service account).
    #[arg(long, env = "POD_NAMESPACE")]
    pub discover_namespace: Option<String>,
    /// Port the discovered engines serve on.
    #[arg(long, env = "KVTIER_ROUTER_DISCOVER_PORT", default_value_t = 8000)]
    pub discover_port: u16,
    /// Threads serving connections (default: one per CPU).
    #[arg(long, env = "KVTIER_ROUTER_WORKERS")]
    pub workers: Option<NonZeroUsize>,
    /// How endpoints are chosen.
    #[arg(long, env = "KVTIER_ROUTER_POLICY", value_enum, default_value_t = Policy::Affinity)]
    pub policy: Policy,
    /// Also serve `/metrics` on this address (it is always served on `--listen` too).
    #[arg(long, env = "KVTIER_ROUTER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Headers carrying a session id, in order; replaces the built-in list (X-Session-ID,
    /// Claude Code, Dynamo, Codex and OpenCode headers).
    #[arg(long = "session-header", env = "KVTIER_ROUTER_SESSION_HEADERS", value_delimiter = ',')]
    pub session_headers: Vec<HeaderName>,
    /// Where a session this router has no binding for goes: `load` (the best spread for one
    /// router) or `hash` (rendezvous hashing of the session id: every router replica, and a
    /// restarted router, sends a session's turns to the same endpoint).
    #[arg(long, env = "KVTIER_ROUTER_SESSION_PLACEMENT", value_enum, default_value = "load")]
    pub session_placement: crate::config::SessionPlacement,
    /// A session binding unused this long is dropped.
    #[arg(long, env = "KVTIER_ROUTER_SESSION_TTL", value_parser = parse_duration, default_value = "30m")]
    pub session_ttl: Duration,
    /// Extra cost (tokens of queued work) a session's endpoint may carry over the best
    /// endpoint before the session moves.
    #[arg(long, env = "KVTIER_ROUTER_OVERLOAD_BOUND_TOKENS", default_value_t = 8192)]
    pub overload_bound_tokens: u64,
    /// Bytes per prefix-hash chunk.
    #[arg(long, env = "KVTIER_ROUTER_CHUNK_BYTES", default_value = "1024")]
    pub chunk_bytes: NonZeroUsize,
    /// Chunk entries the prefix index keeps (about 48 bytes each).
    #[arg(long, env = "KVTIER_ROUTER_INDEX_CHUNKS", default_value = "262144")]
    pub index_chunks: NonZeroUsize,
    /// Bytes of request text per token, for the load estimate.
    #[arg(long, env = "KVTIER_ROUTER_BYTES_PER_TOKEN", default_value = "4")]
    pub bytes_per_token: NonZeroU32,
    /// Larger request bodies get 413.
    #[arg(long, env = "KVTIER_ROUTER_MAX_BODY", value_parser = parse_bytes, default_value = "32MiB")]
    pub max_body: u64,
    /// Time a client has to send its request headers.
    #[arg(long, env = "KVTIER_ROUTER_HEADER_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub header_timeout: Duration,
    /// Time a client has to send its whole body (408 after).
    #[arg(long, env = "KVTIER_ROUTER_BODY_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub body_timeout: Duration,
    /// TCP connect timeout to endpoints.
    #[arg(long, env = "KVTIER_ROUTER_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "2s")]
    pub connect_timeout: Duration,
    /// Time an endpoint has to send its response head.
    #[arg(long, env = "KVTIER_ROUTER_RESPONSE_TIMEOUT", value_parser = parse_duration, default_value = "10m")]
    pub response_timeout: Duration,
    /// Endpoints tried per request, the first included.
    #[arg(long, env = "KVTIER_ROUTER_MAX_ATTEMPTS", default_value = "3")]
    pub max_attempts: NonZeroU32,
    /// Wait before the first retry; doubles each time.
    #[arg(long, env = "KVTIER_ROUTER_RETRY_BACKOFF", value_parser = parse_duration, default_value = "25ms")]
    pub retry_backoff: Duration,
    /// A streamed response's head is held until the first model output, at most this long,
    /// so that a replica failing during prefill is retried instead of breaking the stream.
    #[arg(long, env = "KVTIER_ROUTER_FIRST_OUTPUT_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub first_output_timeout: Duration,
    /// Between active probes of each endpoint's /health.
    #[arg(long, env = "KVTIER_ROUTER_HEALTH_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub health_interval: Duration,
    /// A node-agent's residency stream, `NODE=http://host:port/residency`; repeat per node.
    /// Turns on tier-aware routing: a replica on a node whose DRAM or NVMe tier holds a
    /// conversation counts that KV as nearly matched (give endpoints their node with
    /// `--endpoint NODE=URL`, or let `--discover-pods` read it).
    #[arg(long = "residency", env = "KVTIER_ROUTER_RESIDENCY", value_delimiter = ',')]
    pub residency: Vec<String>,
    /// What loading a token's KV costs as a fraction of computing it, from DRAM, from NVMe and
    /// from the remote tier: KV bytes per token x prefill tokens/s / tier bandwidth (the
    /// study's engine: 0.015, 0.05, and 0.1 at 25 Gbit/s; the remote default is what one
    /// agent's fetches reach on a 2-core host, ~0.9 GB/s). The third may be left out.
    #[arg(long, env = "KVTIER_ROUTER_TIER_COSTS", default_value = "0.02,0.06,0.35")]
    pub tier_costs: String,
    /// Follow the residency streams of the Ready node-agent Pods matching this label selector
    /// (in the router's namespace, on `--residency-port`): tier-aware routing in a cluster.
    #[arg(long, env = "KVTIER_ROUTER_RESIDENCY_PODS")]
    pub residency_pods: Option<String>,
    /// Port of the node-agents' residency stream.
    #[arg(long, env = "KVTIER_ROUTER_RESIDENCY_PORT", default_value_t = 9400)]
    pub residency_port: u16,
    /// Promote a conversation from a node's NVMe to its DRAM when the chance of its next turn
    /// within `--prefetch-horizon` (from the pause distribution of agent traces) reaches this;
    /// off unless set (e.g. 0.2).
    #[arg(long, env = "KVTIER_ROUTER_PREFETCH_THRESHOLD")]
    pub prefetch_threshold: Option<f64>,
    /// How far ahead a turn counts for prefetch: the promotion's duration and a margin.
    #[arg(long, env = "KVTIER_ROUTER_PREFETCH_HORIZON", value_parser = parse_duration, default_value = "5s")]
    pub prefetch_horizon: Duration,
    /// A file holding the node-agents' control token (their `--control-token-file`), sent to
    /// their residency streams and prefetch routes.
    #[arg(long, env = "KVTIER_ROUTER_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<std::path::PathBuf>,
    /// With tier-aware routing, pass Anthropic `cache_control` breakpoints to the engines as
    /// holds: the node tier keeps the marked prefix resident for the breakpoint's TTL, within
    /// a quarter of its DRAM (ADR 0013). Off by default: measured in the simulator it has not
    /// helped yet.
    #[arg(long, env = "KVTIER_ROUTER_CACHE_CONTROL_HOLDS")]
    pub cache_control_holds: bool,
    /// Tokens per chunk in the node-agents' counts.
    #[arg(long, env = "KVTIER_ROUTER_RESIDENCY_CHUNK_TOKENS", default_value_t = 256)]
    pub residency_chunk_tokens: u64,
    /// Consecutive 5xx answers that make an endpoint unhealthy.
    #[arg(long, env = "KVTIER_ROUTER_UNHEALTHY_AFTER", default_value = "3")]
    pub unhealthy_after: NonZeroU32,
}

/// A flag combination that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An `--endpoint` is malformed.
    #[error(transparent)]
    Endpoint(#[from] EndpointSpecError),
    /// A value is out of range.
    #[error("{0}")]
    Range(&'static str),
    /// A token file cannot be read, or holds no token.
    #[error("token file {0}")]
    TokenFile(String),
}

/// Where `--discover-pods` looks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSelector {
    /// Label selector.
    pub selector: String,
    /// Namespace; `None`: the client's default.
    pub namespace: Option<String>,
    /// The engines' port.
    pub port: u16,
}

impl RouterArgs {
    /// The Pod discovery the flags ask for, if any.
    #[must_use]
    pub fn pod_selector(&self) -> Option<PodSelector> {
        self.discover_pods.as_ref().map(|s| PodSelector {
            selector: s.clone(),
            namespace: self.discover_namespace.clone(),
            port: self.discover_port,
        })
    }

    /// Validates the flags into a config and the listen addresses.
    ///
    /// # Errors
    /// On a malformed endpoint or an out-of-range value.
    pub fn into_config(
        self,
    ) -> Result<(RouterConfig, SocketAddr, Option<SocketAddr>), ConfigError> {
        let endpoints = self
            .endpoints
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| EndpointSpec::parse(e.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() && self.discover_pods.is_none() {
            return Err(ConfigError::Range(
                "at least one --endpoint (or --discover-pods) is required",
            ));
        }
        if self.health_interval.is_zero() || self.session_ttl.is_zero() {
            return Err(ConfigError::Range("--health-interval and --session-ttl must be positive"));
        }
        let mut c = RouterConfig::new(endpoints);
        c.policy = self.policy;
        if let Some(w) = self.workers {
            c.workers = w;
        }
        if !self.session_headers.is_empty() {
            c.session.headers = self.session_headers;
        }
        c.session.idle_ttl = self.session_ttl;
        c.session.placement = self.session_placement;
        c.affinity.overload_bound_tokens = self.overload_bound_tokens;
        c.affinity.chunk_bytes = self.chunk_bytes;
        c.affinity.index_capacity = self.index_chunks;
        c.affinity.bytes_per_token = self.bytes_per_token;
        c.client.max_body_bytes = self.max_body;
        c.client.header_timeout = self.header_timeout;
        c.client.body_timeout = self.body_timeout;
        c.upstream.connect_timeout = self.connect_timeout;
        c.upstream.response_timeout = self.response_timeout;
        c.upstream.first_output_timeout = self.first_output_timeout;
        c.upstream.max_attempts = self.max_attempts;
        c.upstream.retry_backoff = self.retry_backoff;
        c.health.interval = self.health_interval;
        c.health.timeout = self.health_interval.min(Duration::from_secs(2));
        c.health.unhealthy_after = self.unhealthy_after;
        if !self.residency.is_empty() || self.residency_pods.is_some() {
            let mut feeds = Vec::new();
            for r in &self.residency {
                let Some((node, url)) =
                    r.split_once('=').filter(|(n, u)| !n.is_empty() && u.starts_with("http://"))
                else {
                    return Err(ConfigError::Range(
                        "--residency takes NODE=http://host:port/residency",
                    ));
                };
                feeds.push((node.to_owned(), url.to_owned()));
            }
            let costs: Vec<f64> =
                self.tier_costs.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            let (dram, nvme, remote) = match costs[..] {
                [d, n] => (d, n, DEFAULT_REMOTE_COST),
                [d, n, r] => (d, n, r),
                _ => {
                    return Err(ConfigError::Range(
                        "--tier-costs takes two or three fractions: DRAM,NVMe[,REMOTE]",
                    ))
                }
            };
            if [dram, nvme, remote].iter().any(|c| !(0.0..=1.0).contains(c)) {
                return Err(ConfigError::Range("--tier-costs are fractions in [0, 1]"));
            }
            c.tiers = Some(crate::config::TierConfig {
                costs: crate::tiers::TierCosts { dram, nvme, remote },
                feeds,
                agents: None,
                chunk_tokens: self.residency_chunk_tokens.max(1),
                prefetch: self.prefetch_threshold.map(|threshold| crate::tiers::PrefetchConfig {
                    gaps: crate::tiers::GapModel::traces(1.0),
                    horizon: self.prefetch_horizon,
                    threshold,
                    every: Duration::from_secs(1),
                }),
                control_token: match &self.agent_token_file {
                    None => None,
                    Some(f) => {
                        let token = std::fs::read_to_string(f)
                            .map_err(|e| ConfigError::TokenFile(format!("{}: {e}", f.display())))?
                            .trim()
                            .to_owned();
                        if token.is_empty() {
                            return Err(ConfigError::TokenFile(format!("{}: empty", f.display())));
                        }
                        Some(token)
                    }
                },
                holds: self.cache_control_holds,
            });
        }
        Ok((c, self.listen, self.metrics_listen))
    }
}
