//! Endpoints: one engine's address, with its health and in-flight load.
//!
//! The set of endpoints changes when discovery says so; each endpoint gets an
//! [`EndpointId`] that is never reused in this process, so state keyed by a stale id (a
//! prefix-index entry, a session binding) simply stops matching instead of pointing at a
//! different replica.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use http::uri::{Authority, Scheme, Uri};

/// Process-unique id of an endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct EndpointId(NonZeroU32);

impl EndpointId {
    /// The id with the given number (tests and pure decision code).
    ///
    /// # Panics
    /// If `n` is zero.
    #[must_use]
    pub fn new(n: u32) -> Self {
        Self(NonZeroU32::new(n).expect("endpoint ids start at 1"))
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// An endpoint as discovery describes it: where it is, and which node it runs on when known
/// (the replicas of a node share its KV tiers).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EndpointSpec {
    scheme: Scheme,
    authority: Authority,
    node: Option<String>,
}

/// Why a string is not an endpoint address.
#[derive(Debug, thiserror::Error)]
pub enum EndpointSpecError {
    /// The string is not a URI.
    #[error("endpoint {0:?} is not a URL")]
    Parse(String, #[source] http::uri::InvalidUri),
    /// The URI lacks a host, uses a scheme other than http, or carries a path.
    #[error("endpoint {0:?} must look like http://host:port (no path, no query)")]
    Shape(String),
}

impl EndpointSpec {
    /// Parses `http://host:port`, or `NODE=http://host:port` for an endpoint on node `NODE`.
    ///
    /// # Errors
    /// When the string is not an absolute `http` URL without a path.
    pub fn parse(s: &str) -> Result<Self, EndpointSpecError> {
        if let Some((node, url)) = s.split_once('=') {
            if !node.is_empty() && !node.contains(['/', ':']) {
                return Ok(Self::parse(url)?.with_node(Some(node.to_owned())));
            }
        }
        let uri: Uri = s
            .trim_end_matches('/')
            .parse()
            .map_err(|e| EndpointSpecError::Parse(s.to_owned(), e))?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(EndpointSpecError::Shape(s.to_owned()));
        };
        let path_is_root = parts
            .path_and_query
            .as_ref()
            .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty());
        if scheme != Scheme::HTTP || !path_is_root {
            return Err(EndpointSpecError::Shape(s.to_owned()));
        }
        Ok(Self { scheme, authority, node: None })
    }

    /// The same endpoint on `node`.
    #[must_use]
    pub fn with_node(mut self, node: Option<String>) -> Self {
        self.node = node;
        self
    }

    /// The node it runs on, when discovery knows.
    #[must_use]
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// `host:port`, used as the endpoint's name in logs and metric labels.
    #[must_use]
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The absolute URI of `path_and_query` on this endpoint.
    ///
    /// # Errors
    /// When `path_and_query` is not a valid URI path.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

/// One engine endpoint and its live state.
#[derive(Debug)]
pub struct Endpoint {
    /// Process-unique id.
    pub id: EndpointId,
    /// Address.
    pub spec: EndpointSpec,
    /// `host:port`, the label used in logs and metrics.
    pub name: String,
    /// Work routed here that has not finished, in requests and in tokens.
    pub load: Load,
    /// Passive and active health.
    pub health: Health,
}

/// In-flight work on one endpoint.
#[derive(Debug, Default)]
pub struct Load {
    requests: AtomicU64,
    tokens: AtomicU64,
    placing: AtomicU64,
}

impl Load {
    /// Requests routed here that have not finished.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Tokens of work routed here that have not finished: uncached prefill of requests that
    /// have not produced a first byte yet, plus the expected output of requests in flight.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// Prompt tokens of new conversations sent here whose placement is not recorded in the
    /// prefix index yet: their resident context, counted from the moment they are routed so
    /// that new conversations routed at the same time see each other.
    pub fn placing_tokens(&self) -> u64 {
        self.placing.load(Ordering::Relaxed)
    }
}

/// Health of one endpoint: healthy until a connect error, a failed probe or
/// `unhealthy_after` consecutive 5xx answers; healthy again after one good answer or probe.
#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
}

impl Default for Health {
    fn default() -> Self {
        Self { healthy: AtomicBool::new(true), consecutive_failures: AtomicU32::new(0) }
    }
}

impl Health {
    /// Whether the endpoint is believed to serve.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A request or probe succeeded. Returns true when this brought the endpoint back.
    pub fn record_success(&self) -> bool {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        !self.healthy.swap(true, Ordering::Relaxed)
    }

    /// A request failed in a way that may be transient (a 5xx). Returns true when this made
    /// the endpoint unhealthy.
    pub fn record_failure(&self, unhealthy_after: u32) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= unhealthy_after && self.healthy.swap(false, Ordering::Relaxed)
    }

    /// The endpoint is certainly not serving (connection refused, probe failed). Returns
    /// true when it was healthy before.
    pub fn mark_down(&self) -> bool {
        self.healthy.swap(false, Ordering::Relaxed)
    }
}

/// Accounts one request's work on an endpoint for as long as it lives.
///
/// Created when a request is sent; the prefill part is released at the first response byte
/// ([`LoadGuard::first_byte`]) and the rest when the guard drops (response finished, failed
/// or abandoned by the client), so the counters cannot leak.
#[derive(Debug)]
pub struct LoadGuard {
    endpoint: Arc<Endpoint>,
    prefill: u64,
    decode: u64,
    placing: u64,
}

impl LoadGuard {
    /// Adds one request of `prefill + decode` tokens to `endpoint`.
    pub fn new(endpoint: Arc<Endpoint>, prefill: u64, decode: u64) -> Self {
        endpoint.load.requests.fetch_add(1, Ordering::Relaxed);
        endpoint.load.tokens.fetch_add(prefill + decode, Ordering::Relaxed);
        Self { endpoint, prefill, decode, placing: 0 }
    }

    /// Counts `tokens` of resident context for a new conversation being placed here, until
    /// [`LoadGuard::placed`] (or the end of the request).
    #[must_use]
    pub fn placing(mut self, tokens: u64) -> Self {
        self.endpoint.load.placing.fetch_add(tokens, Ordering::Relaxed);
        self.placing += tokens;
        self
    }

    /// The placement is recorded in the prefix index; stop counting it here.
    pub fn placed(&mut self) {
        let placing = std::mem::take(&mut self.placing);
        self.endpoint.load.placing.fetch_sub(placing, Ordering::Relaxed);
    }

    /// The endpoint this guard accounts on.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The first response byte arrived: prefill is over.
    pub fn first_byte(&mut self) {
        let prefill = std::mem::take(&mut self.prefill);
        self.endpoint.load.tokens.fetch_sub(prefill, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.placed();
        let load = &self.endpoint.load;
        load.tokens.fetch_sub(self.prefill + self.decode, Ordering::Relaxed);
        load.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The current endpoints, replaced as a whole when discovery changes them.
#[derive(Debug, Default)]
pub struct Endpoints {
    // std RwLock: held only to clone or swap an Arc, never across an await.
    current: RwLock<Arc<[Arc<Endpoint>]>>,
    next_id: AtomicU32,
}

/// What changed when the endpoint set was replaced.
#[derive(Debug, Default)]
pub struct EndpointChange {
    /// Endpoints that appeared.
    pub added: Vec<Arc<Endpoint>>,
    /// Endpoints that are gone.
    pub removed: Vec<Arc<Endpoint>>,
}

impl Endpoints {
    /// A cheap snapshot of the current set.
    pub fn snapshot(&self) -> Arc<[Arc<Endpoint>]> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the set with `specs`, keeping the state of endpoints that stay.
    pub fn replace(&self, specs: &[EndpointSpec]) -> EndpointChange {
        let mut guard = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = guard.clone();
        let mut change = EndpointChange::default();
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(specs.len());
        for spec in specs {
            if next.iter().any(|e| &e.spec == spec) {
                continue;
            }
            if let Some(kept) = old.iter().find(|e| &e.spec == spec) {
                next.push(kept.clone());
            } else {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                let endpoint = Arc::new(Endpoint {
                    id: EndpointId::new(n),
                    name: spec.authority().to_string(),
                    spec: spec.clone(),
                    load: Load::default(),
                    health: Health::default(),
                });
                change.added.push(endpoint.clone());
                next.push(endpoint);
            }
        }
        change.removed =
            old.iter().filter(|e| !next.iter().any(|n| n.id == e.id)).cloned().collect();
        *guard = next.into();
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> EndpointSpec {
        EndpointSpec::parse(s).expect("valid endpoint")
    }

    #[test]
    fn endpoint_urls_are_validated() {
        assert!(EndpointSpec::parse("http://127.0.0.1:8001").is_ok());
        assert!(EndpointSpec::parse("http://127.0.0.1:8001/").is_ok());
        assert!(EndpointSpec::parse("127.0.0.1:8001").is_err());
        assert!(EndpointSpec::parse("https://a:1").is_err());
        assert!(EndpointSpec::parse("http://a:1/v1").is_err());
        assert!(EndpointSpec::parse("not a url").is_err());
        let on = EndpointSpec::parse("gpu-a=http://127.0.0.1:8001").expect("with a node");
        assert_eq!(on.node(), Some("gpu-a"));
        assert_eq!(on.authority().as_str(), "127.0.0.1:8001");
        assert!(EndpointSpec::parse("gpu-a=nope").is_err());
        assert_eq!(EndpointSpec::parse("http://127.0.0.1:8001").expect("plain").node(), None);
    }

    #[test]
    fn replacing_keeps_state_of_endpoints_that_stay_and_never_reuses_ids() {
        let set = Endpoints::default();
        let first = set.replace(&[spec("http://a:1"), spec("http://b:1")]);
        assert_eq!(first.added.len(), 2);
        let a = first.added[0].clone();
        let _guard = LoadGuard::new(a.clone(), 10, 5);
        let second = set.replace(&[spec("http://a:1"), spec("http://c:1")]);
        assert_eq!(second.added.len(), 1);
        assert_eq!(second.removed.len(), 1);
        let snap = set.snapshot();
        assert_eq!(snap[0].id, a.id);
        assert_eq!(snap[0].load.tokens(), 15);
        assert!(snap[1].id > first.added[1].id);
    }

    #[test]
    fn load_guard_releases_prefill_at_first_byte_and_the_rest_on_drop() {
        let set = Endpoints::default();
        let e = set.replace(&[spec("http://a:1")]).added.remove(0);
        let mut g = LoadGuard::new(e.clone(), 100, 7);
        assert_eq!((e.load.requests(), e.load.tokens()), (1, 107));
        g.first_byte();
        g.first_byte();
        assert_eq!(e.load.tokens(), 7);
        drop(g);
        assert_eq!((e.load.requests(), e.load.tokens()), (0, 0));
        let mut g = LoadGuard::new(e.clone(), 1, 1).placing(50);
        assert_eq!(e.load.placing_tokens(), 50);
        g.placed();
        assert_eq!(e.load.placing_tokens(), 0);
        drop(LoadGuard::new(e.clone(), 1, 1).placing(9));
        assert_eq!(e.load.placing_tokens(), 0, "a failed request releases its placement");
    }

    #[test]
    fn health_needs_consecutive_failures_and_recovers_on_success() {
        let h = Health::default();
        assert!(!h.record_failure(3));
        assert!(!h.record_failure(3));
        assert!(h.record_failure(3));
        assert!(!h.is_healthy());
        assert!(h.record_success());
        assert!(h.is_healthy());
        assert!(h.mark_down());
        assert!(!h.mark_down());
    }
}
