//! The node tier's HTTP surface, served by the node-agent and by the simulator's replicas
//! alike: `GET /residency` streams [`ResidencyEvent`]s, one JSON object per line (the current
//! residency as `entered` events, then every change, for as long as the client stays and the
//! server runs), and `POST /prefetch/<conversation hex>` brings a conversation's NVMe chunks
//! into DRAM and answers a [`PrefetchReply`]. With a control token both need
//! `Authorization: Bearer <token>`: the stream names every conversation on the node, and a
//! prefetch moves chunks.
//!
//! What a tier is (the ledger, its events, the prefetch reply) is defined in
//! [`kvtier_api::residency`]; a server implements [`NodeTier`] over its own tiers and keeps a
//! [`ResidencyFeed`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kvtier_api::agent::Tier;
use kvtier_api::residency::{
    prefetch_target, ConversationKey, PrefetchReply, ResidencyEvent, ResidencyLedger,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Events a subscriber may fall behind by before it misses some (and sees a gap in `seq`).
const BACKLOG: usize = 4096;
/// Writes buffered per `/residency` client before the stream waits for it.
const STREAM_BUFFER: usize = 256;
/// Most bytes of events sent in one write.
const BATCH_BYTES: usize = 64 << 10;

/// The current residency (as `entered` events) and the changes from then on.
pub type Subscription = (Vec<ResidencyEvent>, broadcast::Receiver<ResidencyEvent>);

/// A node tier's [`ResidencyLedger`] and the stream of its changes. Its owner serialises
/// changes (it sits under the owner's lock), so events go out in ledger order.
#[derive(Debug)]
pub struct ResidencyFeed {
    ledger: ResidencyLedger,
    events: broadcast::Sender<ResidencyEvent>,
}

impl Default for ResidencyFeed {
    fn default() -> Self {
        Self { ledger: ResidencyLedger::default(), events: broadcast::channel(BACKLOG).0 }
    }
}

impl ResidencyFeed {
    /// One chunk of `conversation` entered or left `tier`; subscribers hear of it when it is
    /// the conversation's first chunk in or last chunk out.
    pub fn change(&mut self, conversation: ConversationKey, tier: Tier, entered: bool) {
        if let Some(e) = self.ledger.change(conversation, tier, entered) {
            // No subscriber is not an error.
            let _ = self.events.send(e);
        }
    }

    /// Chunks of `conversation` were written to the remote tier, where they stay for `ttl`;
    /// subscribers hear of it now and then ([`ResidencyLedger::remote_written`]).
    pub fn remote_written(&mut self, conversation: ConversationKey, ttl: std::time::Duration) {
        if let Some(e) = self.ledger.remote_written(conversation, ttl, std::time::Instant::now()) {
            let _ = self.events.send(e);
        }
    }

    /// Chunks of `conversation` in `tier`.
    #[must_use]
    pub fn chunks(&self, conversation: ConversationKey, tier: Tier) -> u32 {
        self.ledger.chunks(conversation, tier)
    }

    /// The current residency and a subscription to what follows.
    #[must_use]
    pub fn subscribe(&self) -> Subscription {
        (self.ledger.snapshot(std::time::Instant::now()), self.events.subscribe())
    }
}

/// A node tier as its HTTP surface sees it.
pub trait NodeTier: Send + Sync + 'static {
    /// The current residency and a subscription to its changes.
    fn subscribe(&self) -> Subscription;

    /// Brings `conversation`'s NVMe chunks into DRAM (never more than DRAM holds) and says how
    /// many of its chunks are in DRAM afterwards.
    fn prefetch(
        self: Arc<Self>,
        conversation: ConversationKey,
    ) -> impl Future<Output = PrefetchReply> + Send;
}

/// A response body of this surface.
pub type Body = BoxBody<Bytes, Infallible>;

/// The routes over one [`NodeTier`].
#[derive(Debug)]
pub struct NodeTierRoutes<T> {
    tier: Arc<T>,
    token: Option<Arc<str>>,
    closing: CancellationToken,
}

impl<T> Clone for NodeTierRoutes<T> {
    fn clone(&self) -> Self {
        Self { tier: self.tier.clone(), token: self.token.clone(), closing: self.closing.clone() }
    }
}

impl<T: NodeTier> NodeTierRoutes<T> {
    /// The routes over `tier`, asking for `token` when there is one. Open `/residency` streams
    /// end when `closing` is cancelled (the server is shutting down), so they do not hold the
    /// drain up.
    #[must_use]
    pub fn new(tier: Arc<T>, token: Option<String>, closing: CancellationToken) -> Self {
        Self { tier, token: token.map(Into::into), closing }
    }

    /// Whether `path` is one of these routes.
    #[must_use]
    pub fn owns(path: &str) -> bool {
        path == "/residency" || path.starts_with("/prefetch/")
    }

    /// Answers a request for one of these routes ([`NodeTierRoutes::owns`]).
    pub async fn handle<B>(&self, req: &Request<B>) -> Response<Body> {
        if !self.authorized(req) {
            let mut res = text(
                StatusCode::UNAUTHORIZED,
                "the control routes need the agent's control token\n",
            );
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return res;
        }
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/residency") => self.residency(),
            (_, "/residency") => not_allowed("GET"),
            (&Method::POST, _) => match prefetch_target(path) {
                Some(c) => {
                    let reply = self.tier.clone().prefetch(c).await;
                    let mut res = text(StatusCode::OK, reply.to_json_line());
                    res.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    res
                }
                None => text(StatusCode::NOT_FOUND, "POST /prefetch/<conversation hex>\n"),
            },
            _ => not_allowed("POST"),
        }
    }

    /// Whether `req` carries the control token (always, when there is none). Compared in
    /// constant time: the comparison says nothing of how much matched.
    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = self.token.as_deref() else { return true };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        given.len() == token.len()
            && given.iter().zip(token.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    fn residency(&self) -> Response<Body> {
        let (now, mut rx) = self.tier.subscribe();
        let (tx, out) = mpsc::channel::<Bytes>(STREAM_BUFFER);
        let closing = self.closing.clone();
        tokio::spawn(async move {
            // The current residency, in writes of up to BATCH_BYTES.
            let mut lines = String::new();
            for e in now {
                lines.push_str(&e.to_json_line());
                if lines.len() >= BATCH_BYTES
                    && tx.send(std::mem::take(&mut lines).into()).await.is_err()
                {
                    return;
                }
            }
            if !lines.is_empty() && tx.send(lines.into()).await.is_err() {
                return;
            }
            loop {
                let first = tokio::select! {
                    () = closing.cancelled() => return,
                    e = rx.recv() => e,
                };
                let mut lines = String::new();
                match first {
                    Ok(e) => lines.push_str(&e.to_json_line()),
                    // A slow reader missed events: the gap in `seq` tells it to resubscribe.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                // What else is already waiting goes in the same write: under a burst of
                // changes one frame per event would cost the reader a read per line and let
                // the backlog overflow.
                while lines.len() < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(e) => lines.push_str(&e.to_json_line()),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
                if !lines.is_empty() && tx.send(lines.into()).await.is_err() {
                    return;
                }
            }
        });
        let frames =
            futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(out), |b| {
                Ok::<_, Infallible>(Frame::data(b))
            });
        let mut res = Response::new(StreamBody::new(frames).boxed());
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        res
    }
}

/// A plain-text response.
#[must_use]
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut res = text(StatusCode::METHOD_NOT_ALLOWED, format!("{allow} only\n"));
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Toy(Mutex<ResidencyFeed>);

    impl NodeTier for Toy {
        fn subscribe(&self) -> Subscription {
            self.0.lock().expect("lock").subscribe()
        }
        async fn prefetch(self: Arc<Self>, c: ConversationKey) -> PrefetchReply {
            PrefetchReply { dram_chunks: self.0.lock().expect("lock").chunks(c, Tier::Dram) }
        }
    }

    fn get(path: &str, token: Option<&str>) -> Request<()> {
        let mut b = Request::get(path);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(()).expect("request")
    }

    async fn body_text(res: Response<Body>) -> String {
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn the_stream_starts_with_the_residency_follows_changes_and_ends_at_shutdown() {
        let toy = Arc::new(Toy::default());
        toy.0.lock().expect("lock").change(ConversationKey(5), Tier::Dram, true);
        let closing = CancellationToken::new();
        let routes = NodeTierRoutes::new(toy.clone(), Some("s3cret".into()), closing.clone());
        assert_eq!(routes.handle(&get("/residency", None)).await.status(), 401);
        assert_eq!(routes.handle(&get("/residency", Some("s3cret!"))).await.status(), 401);
        let res = routes.handle(&get("/residency", Some("s3cret"))).await;
        assert_eq!(res.status(), 200);
        toy.0.lock().expect("lock").change(ConversationKey(6), Tier::Nvme, true);
        let reader = tokio::spawn(body_text(res));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        closing.cancel();
        let lines = reader.await.expect("reader");
        let events: Vec<ResidencyEvent> =
            lines.lines().filter_map(ResidencyEvent::from_json_line).collect();
        assert_eq!(events.len(), 2, "{lines}");
        assert_eq!((events[0].conversation.0, events[0].tier), (5, Tier::Dram));
        assert_eq!((events[1].conversation.0, events[1].tier), (6, Tier::Nvme));

        let post = Request::post("/prefetch/0000000000000005")
            .header(header::AUTHORIZATION, "Bearer s3cret")
            .body(())
            .expect("request");
        let res = routes.handle(&post).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            PrefetchReply::from_json(&body_text(res).await),
            Some(PrefetchReply { dram_chunks: 1 })
        );
        let bad = Request::post("/prefetch/xyz")
            .header(header::AUTHORIZATION, "Bearer s3cret")
            .body(())
            .expect("request");
        assert_eq!(routes.handle(&bad).await.status(), 404);
        let wrong = routes.handle(&get("/prefetch/0000000000000005", Some("s3cret"))).await;
        assert_eq!(wrong.status(), 405);
        assert_eq!(wrong.headers()[header::ALLOW], "POST");
    }

    #[tokio::test]
    async fn a_burst_larger_than_the_backlog_reaches_a_reader_that_was_not_reading_without_a_gap() {
        let toy = Arc::new(Toy::default());
        let closing = CancellationToken::new();
        let routes = NodeTierRoutes::new(toy.clone(), None, closing.clone());
        let res = routes.handle(&get("/residency", None)).await;
        // 6,000 events at once, more than the broadcast backlog (4,096) and the stream's
        // buffer (256 writes) together, while nobody reads the body.
        for i in 1..=6_000u64 {
            toy.0.lock().expect("lock").change(ConversationKey(i), Tier::Dram, true);
            if i % 500 == 0 {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        closing.cancel();
        let text = body_text(res).await;
        let seqs: Vec<u64> =
            text.lines().filter_map(ResidencyEvent::from_json_line).map(|e| e.seq).collect();
        assert_eq!(seqs.len(), 6_000);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a gap in the stream");
    }
}
