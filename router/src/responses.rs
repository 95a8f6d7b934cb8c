//! Which endpoint holds which stored response (OpenAI Responses API).
//!
//! An engine keeps the responses it produced in its own memory: a request continuing one
//! (`previous_response_id`) and `GET`/`cancel` by id only work on that engine. The router
//! learns the id from the first bytes of each response it passes through (the JSON object's
//! `id`, or the `response.created` event's `response.id` when streamed) and remembers its
//! endpoint in a bounded table, oldest forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::endpoint::EndpointId;

/// How far into a response body its id is looked for.
pub const SNIFF_BYTES: usize = 4096;

/// The longest id remembered (vLLM's are `resp_` and 32 hex digits).
const MAX_ID_BYTES: usize = 256;

/// Response id → the endpoint that stored it, bounded.
#[derive(Debug)]
pub struct ResponseOwners {
    capacity: usize,
    // std Mutex: map work only, never held across an await.
    inner: Mutex<Owners>,
}

#[derive(Debug, Default)]
struct Owners {
    by_id: HashMap<Box<str>, EndpointId>,
    order: VecDeque<Box<str>>,
}

impl ResponseOwners {
    /// A table that remembers at most `capacity` responses.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), inner: Mutex::new(Owners::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Owners> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers that `endpoint` stored response `id`.
    pub fn learn(&self, id: &str, endpoint: EndpointId) {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return;
        }
        let mut o = self.lock();
        if o.by_id.insert(id.into(), endpoint).is_none() {
            o.order.push_back(id.into());
            while o.order.len() > self.capacity {
                if let Some(old) = o.order.pop_front() {
                    o.by_id.remove(&old);
                }
            }
        }
    }

    /// The endpoint that stored response `id`, when known.
    pub fn owner(&self, id: &str) -> Option<EndpointId> {
        self.lock().by_id.get(id).copied()
    }

    /// How many responses are remembered.
    pub fn remembered(&self) -> usize {
        self.lock().by_id.len()
    }
}

/// The first `"id"` member's string value in `head` (the start of a response body, JSON or
/// server-sent events), when `head` holds all of it.
#[must_use]
pub fn find_id(head: &[u8]) -> Option<&str> {
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&head[from..], b"\"id\"") {
        let rest = &head[from + at + 4..];
        let rest = trim_start(rest);
        if let Some(rest) = rest.strip_prefix(b":") {
            let rest = trim_start(rest);
            if let Some(value) = rest.strip_prefix(b"\"") {
                let end = memchr::memchr2(b'"', b'\\', value)?;
                // An id with escapes is not one an engine makes: not remembered.
                if value[end] != b'"' {
                    return None;
                }
                return std::str::from_utf8(&value[..end]).ok();
            }
        }
        from += at + 4;
    }
    None
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_found_in_a_body_and_in_a_stream() {
        assert_eq!(find_id(br#"{"id":"resp_1","object":"response"}"#), Some("resp_1"));
        let stream = b"event: response.created\ndata: {\"type\":\"response.created\",\
            \"response\":{\"id\": \"resp_2\",\"status\":\"in_progress\"}}\n\n";
        assert_eq!(find_id(stream), Some("resp_2"));
        assert_eq!(find_id(br#"{"object":"x","id""#), None);
        assert_eq!(find_id(br#"{"id":"resp_3"#), None);
        assert_eq!(find_id(br#"{"id":3,"x":{"id":"resp_4"}}"#), Some("resp_4"));
    }

    #[test]
    fn the_oldest_is_forgotten_first() {
        let owners = ResponseOwners::new(2);
        owners.learn("a", EndpointId::new(1));
        owners.learn("b", EndpointId::new(2));
        owners.learn("a", EndpointId::new(3));
        owners.learn("c", EndpointId::new(4));
        assert_eq!(owners.owner("a"), None);
        assert_eq!(owners.owner("b"), Some(EndpointId::new(2)));
        assert_eq!(owners.owner("c"), Some(EndpointId::new(4)));
        assert_eq!(owners.remembered(), 2);
        owners.learn(&"x".repeat(300), EndpointId::new(5));
        assert_eq!(owners.remembered(), 2);
    }
}
