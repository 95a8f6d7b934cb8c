//! Response bodies: either made by the router, or an endpoint's body passed through frame by
//! frame (no buffering) while its load is accounted and its first byte timed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::endpoint::{EndpointId, LoadGuard};
use crate::responses::{find_id, ResponseOwners, SNIFF_BYTES};

/// The body of every response the router sends.
#[derive(Debug)]
pub enum ResponseBody {
    /// Made by the router.
    Full(Option<Bytes>),
    /// An endpoint's body, passed through.
    Upstream(Box<Passthrough>),
}

/// An endpoint's body with its bookkeeping.
#[derive(Debug)]
pub struct Passthrough {
    /// Frames already read from `inner` (while the head was held), sent first.
    pending: VecDeque<Bytes>,
    inner: Incoming,
    /// Released when this body ends or is dropped (client gone).
    guard: LoadGuard,
    /// Observed once, at the first data frame.
    first_byte: Option<(Instant, Histogram)>,
    /// Looking for the stored response's id in the body's first bytes.
    sniff: Option<Sniff>,
    /// Counts a body that breaks after its head was sent.
    broken: Option<Counter>,
}

/// The search for a response's id (see [`crate::responses`]).
#[derive(Debug)]
struct Sniff {
    owners: Arc<ResponseOwners>,
    endpoint: EndpointId,
    head: Vec<u8>,
}

impl Sniff {
    /// Looks at one more data frame; `true` when the search is over.
    fn feed(&mut self, data: &[u8]) -> bool {
        if self.head.is_empty() {
            if let Some(id) = find_id(&data[..data.len().min(SNIFF_BYTES)]) {
                self.owners.learn(id, self.endpoint);
                return true;
            }
        }
        let room = SNIFF_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
        if let Some(id) = find_id(&self.head) {
            self.owners.learn(id, self.endpoint);
            return true;
        }
        self.head.len() >= SNIFF_BYTES
    }
}

impl ResponseBody {
    /// A body of the given bytes.
    #[must_use]
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody::Full(Some(bytes))
    }

    /// Passes `inner` through, releasing `guard` at its end and timing its first byte from
    /// `start` into `ttfb`.
    #[must_use]
    pub fn upstream(inner: Incoming, guard: LoadGuard, start: Instant, ttfb: Histogram) -> Self {
        ResponseBody::Upstream(Box::new(Passthrough {
            pending: VecDeque::new(),
            inner,
            guard,
            first_byte: Some((start, ttfb)),
            sniff: None,
            broken: None,
        }))
    }

    /// Sends `frames` (read while the head was held) before the rest of the body.
    #[must_use]
    pub fn after(mut self, frames: Vec<Bytes>) -> Self {
        if let ResponseBody::Upstream(p) = &mut self {
            p.pending = frames.into();
        }
        self
    }

    /// Counts into `broken` a body that fails after its head was sent.
    #[must_use]
    pub fn counting_breaks(mut self, broken: Counter) -> Self {
        if let ResponseBody::Upstream(p) = &mut self {
            p.broken = Some(broken);
        }
        self
    }

    /// Also learns, from the body's first bytes, the id under which the endpoint stored the
    /// response, into `owners`.
    #[must_use]
    pub fn learning_response_id(mut self, owners: Arc<ResponseOwners>) -> Self {
        if let ResponseBody::Upstream(p) = &mut self {
            let endpoint = p.guard.endpoint().id;
            p.sniff = Some(Sniff { owners, endpoint, head: Vec::new() });
        }
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream(p) => {
                let polled = match p.pending.pop_front() {
                    Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    None => Pin::new(&mut p.inner).poll_frame(cx),
                };
                if let (Poll::Ready(Some(Err(_))), Some(broken)) = (&polled, &p.broken) {
                    broken.inc();
                }
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        if let Some((start, ttfb)) = p.first_byte.take() {
                            ttfb.observe(start.elapsed().as_secs_f64());
                            p.guard.first_byte();
                        }
                        if p.sniff.as_mut().is_some_and(|s| s.feed(data)) {
                            p.sniff = None;
                        }
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Upstream(p) => p.pending.is_empty() && p.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Upstream(p) => {
                let pending: u64 = p.pending.iter().map(|b| b.len() as u64).sum();
                let inner = p.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + pending);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + pending);
                }
                hint
            }
        }
    }
}
