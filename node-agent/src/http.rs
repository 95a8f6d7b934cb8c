//! The agent's HTTP side: `GET /metrics` (Prometheus text) and `GET /residency` (residency
//! events, one JSON object per line).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::agent::{Agent, OPS};

impl Agent {
    /// The agent's figures in Prometheus' text format.
    #[must_use]
    pub fn metrics_text(&self) -> String {
        let s = self.stats();
        let slot = u64::from(self.pool().slot_bytes());
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
            &tiers(self.pool().bytes(), nvme.map(|n| n.0)),
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
            &[("", u64::from(self.pool().locked()))],
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

/// Serves HTTP on `listener` until the task is dropped, with the control routes open to
/// whoever reaches the port (see [`serve`]).
pub async fn serve_metrics(listener: tokio::net::TcpListener, agent: Arc<Agent>) {
    serve(listener, agent, None).await;
}

/// Serves HTTP on `listener` until the task is dropped: `GET /metrics` (Prometheus text, open
/// to anyone), and the control routes the router uses, which need `Authorization: Bearer
/// <control_token>` when a token is given: `GET /residency` (residency events, one JSON object
/// per line: the current residency as `entered` events, then every change, for as long as the
/// client stays; it names every conversation on the node) and `POST /prefetch/…`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    control_token: Option<String>,
) {
    let token: Option<Arc<str>> = control_token.map(Into::into);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let agent = agent.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let agent = agent.clone();
                    let token = token.clone();
                    async move {
                        if req.uri().path() != "/metrics" && !authorized(&req, token.as_deref()) {
                            let mut res = hyper::Response::new(http_body_util::BodyExt::boxed(
                                http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"the control routes need the agent's control token\n",
                                )),
                            ));
                            *res.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                            res.headers_mut().insert(
                                hyper::header::WWW_AUTHENTICATE,
                                hyper::header::HeaderValue::from_static("Bearer"),
                            );
                            return Ok::<_, std::convert::Infallible>(res);
                        }
                        if req.method() == hyper::Method::POST {
                            return Ok::<_, std::convert::Infallible>(prefetch(agent, &req).await);
                        }
                        Ok(http_route(&agent, &req))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// Whether `req` carries the control token (always, when there is none).
fn authorized(req: &hyper::Request<hyper::body::Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    // Compared in constant time: the comparison says nothing of how much matched.
    given.len() == token.len()
        && given.iter().zip(token.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// `POST /prefetch/CONVERSATION` (the key in hex): brings the conversation's NVMe chunks
/// into DRAM, at most as many as the pool holds; answers how many of its chunks are in DRAM
/// afterwards (`{"dram_chunks": N}`).
async fn prefetch(
    agent: Arc<Agent>,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HttpBody> {
    use http_body_util::{BodyExt, Full};
    let reply = |status: hyper::StatusCode, body: String| {
        let mut res = hyper::Response::new(Full::new(bytes::Bytes::from(body)).boxed());
        *res.status_mut() = status;
        res
    };
    let key = req
        .uri()
        .path()
        .strip_prefix("/prefetch/")
        .and_then(kvtier_api::residency::ConversationKey::from_hex);
    let Some(key) = key else {
        return reply(hyper::StatusCode::NOT_FOUND, "POST /prefetch/<conversation hex>\n".into());
    };
    let n =
        tokio::task::spawn_blocking(move || agent.prefetch_conversation(key.0)).await.unwrap_or(0);
    reply(hyper::StatusCode::OK, format!("{{\"dram_chunks\":{n}}}\n"))
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
