//! Typed router configuration, validated before any port is bound.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use http::HeaderName;
use kvtier_api::prefix::DEFAULT_CHUNK_BYTES;
use kvtier_api::session::DEFAULT_SESSION_HEADERS;

use crate::endpoint::EndpointSpec;

/// How endpoints are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Session stickiness, whole-prompt prefix affinity and token-cost load balancing.
    Affinity,
    /// The endpoint with the least in-flight work, ignoring sessions and prefixes.
    LeastLoad,
    /// Each endpoint in turn (a baseline).
    RoundRobin,
}

impl Policy {
    /// Fixed label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Policy::Affinity => "affinity",
            Policy::LeastLoad => "least-load",
            Policy::RoundRobin => "round-robin",
        }
    }
}

/// Session stickiness.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Headers carrying a session id, in the order they are consulted.
    pub headers: Vec<HeaderName>,
    /// A binding unused this long is dropped.
    pub idle_ttl: Duration,
    /// At most this many bindings are kept.
    pub capacity: usize,
    /// Where a session this router has no binding for goes.
    pub placement: SessionPlacement,
}

/// Where a session without a binding (new, or new to this router) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SessionPlacement {
    /// The endpoint the cost prefers (least loaded, least resident context): the best spread
    /// for one router.
    #[default]
    Load,
    /// The endpoint that rendezvous hashing of the session id over the endpoints' addresses
    /// picks, as every router replica with the same endpoints does, and a restarted router
    /// too: turns reach the same replica whichever router gets them. The overload bound still
    /// moves a session off an overloaded endpoint. Spread is statistical.
    Hash,
}

/// Prefix affinity and load balancing.
#[derive(Clone, Debug)]
pub struct AffinityConfig {
    /// Bytes per hashed chunk.
    pub chunk_bytes: NonZeroUsize,
    /// Chunk entries the prefix index keeps (about 48 bytes each).
    pub index_capacity: NonZeroUsize,
    /// Bytes of request text per token, to convert text into tokens of work.
    pub bytes_per_token: NonZeroU32,
    /// Extra cost, in tokens, a home endpoint may carry over the best one before a session
    /// or conversation leaves it.
    pub overload_bound_tokens: u64,
}

/// Limits on what clients may send.
#[derive(Clone, Debug)]
pub struct ClientLimits {
    /// Larger request bodies get 413.
    pub max_body_bytes: u64,
    /// A client must send its request headers within this time.
    pub header_timeout: Duration,
    /// A client must send its whole body within this time (408 otherwise).
    pub body_timeout: Duration,
}

/// Talking to endpoints.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed until the response head (a non-streamed answer of a long prompt takes
    /// minutes on a loaded engine).
    pub response_timeout: Duration,
    /// Endpoints tried per request, the first included.
    pub max_attempts: NonZeroU32,
    /// Wait before the first retry; doubles with each further retry.
    pub retry_backoff: Duration,
    /// A streamed response's head is held until its first model output (an engine sends the
    /// head before prefill), at most this long: a replica that fails before any output is
    /// retried on the next endpoint like a non-streamed request.
    pub first_output_timeout: Duration,
}

/// Active and passive health checking.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Between probes of each endpoint's `/health`.
    pub interval: Duration,
    /// A probe slower than this fails.
    pub timeout: Duration,
    /// Consecutive 5xx answers that make an endpoint unhealthy (a refused connection does
    /// at once).
    pub unhealthy_after: NonZeroU32,
}

/// Everything `kvtier router` needs.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Threads serving connections, each with its own runtime and endpoint connections.
    pub workers: NonZeroUsize,
    /// Endpoints when discovery is static.
    pub endpoints: Vec<EndpointSpec>,
    /// How endpoints are chosen.
    pub policy: Policy,
    /// Stickiness.
    pub session: SessionConfig,
    /// Affinity and balance.
    pub affinity: AffinityConfig,
    /// Client limits.
    pub client: ClientLimits,
    /// Endpoint connections and retries.
    pub upstream: UpstreamConfig,
    /// Health checks.
    pub health: HealthConfig,
    /// Tier-aware routing: the node-agents' residency streams and what tier hits cost
    /// (`None`: off).
    pub tiers: Option<TierConfig>,
}

/// Tier-aware routing.
#[derive(Clone, Debug)]
pub struct TierConfig {
    /// What a DRAM and an NVMe hit cost, as fractions of a token's prefill.
    pub costs: crate::tiers::TierCosts,
    /// `(node, residency stream URL)` of each node's agent.
    pub feeds: Vec<(String, String)>,
    /// Node-agents found by discovery (their node and address; the stream is
    /// `/residency` there), followed as they come and go.
    pub agents: Option<tokio::sync::watch::Receiver<Vec<EndpointSpec>>>,
    /// Tokens per chunk in the agents' counts.
    pub chunk_tokens: u64,
    /// Promote conversations from NVMe before their next turn (`None`: off).
    pub prefetch: Option<crate::tiers::PrefetchConfig>,
    /// The token the agents' control routes require (`Authorization: Bearer`).
    pub control_token: Option<String>,
    /// Pass Anthropic `cache_control` breakpoints to the engine as holds (ADR 0013; the
    /// router's flag leaves it off).
    pub holds: bool,
}

const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

const fn nzu(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

impl RouterConfig {
    /// The defaults, in front of `endpoints`.
    #[must_use]
    pub fn new(endpoints: Vec<EndpointSpec>) -> Self {
        Self {
            workers: std::thread::available_parallelism().unwrap_or(nzu(1)),
            endpoints,
            policy: Policy::Affinity,
            session: SessionConfig {
                headers: DEFAULT_SESSION_HEADERS
                    .iter()
                    .map(|h| HeaderName::from_static(h))
                    .collect(),
                idle_ttl: Duration::from_secs(30 * 60),
                capacity: 1 << 20,
                placement: SessionPlacement::Load,
            },
            affinity: AffinityConfig {
                chunk_bytes: nzu(DEFAULT_CHUNK_BYTES),
                index_capacity: nzu(1 << 18),
                bytes_per_token: nz(4),
                overload_bound_tokens: 8192,
            },
            client: ClientLimits {
                max_body_bytes: 32 << 20,
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(30),
            },
            upstream: UpstreamConfig {
                connect_timeout: Duration::from_secs(2),
                response_timeout: Duration::from_secs(600),
                max_attempts: nz(3),
                retry_backoff: Duration::from_millis(25),
                first_output_timeout: Duration::from_secs(300),
            },
            health: HealthConfig {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                unhealthy_after: nz(3),
            },
            tiers: None,
        }
    }
}

pub use kvtier_api::units::parse_bytes;

/// Parses `30s`, `5m`, `250ms`, `1h 30m` (humantime).
///
/// # Errors
/// When the text is not a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s: {e}"))
}
