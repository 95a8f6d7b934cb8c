//! The agent's HTTP side: `GET /metrics` (open to anyone) and the node tier's control routes
//! (`GET /residency`, `POST /prefetch/…`, [`kvtier_serve::node_tier`]), which need the
//! control token when one is set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{header, HeaderValue, Method, StatusCode};
use kvtier_serve::node_tier::{self, NodeTierRoutes};
use kvtier_serve::CancellationToken;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agent::{Agent, OPS};

/// Serves the agent's HTTP side on `listener` until `shutdown` is cancelled, then ends open
/// residency streams and lets in-flight requests finish. `control_token`: what `/residency`
/// and `/prefetch` ask for (`Authorization: Bearer …`); `None` leaves them open to whoever
/// reaches the port (the stream names every conversation on the node).
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    control_token: Option<String>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(Mutex::new(AgentMetrics::new(&agent)));
    let routes = NodeTierRoutes::new(agent.clone(), control_token, shutdown.clone());
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (agent, metrics, routes) = (agent.clone(), metrics.clone(), routes.clone());
        async move {
            let path = req.uri().path();
            let res = if NodeTierRoutes::<Agent>::owns(path) {
                routes.handle(&req).await
            } else if path == "/metrics" && req.method() == Method::GET {
                let text = metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut res = node_tier::text(StatusCode::OK, text.encode(&agent));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                res
            } else if path == "/metrics" {
                let mut res = node_tier::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
                res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
                res
            } else {
                node_tier::text(StatusCode::NOT_FOUND, "GET /metrics or /residency\n")
            };
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    kvtier_serve::run(listener, service, shutdown, kvtier_serve::Options::default()).await;
}

/// A node tier, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum TierLabel {
    Dram,
    Nvme,
    Remote,
}

impl EncodeLabelValue for TierLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Self::Dram => "dram",
            Self::Nvme => "nvme",
            Self::Remote => "remote",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: TierLabel,
}

/// An agent protocol operation (one of [`OPS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

const DRAM: TierLabels = TierLabels { tier: TierLabel::Dram };
const NVME: TierLabels = TierLabels { tier: TierLabel::Nvme };
const REMOTE: TierLabels = TierLabels { tier: TierLabel::Remote };

/// The agent's metrics, `kvtier_agent_*`. The figures live in the agent (its index, pool,
/// NVMe tier and counters); a scrape copies them in and encodes.
#[derive(Debug)]
struct AgentMetrics {
    registry: Registry,
    capacity: Family<TierLabels, Gauge>,
    used: Family<TierLabels, Gauge>,
    reserved: Family<TierLabels, Gauge>,
    pinned: Gauge,
    held: Gauge,
    holds_refused: Counter,
    staging_capacity: Gauge,
    staging_used: Gauge,
    locked: Gauge,
    clients: Gauge,
    hits: Family<TierLabels, Counter>,
    misses: Counter,
    promotions: Counter,
    requests: Family<OpLabels, Counter>,
    request_seconds: Family<OpLabels, Counter<f64, AtomicU64>>,
    evictions: Family<TierLabels, Counter>,
    commits: Counter,
    commits_refused: Counter,
    committed_bytes: Counter,
    malformed: Counter,
    /// Only with an NVMe tier.
    nvme: Option<NvmeMetrics>,
    /// Only with a remote tier.
    remote: Option<RemoteMetrics>,
}

#[derive(Debug, Default)]
struct RemoteMetrics {
    writes: Counter,
    written_bytes: Counter,
    dropped: Counter,
    retried: Counter,
    fetches: Counter,
    fetched_bytes: Counter,
    promotions: Counter,
    corrupt: Counter,
    errors: Counter,
    up: Gauge,
    pending: Gauge,
}

#[derive(Debug, Default)]
struct NvmeMetrics {
    writes: Family<TierLabels, Counter>,
    reads: Family<TierLabels, Counter>,
    corrupt: Family<TierLabels, Counter>,
    direct: Gauge,
    io_uring: Gauge,
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Sets a counter that mirrors a running total kept elsewhere.
fn mirror(c: &Counter, total: u64) {
    c.inner().store(total, Ordering::Relaxed);
}

impl AgentMetrics {
    fn new(agent: &Agent) -> Self {
        let mut r = Registry::default();
        let m = Self {
            capacity: Family::default(),
            used: Family::default(),
            reserved: Family::default(),
            pinned: Gauge::default(),
            held: Gauge::default(),
            holds_refused: Counter::default(),
            staging_capacity: Gauge::default(),
            staging_used: Gauge::default(),
            locked: Gauge::default(),
            clients: Gauge::default(),
            hits: Family::default(),
            misses: Counter::default(),
            promotions: Counter::default(),
            requests: Family::default(),
            request_seconds: Family::default(),
            evictions: Family::default(),
            commits: Counter::default(),
            commits_refused: Counter::default(),
            committed_bytes: Counter::default(),
            malformed: Counter::default(),
            nvme: agent.nvme().map(|_| NvmeMetrics::default()),
            remote: agent.remote().map(|_| RemoteMetrics::default()),
            registry: Registry::default(),
        };
        r.register("kvtier_agent_capacity_bytes", "Capacity per tier", m.capacity.clone());
        r.register("kvtier_agent_used_bytes", "Bytes holding chunks, per tier", m.used.clone());
        r.register(
            "kvtier_agent_reserved_bytes",
            "Bytes of slots reserved by clients",
            m.reserved.clone(),
        );
        r.register("kvtier_agent_pinned_chunks", "Chunks pinned by a live lease", m.pinned.clone());
        r.register(
            "kvtier_agent_held_chunks",
            "Chunks kept from eviction by holds (cache_control breakpoints)",
            m.held.clone(),
        );
        r.register(
            "kvtier_agent_holds_refused",
            "Chunks asked to be held and not held: not in DRAM, or the hold share was full",
            m.holds_refused.clone(),
        );
        r.register(
            "kvtier_agent_staging_capacity_bytes",
            "Bytes of the staging area clients save into",
            m.staging_capacity.clone(),
        );
        r.register(
            "kvtier_agent_staging_used_bytes",
            "Bytes of staging slots reserved by clients, not yet committed",
            m.staging_used.clone(),
        );
        r.register(
            "kvtier_agent_locked",
            "Whether the DRAM pool is locked in memory",
            m.locked.clone(),
        );
        r.register("kvtier_agent_clients", "Attached clients", m.clients.clone());
        r.register("kvtier_agent_lookup_hits", "Keys found, per tier", m.hits.clone());
        r.register("kvtier_agent_lookup_misses", "Keys not in DRAM", m.misses.clone());
        r.register(
            "kvtier_agent_promotions",
            "Chunks brought from NVMe into DRAM",
            m.promotions.clone(),
        );
        r.register("kvtier_agent_requests", "Requests answered, per operation", m.requests.clone());
        r.register(
            "kvtier_agent_request_seconds",
            "Time spent answering requests, per operation",
            m.request_seconds.clone(),
        );
        r.register("kvtier_agent_evictions", "Chunks evicted, per tier", m.evictions.clone());
        r.register("kvtier_agent_commits", "Chunks committed", m.commits.clone());
        r.register(
            "kvtier_agent_commits_refused",
            "Commits refused (not reserved, too long, checksum)",
            m.commits_refused.clone(),
        );
        r.register("kvtier_agent_committed_bytes", "Bytes committed", m.committed_bytes.clone());
        r.register(
            "kvtier_agent_malformed_frames",
            "Connections closed for a malformed frame",
            m.malformed.clone(),
        );
        if let Some(n) = &m.nvme {
            r.register("kvtier_agent_nvme_writes", "Chunks written to NVMe", n.writes.clone());
            r.register("kvtier_agent_nvme_reads", "Chunks read back from NVMe", n.reads.clone());
            r.register(
                "kvtier_agent_nvme_corrupt",
                "NVMe reads that failed their checksum (dropped)",
                n.corrupt.clone(),
            );
            r.register(
                "kvtier_agent_nvme_direct",
                "Whether NVMe I/O uses O_DIRECT",
                n.direct.clone(),
            );
            r.register(
                "kvtier_agent_nvme_io_uring",
                "Whether NVMe writes go through io_uring",
                n.io_uring.clone(),
            );
        }
        if let Some(n) = &m.remote {
            r.register(
                "kvtier_agent_remote_writes",
                "Chunks written to the remote tier",
                n.writes.clone(),
            );
            r.register(
                "kvtier_agent_remote_written_bytes",
                "Bytes written to the remote tier",
                n.written_bytes.clone(),
            );
            r.register(
                "kvtier_agent_remote_dropped_writes",
                "Writes to the remote tier dropped (queue full or tier down)",
                n.dropped.clone(),
            );
            r.register(
                "kvtier_agent_remote_retried_writes",
                "Dropped writes queued again when DRAM evicted their chunk",
                n.retried.clone(),
            );
            r.register(
                "kvtier_agent_remote_fetches",
                "Chunks fetched from the remote tier and verified",
                n.fetches.clone(),
            );
            r.register(
                "kvtier_agent_remote_fetched_bytes",
                "Bytes fetched from the remote tier",
                n.fetched_bytes.clone(),
            );
            r.register(
                "kvtier_agent_remote_promotions",
                "Chunks brought into DRAM from the remote tier",
                n.promotions.clone(),
            );
            r.register(
                "kvtier_agent_remote_corrupt",
                "Remote values that failed their checks (deleted)",
                n.corrupt.clone(),
            );
            r.register(
                "kvtier_agent_remote_errors",
                "Calls to the remote tier that failed or timed out",
                n.errors.clone(),
            );
            r.register("kvtier_agent_remote_up", "Whether the remote tier answers", n.up.clone());
            r.register(
                "kvtier_agent_remote_pending_writes",
                "Writes queued for the remote tier",
                n.pending.clone(),
            );
        }
        Self { registry: r, ..m }
    }

    /// Copies `agent`'s figures in and encodes them in the OpenMetrics text format.
    fn encode(&self, agent: &Agent) -> String {
        let s = agent.stats();
        let slot = u64::from(agent.pool().slot_bytes());
        let c = &agent.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.capacity.get_or_create(&DRAM).set(gauge(agent.pool().bytes()));
        self.used.get_or_create(&DRAM).set(gauge(u64::from(s.used) * slot));
        self.reserved.get_or_create(&DRAM).set(gauge(u64::from(s.reserved) * slot));
        self.pinned.set(i64::from(s.pinned));
        self.held.set(i64::from(s.held));
        mirror(&self.holds_refused, get(&c.holds_refused));
        self.staging_capacity.set(gauge(agent.pool().staging_bytes()));
        self.staging_used.set(gauge(u64::from(agent.staging_in_use()) * slot));
        self.locked.set(i64::from(agent.pool().locked()));
        self.clients.set(gauge(get(&c.clients)));
        mirror(&self.hits.get_or_create(&DRAM), s.hits);
        mirror(&self.misses, s.misses);
        mirror(&self.promotions, get(&c.promotions));
        for (i, op) in OPS.iter().enumerate() {
            let labels = OpLabels { op };
            mirror(&self.requests.get_or_create(&labels), get(&c.op_count[i]));
            let seconds = get(&c.op_nanos[i]) as f64 / 1e9;
            self.request_seconds
                .get_or_create(&labels)
                .inner()
                .store(seconds.to_bits(), Ordering::Relaxed);
        }
        mirror(&self.evictions.get_or_create(&DRAM), s.evictions);
        mirror(&self.commits, get(&c.commits));
        mirror(&self.commits_refused, get(&c.commits_refused));
        mirror(&self.committed_bytes, get(&c.bytes_committed));
        mirror(&self.malformed, get(&c.malformed));
        if let (Some(n), Some(tier)) = (&self.nvme, agent.nvme()) {
            let st = tier.stats();
            self.capacity.get_or_create(&NVME).set(gauge(tier.capacity()));
            self.used.get_or_create(&NVME).set(gauge(st.used_bytes));
            mirror(&self.hits.get_or_create(&NVME), get(&c.nvme_hits));
            mirror(&self.evictions.get_or_create(&NVME), st.evictions);
            mirror(&n.writes.get_or_create(&NVME), st.writes);
            mirror(&n.reads.get_or_create(&NVME), st.reads);
            mirror(&n.corrupt.get_or_create(&NVME), st.corrupt);
            n.direct.set(i64::from(tier.direct()));
            n.io_uring.set(i64::from(tier.io_uring()));
        }
        if let (Some(n), Some(tier)) = (&self.remote, agent.remote()) {
            let st = tier.stats();
            mirror(&self.hits.get_or_create(&REMOTE), get(&st.hits));
            mirror(&n.writes, get(&st.writes));
            mirror(&n.written_bytes, get(&st.written_bytes));
            mirror(&n.dropped, get(&st.dropped));
            mirror(&n.retried, get(&st.retried));
            mirror(&n.fetches, get(&st.fetches));
            mirror(&n.fetched_bytes, get(&st.fetched_bytes));
            mirror(&n.promotions, get(&c.remote_promotions));
            mirror(&n.corrupt, get(&st.corrupt));
            mirror(&n.errors, get(&st.errors));
            n.up.set(i64::from(tier.up()));
            n.pending.set(gauge(tier.pending() as u64));
        }
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
