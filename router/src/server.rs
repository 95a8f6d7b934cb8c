//! The HTTP front: accept loop, request handling, retries, and the router's own endpoints.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::body::ResponseBody;
use crate::config::RouterConfig;
use crate::discovery::Discovery;
use crate::dispatch::Dispatcher;
use crate::endpoint::{EndpointId, LoadGuard};
use crate::error::{json_response, ApiError};
use crate::metrics::{EndpointLabels, Metrics, OutcomeLabels, ReasonLabels, RouteLabels};
use crate::proxy::{Upstream, UpstreamError};
use crate::request::{self, Route};
use crate::session::session_key;
use crate::{health, models};

/// Time allowed for in-flight responses to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest read buffer per connection. Big enough that an agent request that is already in
/// the socket buffer arrives in one read, as one frame, which the router then uses in place
/// instead of concatenating frames.
const READ_BUFFER_BYTES: usize = 4 << 20;

/// Everything a request handler needs, shared by all connections.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) config: RouterConfig,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) upstream: Upstream,
    metrics: Metrics,
    registry: Registry,
}

/// Runs the router on `listener` (and `/metrics` also on `metrics_listener`) until
/// `shutdown` completes, then drains in-flight responses.
///
/// # Errors
/// When accepting connections fails in a way that is not per-connection.
pub async fn run(
    config: RouterConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    discovery: Arc<dyn Discovery>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let app = Arc::new(App {
        dispatcher: Dispatcher::new(&config),
        upstream: Upstream::new(&config.upstream),
        metrics,
        registry,
        config,
    });
    let mut tasks = JoinSet::new();
    let mut endpoints_rx = discovery.subscribe();
    let initial = endpoints_rx.borrow_and_update().clone();
    apply_endpoints(&app, &initial);
    {
        let app = app.clone();
        tasks.spawn(async move {
            while endpoints_rx.changed().await.is_ok() {
                let specs = endpoints_rx.borrow_and_update().clone();
                apply_endpoints(&app, &specs);
            }
        });
    }
    tasks.spawn(health::run(app.clone()));
    {
        let app = app.clone();
        let every = (app.config.session.idle_ttl / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                app.dispatcher.sweep(Instant::now());
            }
        });
    }
    if let Some(l) = metrics_listener {
        info!(addr = %l.local_addr()?, "serving metrics");
        let app = app.clone();
        tasks.spawn(async move {
            let graceful = GracefulShutdown::new();
            serve(l, &app, &graceful, true, std::future::pending()).await;
        });
    }
    info!(addr = %listener.local_addr()?, policy = app.config.policy.label(), "router listening");
    let graceful = GracefulShutdown::new();
    serve(listener, &app, &graceful, false, shutdown).await;
    tasks.abort_all();
    info!("draining in-flight responses");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        warn!("responses still in flight after the drain timeout were cut");
    }
    Ok(())
}

fn apply_endpoints(app: &App, specs: &[crate::endpoint::EndpointSpec]) {
    let change = app.dispatcher.set_endpoints(specs);
    for e in &change.added {
        info!(endpoint = %e.name, id = %e.id, "endpoint added");
    }
    for e in &change.removed {
        info!(endpoint = %e.name, id = %e.id, "endpoint removed");
        let labels = EndpointLabels { endpoint: e.name.clone() };
        app.metrics.in_flight_requests.remove(&labels);
        app.metrics.in_flight_tokens.remove(&labels);
        app.metrics.endpoint_healthy.remove(&labels);
    }
}

async fn serve(
    listener: TcpListener,
    app: &Arc<App>,
    graceful: &GracefulShutdown,
    metrics_only: bool,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Per-connection failures (e.g. EMFILE) must not stop the router.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "TCP_NODELAY not set");
        }
        let header_timeout = app.config.client.header_timeout;
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move {
                Ok::<_, Infallible>(if metrics_only {
                    metrics_only_handler(&app, &req)
                } else {
                    handle(&app, req).await
                })
            }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(READ_BUFFER_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

fn metrics_only_handler(app: &App, req: &Request<Incoming>) -> Response<ResponseBody> {
    if req.uri().path() == "/metrics" {
        metrics_response(app)
    } else {
        ApiError::NotFound(req.uri().path().to_owned()).into_response()
    }
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<ResponseBody> {
    let start = Instant::now();
    let path = req.uri().path();
    let (route, result) = match (req.method(), path) {
        (&Method::POST, "/v1/chat/completions") => {
            ("chat_completions", proxy(app, Route::Chat, req, start).await)
        }
        (&Method::POST, "/v1/completions") => {
            ("completions", proxy(app, Route::Completions, req, start).await)
        }
        (&Method::GET, "/v1/models") => ("models", models::list(app).await),
        (&Method::GET, "/health") => ("health", Ok(health_response(app))),
        (&Method::GET, "/metrics") => ("metrics", Ok(metrics_response(app))),
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics") => {
            ("other", Err(ApiError::MethodNotAllowed))
        }
        (_, other) => ("other", Err(ApiError::NotFound(other.to_owned()))),
    };
    let (outcome, response) = match result {
        Ok(res) => (status_outcome(res.status()), res),
        Err(e) => {
            debug!(error = %e, route, "request refused");
            (e.metric_label(), e.into_response())
        }
    };
    app.metrics.requests.get_or_create(&OutcomeLabels { route, outcome }).inc();
    response
}

fn status_outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        400..=499 => "upstream_status_4xx",
        500..=599 => "upstream_status_5xx",
        _ => "upstream_status_other",
    }
}

async fn read_body(app: &App, body: Incoming, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    let limit = app.config.client.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(app.config.client.body_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::BodyTimeout(app.config.client.body_timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => match e.downcast::<hyper::Error>() {
            Ok(e) => Err(ApiError::ReadBody(*e)),
            Err(_) => Err(ApiError::BodyTooLarge { limit }),
        },
    }
}

async fn proxy(
    app: &App,
    route: Route,
    req: Request<Incoming>,
    start: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(app, body, &parts.headers).await?;
    let view = request::parse(route, &body)?;
    let session = session_key(&parts.headers, &app.config.session.headers, view.user.as_deref());
    let routing = app.dispatcher.prepare(&view, session.map(|(k, _)| k), start);
    let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let attempts = app.config.upstream.max_attempts.get();
    let mut tried: Vec<EndpointId> = Vec::new();
    let mut last_error = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            let backoff = app.config.upstream.retry_backoff * 2u32.saturating_pow(attempt - 1);
            tokio::time::sleep(backoff).await;
        }
        let Some((endpoint, decision)) = app.dispatcher.choose(&routing, &tried) else { break };
        let m = &app.metrics;
        m.decisions.get_or_create(&ReasonLabels { reason: decision.reason.label() }).inc();
        if let Some(moved) = decision.moved {
            m.moves.get_or_create(&ReasonLabels { reason: moved.label() }).inc();
        }
        debug!(
            endpoint = %endpoint.name,
            reason = decision.reason.label(),
            matched_tokens = decision.matched_tokens,
            attempt,
            "routed"
        );
        let guard = LoadGuard::new(
            endpoint.clone(),
            decision.uncached_tokens,
            routing.expected_output_tokens,
        );
        let sent = app
            .upstream
            .send(&endpoint, parts.method.clone(), path, &parts.headers, body.clone())
            .await;
        let unhealthy_after = app.config.health.unhealthy_after.get();
        match sent {
            Ok(res) if res.status().is_server_error() && attempt + 1 < attempts => {
                if endpoint.health.record_failure(unhealthy_after) {
                    warn!(endpoint = %endpoint.name, "endpoint unhealthy after repeated 5xx");
                }
                m.retries.get_or_create(&ReasonLabels { reason: "upstream_status_5xx" }).inc();
                tried.push(endpoint.id);
                last_error = None;
            }
            Ok(res) => {
                if res.status().is_server_error() {
                    endpoint.health.record_failure(unhealthy_after);
                } else if endpoint.health.record_success() {
                    info!(endpoint = %endpoint.name, "endpoint healthy again");
                }
                if res.status().is_success() {
                    app.dispatcher.record(&routing, endpoint.id, Instant::now());
                    #[allow(clippy::cast_precision_loss)]
                    m.predicted_prefix_tokens.observe(decision.matched_tokens as f64);
                }
                let ttfb = m
                    .time_to_first_byte
                    .get_or_create(&RouteLabels { route: route.label() })
                    .clone();
                let (mut head, incoming) = res.into_parts();
                head.headers.remove(header::CONNECTION);
                head.headers.remove("keep-alive");
                return Ok(Response::from_parts(
                    head,
                    ResponseBody::upstream(incoming, guard, start, ttfb),
                ));
            }
            Err(error) => {
                if error.endpoint_down() {
                    if endpoint.health.mark_down() {
                        warn!(endpoint = %endpoint.name, %error, "endpoint down");
                    }
                } else {
                    endpoint.health.record_failure(unhealthy_after);
                }
                if attempt + 1 < attempts {
                    m.retries.get_or_create(&ReasonLabels { reason: error.metric_label() }).inc();
                }
                tried.push(endpoint.id);
                last_error = Some(error);
            }
        }
    }
    Err(match last_error {
        Some(e) => ApiError::Upstream(e),
        None if tried.is_empty() => ApiError::NoEndpoints,
        None => ApiError::Upstream(UpstreamError::Status(StatusCode::BAD_GATEWAY)),
    })
}

fn health_response(app: &App) -> Response<ResponseBody> {
    let endpoints = app.dispatcher.endpoints();
    let healthy = endpoints.iter().filter(|e| e.health.is_healthy()).count();
    let body = serde_json::json!({
        "status": "ok",
        "endpoints": endpoints.len(),
        "healthy_endpoints": healthy,
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

fn metrics_response(app: &App) -> Response<ResponseBody> {
    let m = &app.metrics;
    for e in app.dispatcher.endpoints().iter() {
        let labels = EndpointLabels { endpoint: e.name.clone() };
        m.in_flight_requests
            .get_or_create(&labels)
            .set(i64::try_from(e.load.requests()).unwrap_or(i64::MAX));
        m.in_flight_tokens
            .get_or_create(&labels)
            .set(i64::try_from(e.load.tokens()).unwrap_or(i64::MAX));
        m.endpoint_healthy.get_or_create(&labels).set(i64::from(e.health.is_healthy()));
    }
    let (chunks, sessions) = app.dispatcher.sweep(Instant::now());
    m.index_chunks.set(i64::try_from(chunks).unwrap_or(i64::MAX));
    m.sessions.set(i64::try_from(sessions).unwrap_or(i64::MAX));
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &app.registry) {
        warn!(%error, "encoding metrics failed");
    }
    let mut res = Response::new(ResponseBody::full(Bytes::from(text)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    res
}
