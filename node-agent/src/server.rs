//! The agent's Unix socket: one task per attached client, frames in, frames out.
//!
//! The first frame must be `Hello`; its reply carries the pool's memfd (SCM_RIGHTS). A frame
//! that does not parse gets a `Malformed` error and closes that connection only; other
//! clients never notice. When a client goes away, its reservations and pins go with it.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvtier_api::agent::NO_CHECKSUM;
use kvtier_api::agent::{
    self, decode_header, ConversationKey, ErrorCode, ProtocolError, Request, ResidencyEvent,
    Response, HEADER,
};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::index::{ClientId, Index, Millis};
use crate::nvme::NvmeTier;
use crate::pool::{checksum, DramPool};

/// What every connection shares.
#[derive(Debug)]
pub struct Agent {
    pool: DramPool,
    index: Mutex<Index>,
    epoch: Instant,
    next_client: AtomicU64,
    verify_commits: bool,
    counters: Counters,
    nvme: Option<Mutex<NvmeTier>>,
    /// Write chunks to NVMe when DRAM evicts them, instead of at commit.
    write_back: bool,
    residency: Mutex<Residency>,
}

const DRAM: usize = 0;
const NVME: usize = 1;

/// Chunks per conversation per tier, and the stream of changes.
#[derive(Debug)]
struct Residency {
    counts: std::collections::HashMap<u64, [u32; 2]>,
    seq: u64,
    tx: tokio::sync::broadcast::Sender<ResidencyEvent>,
}

impl Residency {
    fn new() -> Self {
        Self {
            counts: std::collections::HashMap::new(),
            seq: 0,
            tx: tokio::sync::broadcast::channel(4096).0,
        }
    }

    /// One chunk of `conversation` entered (`delta` 1) or left (-1) `tier`; an event when the
    /// conversation's count there moves from or to zero.
    fn change(&mut self, conversation: u64, tier: usize, delta: i32) {
        if conversation == 0 {
            return;
        }
        let c = self.counts.entry(conversation).or_insert([0, 0]);
        let before = c[tier];
        let after = if delta >= 0 { before.saturating_add(1) } else { before.saturating_sub(1) };
        c[tier] = after;
        if *c == [0, 0] {
            self.counts.remove(&conversation);
        }
        if (before == 0) != (after == 0) {
            self.seq += 1;
            let _ = self.tx.send(ResidencyEvent {
                seq: self.seq,
                conversation: ConversationKey(conversation),
                tier: if tier == DRAM { agent::Tier::Dram } else { agent::Tier::Nvme },
                entered: after > 0,
                chunks: after,
            });
        }
    }

    /// Current residency as `entered` events, and a subscription to what follows.
    fn subscribe(&self) -> (Vec<ResidencyEvent>, tokio::sync::broadcast::Receiver<ResidencyEvent>) {
        let mut now = Vec::new();
        for (conv, c) in &self.counts {
            for (tier, n) in [(agent::Tier::Dram, c[DRAM]), (agent::Tier::Nvme, c[NVME])] {
                if n > 0 {
                    now.push(ResidencyEvent {
                        seq: self.seq,
                        conversation: ConversationKey(*conv),
                        tier,
                        entered: true,
                        chunks: n,
                    });
                }
            }
        }
        (now, self.tx.subscribe())
    }
}

/// The client id the agent uses for its own reservations and pins (write-through, prefetch).
const AGENT: ClientId = ClientId::MAX;
/// How long a chunk being written through is pinned at most.
const WRITE_LEASE_MS: u32 = 60_000;

/// Agent-level counters (the index keeps hits, misses and evictions).
#[derive(Debug, Default)]
struct Counters {
    clients: AtomicU64,
    commits: AtomicU64,
    commits_refused: AtomicU64,
    bytes_committed: AtomicU64,
    malformed: AtomicU64,
    nvme_hits: AtomicU64,
    promotions: AtomicU64,
    /// Requests answered and nanoseconds spent, per operation ([`OPS`] order).
    op_count: [AtomicU64; OPS.len()],
    op_nanos: [AtomicU64; OPS.len()],
}

/// Operation names for the per-operation metrics, in `Request::op()` order (1-based).
const OPS: [&str; 9] =
    ["hello", "lookup", "reserve", "commit", "release", "pin", "unpin", "prefetch", "stats"];

impl Agent {
    /// Counts one answered request of operation `op` that took `elapsed`.
    fn count_op(&self, op: u16, elapsed: std::time::Duration) {
        if let Some(i) = usize::from(op).checked_sub(1).filter(|i| *i < OPS.len()) {
            self.counters.op_count[i].fetch_add(1, Ordering::Relaxed);
            let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            self.counters.op_nanos[i].fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

impl Agent {
    /// An agent over `pool`, evicting in `index`'s order.
    #[must_use]
    pub fn new(pool: DramPool, index: Index) -> Self {
        Self {
            pool,
            index: Mutex::new(index),
            epoch: Instant::now(),
            next_client: AtomicU64::new(1),
            verify_commits: true,
            counters: Counters::default(),
            nvme: None,
            write_back: false,
            residency: Mutex::new(Residency::new()),
        }
    }

    fn residency(&self) -> std::sync::MutexGuard<'_, Residency> {
        self.residency.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what the index evicted from DRAM.
    /// Records what the index evicted from DRAM and returns it (for write-back).
    fn note_dram_evictions(&self, ix: &mut Index) -> Vec<crate::index::Evicted> {
        let gone = ix.take_evicted();
        if !gone.is_empty() {
            let mut r = self.residency();
            for e in &gone {
                r.change(e.conversation, DRAM, -1);
            }
        }
        gone
    }

    /// In write-back mode, copies chunks DRAM just evicted to NVMe. Called before the slots'
    /// new owner hears of them, so their bytes are still the evicted chunks'.
    fn write_back(&self, gone: &[crate::index::Evicted]) {
        if !self.write_back || gone.is_empty() {
            return;
        }
        let Some(mut t) = self.nvme() else { return };
        for e in gone {
            let sum = self.sum_of(e.slot, e.len, e.checksum);
            match t.write(e.key, self.pool.slot(e.slot), e.len, sum, e.conversation) {
                Ok(true) => self.residency().change(e.conversation, NVME, 1),
                Ok(false) => {}
                Err(err) => warn!("NVMe write-back of an evicted chunk failed (it is lost): {err}"),
            }
        }
        self.note_nvme_evictions(&mut t);
    }

    /// Writes chunks to NVMe when DRAM evicts them rather than when they are committed: less
    /// NVMe traffic, but a chunk is only on NVMe once it has left DRAM, so an agent restart
    /// loses what was only in DRAM.
    #[must_use]
    pub fn nvme_write_back(mut self, on: bool) -> Self {
        self.write_back = on;
        self
    }

    /// Records what the NVMe tier dropped.
    fn note_nvme_evictions(&self, t: &mut NvmeTier) {
        let gone = t.take_evicted();
        if !gone.is_empty() {
            let mut r = self.residency();
            for (_, conv) in gone {
                r.change(conv, NVME, -1);
            }
        }
    }

    /// The current residency and a subscription to its changes (`GET /residency`).
    pub fn subscribe_residency(
        &self,
    ) -> (Vec<ResidencyEvent>, tokio::sync::broadcast::Receiver<ResidencyEvent>) {
        self.residency().subscribe()
    }

    /// Adds an NVMe tier: committed chunks are written through to it, lookups report what
    /// only it holds, and prefetch brings such chunks back into DRAM.
    #[must_use]
    pub fn with_nvme(mut self, tier: NvmeTier) -> Self {
        {
            let mut r = self.residency();
            for conv in tier.conversations() {
                r.change(conv, NVME, 1);
            }
        }
        self.nvme = Some(Mutex::new(tier));
        self
    }

    fn nvme(&self) -> Option<std::sync::MutexGuard<'_, NvmeTier>> {
        self.nvme.as_ref().map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Writes committed chunks through to NVMe, each pinned while its slot is read.
    fn write_through(&self, chunks: &[(kvtier_api::chunk::ChunkKey, u32, u32, u64, u64)]) {
        if self.nvme.is_none() || self.write_back || chunks.is_empty() {
            return;
        }
        let keys: Vec<_> = chunks.iter().map(|c| c.0).collect();
        self.index().pin(AGENT, &keys, self.now(), WRITE_LEASE_MS);
        let pending: Vec<crate::nvme::Pending<'_>> = chunks
            .iter()
            .map(|&(key, slot, len, sum, conv)| crate::nvme::Pending {
                key,
                data: self.pool.slot(slot),
                len,
                checksum: self.sum_of(slot, len, sum),
                conversation: conv,
            })
            .collect();
        if let Some(mut t) = self.nvme() {
            let before: Vec<bool> = pending.iter().map(|p| t.contains(&p.key)).collect();
            match t.write_batch(&pending) {
                Ok(_) => {
                    let mut r = self.residency();
                    for (p, was) in pending.iter().zip(before) {
                        if !was && t.contains(&p.key) {
                            r.change(p.conversation, NVME, 1);
                        }
                    }
                }
                Err(e) => warn!(
                    "NVMe write of {} chunks failed (they stay in DRAM only): {e}",
                    pending.len()
                ),
            }
            self.note_nvme_evictions(&mut t);
        }
        self.index().unpin(AGENT, &keys);
    }

    /// Brings `key` from NVMe into a DRAM slot; true when it is in DRAM afterwards.
    fn load(&self, key: kvtier_api::chunk::ChunkKey) -> bool {
        if self.index().get(&key).is_some() {
            return true;
        }
        let Some(mut tier) = self.nvme() else { return false };
        if !tier.contains(&key) {
            return false;
        }
        let conv = tier.conversation_of(&key).unwrap_or(0);
        let (slot, gone) = {
            let mut ix = self.index();
            let slot = ix.reserve(AGENT, 1, self.now()).pop();
            (slot, self.note_dram_evictions(&mut ix))
        };
        if !gone.is_empty() && self.write_back {
            // The tier is locked here; write the evicted chunks back through it.
            for e in &gone {
                let sum = self.sum_of(e.slot, e.len, e.checksum);
                match tier.write(e.key, self.pool.slot(e.slot), e.len, sum, e.conversation) {
                    Ok(true) => self.residency().change(e.conversation, NVME, 1),
                    Ok(false) => {}
                    Err(err) => warn!("NVMe write-back of an evicted chunk failed: {err}"),
                }
            }
        }
        let Some(slot) = slot else { return false };
        let loaded = match tier.read(key) {
            Ok((bytes, len, sum)) => match self.pool.write_slot(slot, bytes) {
                Ok(()) => Some((len, sum)),
                Err(e) => {
                    warn!("copying a chunk into the pool failed: {e}");
                    None
                }
            },
            Err(e) => {
                warn!("NVMe read: {e}");
                None
            }
        };
        self.note_nvme_evictions(&mut tier);
        drop(tier);
        let mut ix = self.index();
        match loaded {
            // Verified against its checksum by the read.
            Some((len, sum)) => match ix.commit(AGENT, key, slot, len, sum, conv, |_, _, _| true) {
                Ok(new) => {
                    if new {
                        self.residency().change(conv, DRAM, 1);
                        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                    }
                    true
                }
                Err(_) => false,
            },
            None => {
                ix.release(AGENT, &[slot]);
                false
            }
        }
    }

    /// Whether a commit is checked against the slot's bytes before the chunk becomes
    /// readable (on by default). Off, the client's checksum is recorded as given: a pass
    /// over every stored byte is saved, and a client that writes the wrong bytes is no longer
    /// caught at commit.
    #[must_use]
    pub fn verify_commits(mut self, on: bool) -> Self {
        self.verify_commits = on;
        self
    }

    fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counters (for metrics and tests).
    #[must_use]
    pub fn stats(&self) -> agent::Stats {
        self.index().stats()
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &DramPool {
        &self.pool
    }

    /// The chunk's checksum: the client's, or computed now when it sent none (a chunk never
    /// goes to NVMe without one).
    fn sum_of(&self, slot: u32, len: u32, given: u64) -> u64 {
        if given == NO_CHECKSUM {
            checksum(self.pool.bytes_of(slot, len))
        } else {
            given
        }
    }

    /// Whether answering `req` may read or write NVMe.
    #[must_use]
    pub fn may_do_io(&self, req: &Request) -> bool {
        self.nvme.is_some()
            && match req {
                Request::Commit { .. } => !self.write_back,
                Request::Reserve { .. } => self.write_back,
                Request::Prefetch { .. } => true,
                _ => false,
            }
    }

    /// Answers one request of `client`.
    pub fn handle(&self, client: ClientId, req: Request) -> Response {
        let now = self.now();
        match req {
            Request::Hello { .. } => Response::Error {
                code: ErrorCode::State,
                message: "hello was already received".into(),
            },
            Request::Lookup { keys } => {
                let (prefix, mut tiers, slots) = self.index().lookup(&keys);
                if let Some(t) = self.nvme() {
                    let mut found = 0;
                    for (tier, key) in tiers.iter_mut().zip(&keys) {
                        if *tier == agent::Tier::Absent && t.contains(key) {
                            *tier = agent::Tier::Nvme;
                            found += 1;
                        }
                    }
                    self.counters.nvme_hits.fetch_add(found, Ordering::Relaxed);
                }
                Response::Lookup { prefix, tiers, slots }
            }
            Request::Reserve { n } => {
                let mut ix = self.index();
                let slots = ix.reserve(client, n, now);
                let gone = self.note_dram_evictions(&mut ix);
                drop(ix);
                self.write_back(&gone);
                Response::Reserve { slots }
            }
            Request::Commit { chunks } => {
                // Checksums are computed outside the lock: a slot is only ever written by
                // the client that reserved it, and a wrong slot fails the commit anyway.
                let slots = self.pool.slots();
                let slot_bytes = self.pool.slot_bytes();
                let verified: Vec<bool> = chunks
                    .iter()
                    .map(|c| {
                        c.slot < slots
                            && c.len <= slot_bytes
                            && (!self.verify_commits
                                || c.checksum == NO_CHECKSUM
                                || checksum(self.pool.bytes_of(c.slot, c.len)) == c.checksum)
                    })
                    .collect();
                let mut ix = self.index();
                let mut applied = 0;
                let mut written = Vec::new();
                for (c, ok) in chunks.iter().zip(verified) {
                    let conv = c.conversation;
                    match ix.commit(client, c.key, c.slot, c.len, c.checksum, conv, |_, _, _| ok) {
                        Ok(new) => {
                            applied += 1;
                            if new {
                                self.residency().change(conv, DRAM, 1);
                            }
                            if let Some((slot, len, sum)) = ix.get(&c.key) {
                                let conv = ix.conversation_of(&c.key).unwrap_or(conv);
                                written.push((c.key, slot, len, sum, conv));
                            }
                            self.counters
                                .bytes_committed
                                .fetch_add(u64::from(c.len), Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.counters.commits_refused.fetch_add(1, Ordering::Relaxed);
                            debug!(client, "commit refused: {e}");
                        }
                    }
                }
                self.counters.commits.fetch_add(u64::from(applied), Ordering::Relaxed);
                drop(ix);
                self.write_through(&written);
                Response::Ack { applied }
            }
            Request::Release { slots } => {
                Response::Ack { applied: self.index().release(client, &slots) }
            }
            Request::Pin { keys, lease_ms } => {
                Response::Ack { applied: self.index().pin(client, &keys, now, lease_ms) }
            }
            Request::Unpin { keys } => Response::Ack { applied: self.index().unpin(client, &keys) },
            Request::Prefetch { keys } => {
                let applied = keys.iter().filter(|k| self.load(**k)).count() as u32;
                Response::Ack { applied }
            }
            Request::Stats => Response::Stats(self.stats()),
        }
    }
}

impl Agent {
    /// The agent's figures in Prometheus' text format.
    #[must_use]
    pub fn metrics_text(&self) -> String {
        let s = self.stats();
        let slot = u64::from(self.pool.slot_bytes());
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let nvme = self.nvme().map(|t| (t.capacity(), t.stats(), t.direct(), t.io_uring()));
        let mut o = String::with_capacity(4096);
        let (dram, nv) = ("{tier=\"dram\"}", "{tier=\"nvme\"}");
        let tiers = |d: u64, n: Option<u64>| -> Vec<(&'static str, u64)> {
            let mut v = vec![("{tier=\"dram\"}", d)];
            if let Some(n) = n {
                v.push(("{tier=\"nvme\"}", n));
            }
            v
        };
        family(
            &mut o,
            "gauge",
            "kvtier_agent_capacity_bytes",
            "Capacity per tier.",
            &tiers(self.pool.bytes(), nvme.map(|n| n.0)),
        );
        family(
            &mut o,
            "gauge",
            "kvtier_agent_used_bytes",
            "Bytes holding chunks, per tier.",
            &tiers(u64::from(s.used) * slot, nvme.map(|n| n.1.used_bytes)),
        );
        family(
            &mut o,
            "gauge",
            "kvtier_agent_reserved_bytes",
            "Bytes of slots reserved by clients.",
            &[(dram, u64::from(s.reserved) * slot)],
        );
        family(
            &mut o,
            "gauge",
            "kvtier_agent_pinned_chunks",
            "Chunks pinned by a live lease.",
            &[("", u64::from(s.pinned))],
        );
        family(
            &mut o,
            "gauge",
            "kvtier_agent_locked",
            "Whether the DRAM pool is locked in memory.",
            &[("", u64::from(self.pool.locked()))],
        );
        family(
            &mut o,
            "gauge",
            "kvtier_agent_clients",
            "Attached clients.",
            &[("", get(&c.clients))],
        );
        let mut hits = vec![(dram, s.hits)];
        if nvme.is_some() {
            hits.push((nv, get(&c.nvme_hits)));
        }
        family(&mut o, "counter", "kvtier_agent_lookup_hits", "Keys found, per tier.", &hits);
        family(
            &mut o,
            "counter",
            "kvtier_agent_promotions",
            "Chunks brought from NVMe into DRAM.",
            &[("", get(&c.promotions))],
        );
        let labels: Vec<String> = OPS.iter().map(|o| format!("{{op=\"{o}\"}}")).collect();
        let counts: Vec<(&str, u64)> =
            labels.iter().zip(&c.op_count).map(|(l, v)| (l.as_str(), get(v))).collect();
        family(
            &mut o,
            "counter",
            "kvtier_agent_requests",
            "Requests answered, per operation.",
            &counts,
        );
        let seconds: Vec<(&str, f64)> = labels
            .iter()
            .zip(&c.op_nanos)
            .map(|(l, v)| (l.as_str(), get(v) as f64 / 1e9))
            .collect();
        family(
            &mut o,
            "counter",
            "kvtier_agent_request_seconds",
            "Time spent answering requests, per operation.",
            &seconds,
        );
        family(
            &mut o,
            "counter",
            "kvtier_agent_lookup_misses",
            "Keys not in DRAM.",
            &[("", s.misses)],
        );
        family(
            &mut o,
            "counter",
            "kvtier_agent_evictions",
            "Chunks evicted, per tier.",
            &tiers(s.evictions, nvme.map(|n| n.1.evictions)),
        );
        family(
            &mut o,
            "counter",
            "kvtier_agent_commits",
            "Chunks committed.",
            &[("", get(&c.commits))],
        );
        family(
            &mut o,
            "counter",
            "kvtier_agent_commits_refused",
            "Commits refused (not reserved, too long, checksum).",
            &[("", get(&c.commits_refused))],
        );
        family(
            &mut o,
            "counter",
            "kvtier_agent_committed_bytes",
            "Bytes committed.",
            &[("", get(&c.bytes_committed))],
        );
        family(
            &mut o,
            "counter",
            "kvtier_agent_malformed_frames",
            "Connections closed for a malformed frame.",
            &[("", get(&c.malformed))],
        );
        if let Some((_, n, direct, uring)) = nvme {
            family(
                &mut o,
                "counter",
                "kvtier_agent_nvme_writes",
                "Chunks written to NVMe.",
                &[(nv, n.writes)],
            );
            family(
                &mut o,
                "counter",
                "kvtier_agent_nvme_reads",
                "Chunks read back from NVMe.",
                &[(nv, n.reads)],
            );
            family(
                &mut o,
                "counter",
                "kvtier_agent_nvme_corrupt",
                "NVMe reads that failed their checksum (dropped).",
                &[(nv, n.corrupt)],
            );
            family(
                &mut o,
                "gauge",
                "kvtier_agent_nvme_direct",
                "Whether NVMe I/O uses O_DIRECT.",
                &[("", u64::from(direct))],
            );
            family(
                &mut o,
                "gauge",
                "kvtier_agent_nvme_io_uring",
                "Whether NVMe writes go through io_uring.",
                &[("", u64::from(uring))],
            );
        }
        o
    }
}

/// One metric family in Prometheus' text format: help, type, then every sample.
fn family<T: std::fmt::Display>(
    o: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    samples: &[(&str, T)],
) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    let suffix = if kind == "counter" { "_total" } else { "" };
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{suffix}{labels} {v}");
    }
}

type HttpBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// Serves HTTP on `listener` until the task is dropped: `GET /metrics` (Prometheus text) and
/// `GET /residency` (residency events, one JSON object per line: the current residency as
/// `entered` events, then every change, for as long as the client stays).
pub async fn serve_metrics(listener: tokio::net::TcpListener, agent: Arc<Agent>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let agent = agent.clone();
                    async move { Ok::<_, std::convert::Infallible>(http_route(&agent, &req)) }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}

fn http_route(
    agent: &Agent,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HttpBody> {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    let text = |status: hyper::StatusCode, body: String, kind: &'static str| {
        let mut res = hyper::Response::new(Full::new(bytes::Bytes::from(body)).boxed());
        *res.status_mut() = status;
        res.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
        res
    };
    if req.method() != hyper::Method::GET {
        return text(hyper::StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), "text/plain");
    }
    match req.uri().path() {
        "/metrics" => {
            text(hyper::StatusCode::OK, agent.metrics_text(), "text/plain; version=0.0.4")
        }
        "/residency" => {
            let (now, mut rx) = agent.subscribe_residency();
            let (tx, out) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
            tokio::spawn(async move {
                for e in now {
                    if tx.send(e.to_json_line().into()).await.is_err() {
                        return;
                    }
                }
                loop {
                    match rx.recv().await {
                        Ok(e) => {
                            if tx.send(e.to_json_line().into()).await.is_err() {
                                return;
                            }
                        }
                        // A slow reader missed events: the gap in `seq` tells it to resubscribe.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            let frames = futures_util::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(out),
                |b| Ok::<_, std::convert::Infallible>(Frame::data(b)),
            );
            let mut res = hyper::Response::new(BodyExt::boxed(StreamBody::new(frames)));
            res.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-ndjson"),
            );
            res
        }
        _ => {
            text(hyper::StatusCode::NOT_FOUND, "GET /metrics or /residency\n".into(), "text/plain")
        }
    }
}

/// Binds the agent's socket at `path`, replacing a stale one.
///
/// # Errors
/// When the path cannot be bound.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves clients until the task is dropped.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("accept: {e}");
                continue;
            }
        };
        let agent = agent.clone();
        conns.spawn(async move {
            let client = agent.next_client.fetch_add(1, Ordering::Relaxed);
            agent.counters.clients.fetch_add(1, Ordering::Relaxed);
            match connection(&agent, client, stream).await {
                Ok(()) => debug!(client, "client left"),
                Err(reason) => {
                    if reason.starts_with("malformed") {
                        agent.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(client, "closing connection: {reason}");
                }
            }
            agent.index().client_gone(client);
            agent.counters.clients.fetch_sub(1, Ordering::Relaxed);
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn connection(agent: &Arc<Agent>, client: ClientId, mut s: UnixStream) -> Result<(), String> {
    let mut hello = false;
    let mut header = [0u8; HEADER];
    loop {
        match s.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let h = match decode_header(&header) {
            Ok(h) => h,
            Err(e) => return refuse(&mut s, 0, &e).await,
        };
        let mut body = vec![0u8; h.body_len as usize];
        s.read_exact(&mut body).await.map_err(|e| format!("read: {e}"))?;
        let req = match Request::decode(h.op, &body) {
            Ok(r) => r,
            Err(e) => return refuse(&mut s, h.request_id, &e).await,
        };
        if !hello {
            let Request::Hello { client: name, pid } = req else {
                let reply = Response::Error {
                    code: ErrorCode::State,
                    message: "the first frame must be hello".into(),
                };
                let _ = s.write_all(&reply.encode(h.request_id)).await;
                let _ = s.shutdown().await;
                return Err("first frame was not hello".into());
            };
            info!(client, name = %name, pid, "client attached");
            let reply = Response::Hello {
                pool_bytes: agent.pool.bytes(),
                slot_bytes: agent.pool.slot_bytes(),
                slots: agent.pool.slots(),
            };
            send_with_fd(&s, &reply.encode(h.request_id), agent)
                .await
                .map_err(|e| format!("hello: {e}"))?;
            hello = true;
            continue;
        }
        // Requests that may touch NVMe run on the blocking pool, so one client's disk I/O
        // never stalls the others; the rest are answered in place (microseconds).
        let op = req.op();
        let started = Instant::now();
        let reply = if agent.may_do_io(&req) {
            let agent = agent.clone();
            tokio::task::spawn_blocking(move || agent.handle(client, req))
                .await
                .map_err(|e| format!("request task: {e}"))?
        } else {
            agent.handle(client, req)
        };
        agent.count_op(op, started.elapsed());
        s.write_all(&reply.encode(h.request_id)).await.map_err(|e| format!("write: {e}"))?;
    }
}

async fn refuse(s: &mut UnixStream, request_id: u32, e: &ProtocolError) -> Result<(), String> {
    let reply = Response::Error { code: ErrorCode::Malformed, message: e.to_string() };
    let _ = s.write_all(&reply.encode(request_id)).await;
    // Closing with unread input would reset the connection and lose the reply: stop
    // writing, then discard a bounded amount of what the client still sends.
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024;
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), drain).await;
    Err(format!("malformed frame: {e}"))
}

/// Writes `frame` with the pool's memfd attached to its first byte.
async fn send_with_fd(s: &UnixStream, frame: &[u8], agent: &Agent) -> std::io::Result<()> {
    let mut sent = 0;
    while sent == 0 {
        s.writable().await?;
        let r = s.try_io(Interest::WRITABLE, || {
            let fds = [agent.pool.fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = SendAncillaryBuffer::new(&mut space);
            anc.push(SendAncillaryMessage::ScmRights(&fds));
            sendmsg(s, &[IoSlice::new(frame)], &mut anc, SendFlags::NOSIGNAL)
                .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent = n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let mut rest = &frame[sent..];
    while !rest.is_empty() {
        s.writable().await?;
        match s.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
