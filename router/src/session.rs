//! Sessions: which conversation a request belongs to, and where it is bound.
//!
//! A session key comes from the first configured header present (agent harness headers;
//! see [`kvtier_api::session`]), then the body's `user` field. Only a 64-bit hash of it is
//! kept, never the id itself. A binding ties a session to the endpoint that holds its KV; it
//! expires after an idle TTL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::HeaderMap;
use kvtier_api::prefix::xxh3_64_with_seed;
use kvtier_api::session::{CHILD_SESSION_HEADERS, MAX_SESSION_ID_BYTES};

use crate::endpoint::EndpointId;

const SESSION_SEED: u64 = 0x6b76_7469_6572_7373; // "kvtierss"

/// Hash of a session id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SessionKey(u64);

impl SessionKey {
    /// The endpoint rendezvous hashing picks for this session among `candidates` (their
    /// `host:port`): the same on every router that sees the same endpoints.
    #[must_use]
    pub fn rendezvous<'a>(self, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
        candidates.max_by_key(|a| (xxh3_64_with_seed(a.as_bytes(), self.0), *a))
    }
}

/// Where a session key came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SessionSource {
    /// A request header.
    Header,
    /// The body's `user` field.
    User,
}

fn usable(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_SESSION_ID_BYTES
}

/// Finds the session key of a request: the first of `headers_in_order` present with a usable
/// value (combined with a subagent id when the harness sends one), else the `user` field.
#[must_use]
pub fn session_key(
    headers: &HeaderMap,
    headers_in_order: &[http::HeaderName],
    user: Option<&str>,
) -> Option<(SessionKey, SessionSource)> {
    for name in headers_in_order {
        let Some(value) = headers.get(name).map(http::HeaderValue::as_bytes) else {
            continue;
        };
        if !usable(value) {
            continue;
        }
        let mut key = xxh3_64_with_seed(value, SESSION_SEED);
        for (parent, child) in CHILD_SESSION_HEADERS {
            if name.as_str() == *parent {
                if let Some(child) = headers.get(*child).map(http::HeaderValue::as_bytes) {
                    if usable(child) {
                        key = xxh3_64_with_seed(child, key);
                    }
                }
            }
        }
        return Some((SessionKey(key), SessionSource::Header));
    }
    let user = user.filter(|u| usable(u.as_bytes()))?;
    Some((SessionKey(xxh3_64_with_seed(user.as_bytes(), SESSION_SEED ^ 1)), SessionSource::User))
}

/// The conversation key the connectors tag a session's KV with: the first session header
/// present, as [`kvtier_api::residency::ConversationKey::of_session`] derives it.
#[must_use]
pub fn conversation_key(
    headers: &HeaderMap,
    headers_in_order: &[http::HeaderName],
) -> Option<kvtier_api::residency::ConversationKey> {
    headers_in_order.iter().find_map(|name| {
        let v = headers.get(name)?.to_str().ok().filter(|v| usable(v.as_bytes()))?;
        Some(kvtier_api::residency::ConversationKey::of_session(v))
    })
}

#[derive(Debug, Clone, Copy)]
struct Binding {
    endpoint: EndpointId,
    last_seen: Instant,
}

/// Session bindings with an idle TTL and a bound on how many are kept.
#[derive(Debug)]
pub struct SessionTable {
    bindings: HashMap<SessionKey, Binding>,
    ttl: Duration,
    capacity: usize,
}

impl SessionTable {
    /// An empty table.
    #[must_use]
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { bindings: HashMap::new(), ttl, capacity }
    }

    /// The endpoint `key` is bound to, unless the binding has been idle longer than the TTL.
    pub fn get(&mut self, key: SessionKey, now: Instant) -> Option<EndpointId> {
        let b = *self.bindings.get(&key)?;
        if now.saturating_duration_since(b.last_seen) > self.ttl {
            self.bindings.remove(&key);
            return None;
        }
        Some(b.endpoint)
    }

    /// Binds (or re-binds, or refreshes) `key` to `endpoint`. Returns false when the table is
    /// full of live bindings; the request is then routed without one.
    pub fn bind(&mut self, key: SessionKey, endpoint: EndpointId, now: Instant) -> bool {
        if self.bindings.len() >= self.capacity && !self.bindings.contains_key(&key) {
            self.sweep(now);
            if self.bindings.len() >= self.capacity {
                return false;
            }
        }
        self.bindings.insert(key, Binding { endpoint, last_seen: now });
        true
    }

    /// Drops every binding idle longer than the TTL.
    pub fn sweep(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.bindings.retain(|_, b| now.saturating_duration_since(b.last_seen) <= ttl);
    }

    /// Number of bindings held (live or not yet swept).
    #[must_use]
    pub fn len(&self) -> usize {
        self.bindings.len()
    }
}

#[cfg(test)]
mod rendezvous_tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_and_moves_only_the_sessions_of_a_removed_endpoint() {
        let all = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"];
        let keys: Vec<SessionKey> =
            (0..4000u64).map(|i| SessionKey(xxh3_64_with_seed(&i.to_le_bytes(), 1))).collect();
        let mut count = HashMap::new();
        for k in &keys {
            *count.entry(k.rendezvous(all.iter().copied()).unwrap_or("")).or_insert(0) += 1;
        }
        assert!(count.values().all(|&n| (850..=1150).contains(&n)), "{count:?}");
        let three = &all[1..];
        for k in &keys {
            let before = k.rendezvous(all.iter().copied());
            let after = k.rendezvous(three.iter().copied());
            if before != Some(all[0]) {
                assert_eq!(before, after, "only the removed endpoint's sessions move");
            }
        }
        assert_eq!(SessionKey(1).rendezvous(std::iter::empty()), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn names() -> Vec<HeaderName> {
        kvtier_api::session::DEFAULT_SESSION_HEADERS
            .iter()
            .map(|h| HeaderName::from_static(h))
            .collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn header_wins_over_user_and_order_is_respected() {
        let n = names();
        let a = session_key(&headers(&[("x-session-id", "s1")]), &n, Some("u"));
        let b = session_key(&headers(&[("x-session-id", "s1"), ("thread-id", "t")]), &n, None);
        assert_eq!(a, b);
        assert_eq!(a.map(|k| k.1), Some(SessionSource::Header));
        let u = session_key(&HeaderMap::new(), &n, Some("u"));
        assert_eq!(u.map(|k| k.1), Some(SessionSource::User));
        assert!(session_key(&headers(&[("x-session-id", "")]), &n, None).is_none());
    }

    #[test]
    fn claude_code_subagents_are_their_own_sessions() {
        let n = names();
        let parent = session_key(&headers(&[("x-claude-code-session-id", "c")]), &n, None);
        let child = session_key(
            &headers(&[("x-claude-code-session-id", "c"), ("x-claude-code-agent-id", "a1")]),
            &n,
            None,
        );
        assert_ne!(parent, child);
    }

    #[test]
    fn bindings_expire_when_idle_and_refresh_when_used() {
        let mut t = SessionTable::new(Duration::from_secs(10), 2);
        let now = Instant::now();
        let k = SessionKey(1);
        assert!(t.bind(k, EndpointId::new(1), now));
        assert_eq!(t.get(k, now + Duration::from_secs(9)), Some(EndpointId::new(1)));
        assert!(t.bind(k, EndpointId::new(1), now + Duration::from_secs(9)));
        assert_eq!(t.get(k, now + Duration::from_secs(18)), Some(EndpointId::new(1)));
        assert_eq!(t.get(k, now + Duration::from_secs(30)), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_full_table_sweeps_then_refuses() {
        let mut t = SessionTable::new(Duration::from_secs(10), 1);
        let now = Instant::now();
        assert!(t.bind(SessionKey(1), EndpointId::new(1), now));
        assert!(!t.bind(SessionKey(2), EndpointId::new(1), now));
        assert!(t.bind(SessionKey(2), EndpointId::new(1), now + Duration::from_secs(11)));
        assert_eq!(t.len(), 1);
    }
}
