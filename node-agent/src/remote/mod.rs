//! The remote tier: chunks kept in an existing Redis or Valkey (one server or a cluster),
//! shared by every node of a resource, so a conversation whose node drains, fails or is full
//! finds its KV on the next node instead of recomputing it (ADR 0015).
//!
//! - Keys are `kvtier:<namespace>:<chunk key in hex>`: the chunk key (design.md's chained
//!   hash of token ids, never text) in the resource's namespace, so two resources on one store
//!   never see each other's chunks (and an ACL can confine each to its prefix).
//! - A value (`value.rs`) is a 48-byte header (magic, version, the chunk key, length, xxh3-64
//!   checksum, conversation) and the chunk's bytes. Every fetch checks all of it; a value that
//!   fails is deleted and reads as a miss, so a truncated or corrupted value costs a recompute,
//!   never wrong KV.
//! - Writes never block a save: a bounded queue (bytes) feeds one writer thread that sends
//!   pipelined `SET … PX ttl`; when the queue is full a write is dropped and counted.
//! - Every call has a timeout. After a failure the tier counts as down for a second: lookups
//!   are misses and writes are dropped without waiting on the network, then it reconnects.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use redis::{IntoConnectionInfo, RedisResult};
use tracing::warn;

mod conn;
mod value;

use conn::{command, Conn, Target};

pub use value::{decode, encode, Fetched, HEADER_BYTES};

/// How long the tier counts as down after a failed call.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Most chunks in one pipelined write or fetch.
pub const BATCH: usize = 32;

/// Where the remote tier is and how it is used.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `redis://` or `rediss://` URLs: one server, or seed nodes of a cluster.
    pub urls: Vec<String>,
    /// The URLs are seeds of a Redis Cluster.
    pub cluster: bool,
    /// ACL user, when not in the URL.
    pub username: Option<String>,
    /// Password, when not in the URL (from a file or the environment, never a flag's value).
    pub password: Option<String>,
    /// The resource's namespace in the store (e.g. `<namespace>/<name>`).
    pub namespace: String,
    /// How long a chunk stays after its last write.
    pub ttl: Duration,
    /// Timeout of each connect, read and write.
    pub timeout: Duration,
    /// Bytes of writes waiting at most; past it writes are dropped.
    pub queue_bytes: u64,
    /// For `rediss://`: the CA certificates (PEM) the store's certificate must chain to,
    /// instead of the system's roots (a private CA, as in-cluster stores usually have).
    pub ca_pem: Option<Vec<u8>>,
    /// Connections a fetch uses at once (each with its share of the keys in flight): one
    /// connection's round trips and the checksum checks overlap, and a cluster's shards
    /// serve in parallel.
    pub parallel: usize,
}

impl RemoteConfig {
    /// A config for `urls` with the defaults: no cluster, namespace `default`, TTL one hour,
    /// 100 ms timeouts, 256 MiB of queued writes.
    #[must_use]
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            cluster: false,
            username: None,
            password: None,
            namespace: "default".into(),
            ttl: Duration::from_secs(3600),
            timeout: Duration::from_millis(100),
            queue_bytes: 256 << 20,
            ca_pem: None,
            parallel: 4,
        }
    }
}

/// Counters of the remote tier.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Chunks written.
    pub writes: AtomicU64,
    /// Bytes written (values, headers included).
    pub written_bytes: AtomicU64,
    /// Writes dropped: the queue was full or the tier down.
    pub dropped: AtomicU64,
    /// Dropped writes queued again when DRAM evicted their chunk.
    pub retried: AtomicU64,
    /// Keys a lookup found remotely.
    pub hits: AtomicU64,
    /// Chunks fetched and verified.
    pub fetches: AtomicU64,
    /// Bytes of chunks fetched.
    pub fetched_bytes: AtomicU64,
    /// Values that failed their checks (deleted).
    pub corrupt: AtomicU64,
    /// Calls that failed (timeouts, connection errors, server errors).
    pub errors: AtomicU64,
}

struct Write {
    key: ChunkKey,
    value: Vec<u8>,
    conversation: ConversationKey,
}

/// What the writer tells its owner after each pipeline: the conversations of the chunks the
/// store accepted (each once).
pub type OnWritten = Box<dyn Fn(&[ConversationKey]) + Send + Sync>;

#[derive(Default)]
struct Queue {
    items: VecDeque<Write>,
    bytes: u64,
    /// Writes taken by the writer and not yet answered.
    in_flight: usize,
    stop: bool,
}

struct Inner {
    cfg: RemoteConfig,
    target: Target,
    idle: Mutex<Vec<Conn>>,
    down_until: Mutex<Option<Instant>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: RemoteStats,
    logged_down: AtomicBool,
    on_written: Mutex<Option<OnWritten>>,
    /// Chunks whose write was dropped, to write when DRAM evicts them (bounded: past
    /// [`MISSED`] the oldest are forgotten, as a dropped write was before).
    missed: Mutex<(HashSet<ChunkKey>, VecDeque<ChunkKey>)>,
}

/// Dropped writes remembered for a retry at eviction, at most.
const MISSED: usize = 1 << 16;

/// The remote tier (see the module's docs).
pub struct RemoteTier {
    inner: Arc<Inner>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier")
            .field("urls", &self.inner.cfg.urls)
            .field("cluster", &self.inner.cfg.cluster)
            .field("namespace", &self.inner.cfg.namespace)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RemoteTier {
    /// A tier over `cfg`'s store. Nothing is connected yet: a store that is down at start
    /// makes misses until it is up.
    ///
    /// # Errors
    /// When a URL does not parse.
    pub fn new(cfg: RemoteConfig) -> RedisResult<Self> {
        let tls = cfg.urls.iter().any(|u| u.starts_with("rediss:"));
        if tls {
            // rustls needs a process-wide provider; another part may have installed one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = cfg
            .ca_pem
            .as_ref()
            .filter(|_| tls)
            .map(|ca| redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) });
        let target = if cfg.cluster {
            let mut b = redis::cluster::ClusterClientBuilder::new(cfg.urls.clone())
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout)
                .retries(0);
            if let Some(u) = &cfg.username {
                b = b.username(u);
            }
            if let Some(p) = &cfg.password {
                b = b.password(p);
            }
            if let Some(c) = certs {
                b = b.certs(c);
            }
            Target::Cluster(b.build()?)
        } else {
            let url = cfg.urls.first().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no URL"))
            })?;
            let mut info = url.as_str().into_connection_info()?;
            let mut settings = info.redis_settings().clone();
            if let Some(u) = &cfg.username {
                settings = settings.set_username(u);
            }
            if let Some(p) = &cfg.password {
                settings = settings.set_password(p);
            }
            info = info.set_redis_settings(settings);
            Target::Single(match certs {
                Some(c) => redis::Client::build_with_tls(info, c)?,
                None => redis::Client::open(info)?,
            })
        };
        let inner = Arc::new(Inner {
            cfg,
            target,
            idle: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stats: RemoteStats::default(),
            logged_down: AtomicBool::new(false),
            on_written: Mutex::new(None),
            missed: Mutex::new((HashSet::new(), VecDeque::new())),
        });
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("kvtier-remote-writer".into())
                .spawn(move || inner.write_loop())
                .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?
        };
        Ok(Self { inner, writer: Some(writer) })
    }

    /// Asks the store for a `PONG` (a failure marks the tier down, as any call's does).
    pub fn ping(&self) -> bool {
        let ping = redis::cmd("PING");
        self.inner.call(|c| ping.query::<String>(c.like())).is_some()
    }

    /// Calls `f` after each pipeline the store accepted, with the conversations written (the
    /// agent tells the routers, through its residency stream).
    pub fn on_written(&self, f: OnWritten) {
        *lock(&self.inner.on_written) = Some(f);
    }

    /// How long the store keeps a write.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.inner.cfg.ttl
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> &RemoteStats {
        &self.inner.stats
    }

    /// Whether the last call reached the store (false for a second after a failure).
    #[must_use]
    pub fn up(&self) -> bool {
        self.inner.up()
    }

    /// Writes queued or being sent.
    #[must_use]
    pub fn pending(&self) -> usize {
        let q = lock(&self.inner.queue);
        q.items.len() + q.in_flight
    }

    /// The store's key for `key`.
    #[must_use]
    pub fn key_of(&self, key: ChunkKey) -> String {
        self.inner.key_of(key)
    }

    /// Queues a write of `data` under `key`; false when it was dropped (queue full, tier
    /// down). Never waits on the network.
    pub fn put(&self, key: ChunkKey, data: &[u8], sum: u64, conversation: ConversationKey) -> bool {
        let inner = &self.inner;
        let size = (HEADER_BYTES + data.len()) as u64;
        let mut q = lock(&inner.queue);
        if !inner.up() || q.bytes + size > inner.cfg.queue_bytes {
            drop(q);
            inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
            inner.missed(key);
            return false;
        }
        q.items.push_back(Write { key, value: encode(key, data, sum, conversation), conversation });
        q.bytes += size;
        drop(q);
        inner.wake.notify_one();
        true
    }

    /// Whether `key`'s write was dropped (and not retried since); forgets it. The agent asks
    /// when DRAM evicts the chunk, and queues it again.
    pub fn take_missed(&self, key: ChunkKey) -> bool {
        lock(&self.inner.missed).0.remove(&key)
    }

    /// Which of `keys` the store holds (one pipelined round trip); all false when it is down.
    pub fn contains(&self, keys: &[ChunkKey]) -> Vec<bool> {
        let inner = &self.inner;
        if keys.is_empty() || !inner.up() {
            return vec![false; keys.len()];
        }
        let exists = |i: usize| command(&["EXISTS"], &inner.key_of(keys[i]), &[]);
        let found: Vec<bool> =
            inner.run::<bool>(keys.len(), exists).into_iter().map(|f| f == Some(true)).collect();
        let n = found.iter().filter(|f| **f).count();
        inner.stats.hits.fetch_add(n as u64, Ordering::Relaxed);
        found
    }

    /// Fetches `keys` and checks each; `None` for a key the store lacks, that failed its
    /// checks (then deleted) or that a failure left unread.
    pub fn fetch(&self, keys: &[ChunkKey]) -> Vec<Option<Fetched>> {
        let out: Vec<Mutex<Option<Fetched>>> = keys.iter().map(|_| Mutex::new(None)).collect();
        self.fetch_each(keys, |i, f| *lock(&out[i]) = f);
        out.into_iter().map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner)).collect()
    }

    /// Fetches `keys` and hands each, checked, to `take` with its index in `keys` (`None`
    /// as [`RemoteTier::fetch`] says), as it comes. [`RemoteConfig::parallel`] connections
    /// fetch at once, each pipelining its share of a window of [`BATCH`] keys: at most
    /// `BATCH` fetched chunks are held outside `take` at a time, whatever the parallelism.
    pub fn fetch_each(&self, keys: &[ChunkKey], take: impl Fn(usize, Option<Fetched>) + Sync) {
        let inner = &self.inner;
        let lanes = inner.cfg.parallel.clamp(1, BATCH);
        let per_lane = BATCH.div_ceil(lanes);
        let one = |first: usize, batch: &[ChunkKey]| {
            if !inner.up() {
                for i in 0..batch.len() {
                    take(first + i, None);
                }
                return;
            }
            let get = |i: usize| command(&["GET"], &inner.key_of(batch[i]), &[]);
            let values = inner.run::<Option<Vec<u8>>>(batch.len(), get);
            for (i, (k, v)) in batch.iter().zip(values).enumerate() {
                take(first + i, v.flatten().and_then(|v| inner.check(*k, v)));
            }
        };
        for (w, window) in keys.chunks(BATCH).enumerate() {
            let base = w * BATCH;
            if lanes == 1 || window.len() <= per_lane {
                one(base, window);
                continue;
            }
            std::thread::scope(|s| {
                for (l, part) in window.chunks(per_lane).enumerate() {
                    let one = &one;
                    s.spawn(move || one(base + l * per_lane, part));
                }
            });
        }
    }
}

impl Drop for RemoteTier {
    fn drop(&mut self) {
        lock(&self.inner.queue).stop = true;
        self.inner.wake.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Inner {
    /// Remembers that `key`'s write was dropped.
    fn missed(&self, key: ChunkKey) {
        let mut m = lock(&self.missed);
        let (set, order) = &mut *m;
        if set.insert(key) {
            order.push_back(key);
        }
        while order.len() > MISSED {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        // Keys taken since linger in the order; drop them when they pile up.
        if order.len() > 2 * set.len() + 1024 {
            order.retain(|k| set.contains(k));
        }
    }

    fn key_of(&self, key: ChunkKey) -> String {
        format!("kvtier:{}:{:032x}", self.cfg.namespace, key.0)
    }

    /// A fetched value's chunk, or `None` after deleting a value that fails its checks.
    fn check(&self, key: ChunkKey, value: Vec<u8>) -> Option<Fetched> {
        match decode(key, value) {
            Ok(f) => {
                self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                self.stats.fetched_bytes.fetch_add(u64::from(f.len), Ordering::Relaxed);
                Some(f)
            }
            Err(why) => {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                warn!("remote chunk {:032x} dropped: {why}", key.0);
                let del = command(&["DEL"], &self.key_of(key), &[]);
                self.call(|c| del.query::<()>(c.like()));
                None
            }
        }
    }

    /// The writer thread: sends queued writes in pipelines of up to [`BATCH`].
    fn write_loop(&self) {
        let ttl_ms = u64::try_from(self.cfg.ttl.as_millis()).unwrap_or(u64::MAX);
        loop {
            let batch: Vec<Write> = {
                let mut q = lock(&self.queue);
                while q.items.is_empty() && !q.stop {
                    q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
                if q.items.is_empty() {
                    return;
                }
                let n = q.items.len().min(BATCH);
                let batch: Vec<Write> = q.items.drain(..n).collect();
                q.bytes -= batch.iter().map(|w| w.value.len() as u64).sum::<u64>();
                q.in_flight = batch.len();
                batch
            };
            let answers: Vec<Option<redis::Value>> = if self.up() {
                let ttl = ttl_ms.to_string();
                let set = |i: usize| {
                    let w: &Write = &batch[i];
                    command(&["SET"], &self.key_of(w.key), &[&w.value, b"PX", ttl.as_bytes()])
                };
                self.run(batch.len(), set)
            } else {
                Vec::new()
            };
            let s = &self.stats;
            let mut written: Vec<ConversationKey> = Vec::new();
            for (i, w) in batch.iter().enumerate() {
                if answers.get(i).is_some_and(Option::is_some) {
                    s.writes.fetch_add(1, Ordering::Relaxed);
                    s.written_bytes.fetch_add(w.value.len() as u64, Ordering::Relaxed);
                    if !written.contains(&w.conversation) {
                        written.push(w.conversation);
                    }
                } else {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                    self.missed(w.key);
                }
            }
            if !written.is_empty() {
                if let Some(f) = &*lock(&self.on_written) {
                    f(&written);
                }
            }
            lock(&self.queue).in_flight = 0;
        }
    }
}
