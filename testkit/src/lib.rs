//! Loopback stand-ins for tests and benchmarks.
//!
//! [`StubEngine`] answers the routes an engine serves (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/messages`, `/v1/responses`, `/v1/models`, `/health`) instantly (one
//! chat-shaped answer for all), records what it received, and can
//! be told to fail, to hold a stream open between chunks, or to die. It stands in for an
//! engine only where the engine's behaviour is not what is under test (the router's proxying,
//! stickiness and failover); the engine simulator models the engine itself.
//!
//! [`redis`] starts real `redis-server` processes (one server or a cluster) for the remote
//! tier.

pub mod bodies;
pub mod fuzz;
pub mod python;
pub mod redis;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path, with its query string.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body, byte for byte.
    pub body: Bytes,
}

#[derive(Debug)]
struct State {
    name: String,
    model: String,
    status: AtomicU16,
    healthy: AtomicBool,
    stream_chunks: AtomicU64,
    record: AtomicBool,
    received: Mutex<Vec<Received>>,
    /// When set, a stream sends one chunk per permit taken from here.
    gate: Mutex<Option<Arc<Semaphore>>>,
    served: AtomicU64,
}

/// A running stand-in engine on 127.0.0.1.
#[derive(Debug)]
pub struct StubEngine {
    addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    res
}

impl StubEngine {
    /// Starts a stand-in named `name` on an ephemeral port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(name: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(listener, name))
    }

    /// Starts a stand-in named `name` on `listener`.
    ///
    /// # Panics
    /// If the listener has no local address.
    #[must_use]
    pub fn serve(listener: TcpListener, name: &str) -> Self {
        let addr = listener.local_addr().expect("bound listener");
        let state = Arc::new(State {
            name: name.to_owned(),
            model: "stub-model".to_owned(),
            status: AtomicU16::new(200),
            healthy: AtomicBool::new(true),
            stream_chunks: AtomicU64::new(3),
            record: AtomicBool::new(true),
            received: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
            served: AtomicU64::new(0),
        });
        let st = state.clone();
        let service = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(handle(&st, req).await) }
        });
        // The connections belong to the server task, so aborting it kills them too: the
        // stand-in dies the way a crashed engine does.
        let server = tokio::spawn(async move {
            let stop = kvtier_serve::CancellationToken::new();
            kvtier_serve::run(listener, service, stop, kvtier_serve::Options::default()).await;
        });
        Self { addr, state, server }
    }

    /// `http://127.0.0.1:port`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far.
    ///
    /// # Panics
    /// If a handler panicked while recording.
    #[must_use]
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Completions served so far.
    #[must_use]
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// Answer completions with this status (200 by default).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::Relaxed);
    }

    /// Answer `/health` with 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Content chunks per streamed answer (3 by default).
    pub fn set_stream_chunks(&self, n: u64) {
        self.state.stream_chunks.store(n, Ordering::Relaxed);
    }

    /// Stop recording request bodies (benchmarks).
    pub fn set_record(&self, on: bool) {
        self.state.record.store(on, Ordering::Relaxed);
    }

    /// From now on, each streamed chunk waits for one permit of the returned semaphore.
    ///
    /// # Panics
    /// If the lock is poisoned.
    #[must_use]
    pub fn gate_streams(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.state.gate.lock().expect("lock") = Some(gate.clone());
        gate
    }

    /// Kills the server and every open connection, like a crashed engine.
    pub fn kill(&self) {
        self.server.abort();
    }
}

impl Drop for StubEngine {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(st: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let path_and_query = req.uri().path_and_query().map_or(path.clone(), |p| p.as_str().to_owned());
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => {
            if st.healthy.load(Ordering::Relaxed) {
                full(StatusCode::OK, "application/json", "{}")
            } else {
                full(StatusCode::SERVICE_UNAVAILABLE, "application/json", "{}")
            }
        }
        (Method::GET, "/v1/models") => full(
            StatusCode::OK,
            "application/json",
            format!(
                r#"{{"object":"list","data":[{{"id":"{}","object":"model","owned_by":"{}"}}]}}"#,
                st.model, st.name
            ),
        ),
        (
            Method::POST,
            "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/messages"
            | "/v1/responses"
            | "/generate",
        ) => {
            let headers = req.headers().clone();
            let Ok(body) = req.into_body().collect().await.map(http_body_util::Collected::to_bytes)
            else {
                return full(StatusCode::BAD_REQUEST, "application/json", "{}");
            };
            if st.record.load(Ordering::Relaxed) {
                st.received.lock().expect("lock").push(Received {
                    path: path_and_query,
                    headers,
                    body: body.clone(),
                });
            }
            let status = st.status.load(Ordering::Relaxed);
            if status != 200 {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return full(status, "application/json", r#"{"error":{"message":"stub failure"}}"#);
            }
            st.served.fetch_add(1, Ordering::Relaxed);
            let streamed =
                memfind(&body, br#""stream":true"#) || memfind(&body, br#""stream": true"#);
            let mut res = if streamed { stream_answer(st) } else { json_answer(st) };
            res.headers_mut().insert(
                "x-served-by",
                http::HeaderValue::from_str(&st.name)
                    .unwrap_or(http::HeaderValue::from_static("stub")),
            );
            res
        }
        // Peers probe these on their workers; an engine answers them.
        (Method::GET, _) => full(StatusCode::OK, "application/json", "{}"),
        _ => full(StatusCode::NOT_FOUND, "application/json", r#"{"error":{"message":"no route"}}"#),
    }
}

fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn json_answer(st: &State) -> Response<Body> {
    full(
        StatusCode::OK,
        "application/json",
        format!(
            concat!(
                r#"{{"id":"cmpl-stub","object":"chat.completion","model":"{}","served_by":"{}","#,
                r#""choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"#,
                r#""usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}"#
            ),
            st.model, st.name
        ),
    )
}

fn stream_answer(st: &State) -> Response<Body> {
    let chunks = st.stream_chunks.load(Ordering::Relaxed);
    let gate = st.gate.lock().expect("lock").clone();
    let name = st.name.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for i in 0..chunks {
            if let Some(g) = &gate {
                match g.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            let line = format!(
                "data: {{\"id\":\"cmpl-stub\",\"served_by\":\"{name}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            );
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let body = StreamBody::new(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    let mut res = Response::new(BodyExt::boxed(body));
    res.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    res
}
