//! A router in front of stand-in engines, all on loopback, for the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kvtier_router::{EndpointSpec, RouterConfig, StaticDiscovery};
use kvtier_testkit::StubEngine;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct Stack {
    pub engines: Vec<StubEngine>,
    pub addr: SocketAddr,
    pub discovery: Arc<StaticDiscovery>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    shutdown: Option<oneshot::Sender<()>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn served_by(&self) -> Option<String> {
        self.headers.get("x-served-by").map(|v| v.to_str().unwrap().to_owned())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub fn spec(e: &StubEngine) -> EndpointSpec {
    EndpointSpec::parse(&e.url()).unwrap()
}

/// Another router in front of `engines` (a second replica, or a restarted one).
pub async fn router_over(engines: &[StubEngine], tweak: impl FnOnce(&mut RouterConfig)) -> Stack {
    let mut config = RouterConfig::new(engines.iter().map(spec).collect());
    tweak(&mut config);
    let discovery = Arc::new(StaticDiscovery::new(config.endpoints.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let d: Arc<dyn kvtier_router::Discovery> = discovery.clone();
    tokio::spawn(async move {
        kvtier_router::run(config, listener, None, d, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    Stack { engines: Vec::new(), addr, discovery, client, shutdown: Some(tx) }
}

/// `n` stand-ins named e0…, a router in front of them configured by `tweak`.
pub async fn stack(n: usize, tweak: impl FnOnce(&mut RouterConfig)) -> Stack {
    let mut engines = Vec::new();
    for i in 0..n {
        engines.push(StubEngine::start(&format!("e{i}")).await.unwrap());
    }
    let mut s = router_over(&engines, |config| {
        config.upstream.retry_backoff = std::time::Duration::from_millis(1);
        tweak(config);
    })
    .await;
    s.engines = engines;
    s
}

impl Stack {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> http::Response<hyper::body::Incoming> {
        let mut req = Request::new(Full::new(body.into()));
        *req.method_mut() = method;
        *req.uri_mut() = self.url(path).parse().unwrap();
        req.headers_mut().insert("content-type", "application/json".parse().unwrap());
        for (k, v) in headers {
            req.headers_mut().insert(http::HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        self.client.request(req).await.unwrap()
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let res = self.open(method, path, body, headers).await;
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Reply { status, headers, body }
    }

    pub async fn chat(&self, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::POST, "/v1/chat/completions", body, headers).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, Bytes::new(), &[]).await
    }

    /// Value of a metric line that starts with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self.get("/metrics").await.body;
        let text = String::from_utf8_lossy(&text).into_owned();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Deterministic filler text of `len` bytes, different for every `seed`.
pub fn text(seed: u64, len: usize) -> String {
    const WORDS: &[&str] = &[
        "fn",
        "let",
        "cargo",
        "test",
        "router",
        "endpoint",
        "the",
        "a",
        "chunk",
        "error",
        "read",
        "file",
        "src/lib.rs",
        "match",
        "=>",
        "Ok(())",
        "tool_result",
        "diff",
        "+",
        "-",
    ];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
        out.push(' ');
    }
    out.truncate(len);
    out
}

/// One agent conversation: a system prompt and the turns so far, rendered the way a client
/// resends them (append-only).
pub struct Conversation {
    pub id: u64,
    messages: Vec<String>,
}

impl Conversation {
    pub fn new(id: u64, system: &str) -> Self {
        Self { id, messages: vec![format!(r#"{{"role":"system","content":"{system}"}}"#)] }
    }

    /// Appends the next user turn and returns the request body.
    pub fn next_turn(&mut self, turn: u64) -> String {
        if turn > 0 {
            let reply = text(self.id * 1000 + turn + 500, 400);
            self.messages.push(format!(r#"{{"role":"assistant","content":"{reply}"}}"#));
        }
        let user = text(self.id * 1000 + turn, 3000);
        self.messages.push(format!(r#"{{"role":"user","content":"{user}"}}"#));
        format!(
            r#"{{"model":"stub-model","max_tokens":64,"messages":[{}]}}"#,
            self.messages.join(",")
        )
    }
}
