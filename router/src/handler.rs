//! Request handling: the generation routes of the OpenAI and Anthropic APIs (with retries),
//! stored responses by id, and the router's own routes.

use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::body::ResponseBody;
use crate::endpoint::EndpointId;
use crate::error::{json_response, ApiError};
use crate::metrics::{EndpointLabels, OutcomeLabels, ReasonLabels, RouteLabels};
use crate::models;
use crate::proxy::{self, Upstream, UpstreamError};
use crate::request::{self, Dialect, Route};
use crate::session::session_key;

/// The metrics listener's only route.
pub(crate) fn metrics_only(app: &App, req: &Request<Incoming>) -> Response<ResponseBody> {
    if req.uri().path() == "/metrics" {
        metrics_response(app)
    } else {
        ApiError::NotFound(req.uri().path().to_owned()).into_response()
    }
}

/// Serves one request of the API surface.
pub(crate) async fn handle(
    app: &App,
    upstream: &Upstream,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let path = req.uri().path();
    let generation = match path {
        "/v1/chat/completions" => Some(Route::Chat),
        "/v1/completions" => Some(Route::Completions),
        "/v1/messages" => Some(Route::Messages),
        "/v1/messages/count_tokens" => Some(Route::CountTokens),
        "/v1/responses" => Some(Route::Responses),
        _ => None,
    };
    let dialect = generation.map_or(Dialect::OpenAi, Route::dialect);
    let (route, result) = match (req.method(), generation, path) {
        (&Method::POST, Some(route), _) => {
            (route.label(), proxy(app, upstream, route, req, start).await)
        }
        (_, Some(_), _) => ("other", Err(ApiError::MethodNotAllowed("POST"))),
        (&Method::GET, None, "/v1/models") => ("models", models::list(app, upstream).await),
        (&Method::GET | &Method::HEAD, None, "/health") => {
            ("health", Ok(health_response(app, false)))
        }
        (&Method::GET | &Method::HEAD, None, "/ready") => ("ready", Ok(health_response(app, true))),
        (&Method::GET | &Method::HEAD, None, "/metrics") => ("metrics", Ok(metrics_response(app))),
        (_, None, "/v1/models") => ("other", Err(ApiError::MethodNotAllowed("GET"))),
        (_, None, "/health" | "/ready" | "/metrics") => {
            ("other", Err(ApiError::MethodNotAllowed("GET, HEAD")))
        }
        (_, None, other) => match stored_response_id(other) {
            Some(id) => {
                let id = id.to_owned();
                ("responses_by_id", stored_response(app, upstream, req, &id, start).await)
            }
            None => ("other", Err(ApiError::NotFound(other.to_owned()))),
        },
    };
    let (outcome, response) = match result {
        Ok(res) => (status_outcome(res.status()), res),
        Err(e) => {
            debug!(error = %e, route, "request refused");
            (e.metric_label(), e.into_response_for(dialect))
        }
    };
    app.metrics.requests.get_or_create(&OutcomeLabels { route, outcome }).inc();
    response
}

/// The response id of `/v1/responses/{id}` and of the routes under it (`/cancel`).
fn stored_response_id(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/v1/responses/")?.split('/').next()?;
    (!id.is_empty()).then_some(id)
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
    upstream: &Upstream,
    route: Route,
    req: Request<Incoming>,
    start: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(app, body, &parts.headers).await?;
    let view = request::parse(route, &body)?;
    let session = session_key(&parts.headers, &app.config.session.headers, view.user.as_deref());
    let conversation =
        crate::session::conversation_key(&parts.headers, &app.config.session.headers).or_else(
            || view.conversation.as_deref().map(kvtier_api::residency::ConversationKey::of_session),
        );
    let routing = app.dispatcher.prepare(&view, session.map(|(k, _)| k), conversation, start);
    // With tier-aware routing, the engine's connector learns the conversation (it tags the KV
    // it saves, and the node-agents report residency by it). vLLM's chat, completions,
    // messages and responses requests all take `kv_transfer_params`.
    let body = match (conversation, app.dispatcher.tiers()) {
        (Some(c), Some(_)) if route.generates() => {
            let hold = view
                .breakpoint
                .filter(|_| app.config.tiers.as_ref().is_some_and(|t| t.holds))
                .map(|b| kvtier_api::residency::Hold {
                    ttl_s: b.ttl_s,
                    upto: b.end as f64 / view.segments.len().max(1) as f64,
                });
            crate::tiers::tag_conversation(&body, c, hold).unwrap_or(body.clone())
        }
        _ => body.clone(),
    };
    let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let attempts = app.config.upstream.max_attempts.get();
    let stream = view.stream;
    let m = &app.metrics;
    let mut tried: Vec<EndpointId> = Vec::new();
    let mut last_error: Option<UpstreamError> = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            let backoff = app.config.upstream.retry_backoff * 2u32.saturating_pow(attempt - 1);
            tokio::time::sleep(backoff).await;
        }
        let Some((mut guard, decision)) = app.dispatcher.choose(&routing, &tried) else {
            break;
        };
        // A retry is counted when it happens, with what ended the attempt before it.
        if let Some(e) = &last_error {
            m.retries.get_or_create(&ReasonLabels { reason: retry_reason(e) }).inc();
        }
        let endpoint = guard.endpoint().clone();
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
        let sent = upstream
            .send(&endpoint, parts.method.clone(), path, &parts.headers, body.clone())
            .await;
        let unhealthy_after = app.config.health.unhealthy_after.get();
        // A streamed answer's head comes before prefill: hold it until the model's first
        // output, so that a replica failing before then is retried like any other failure.
        let sent = match sent {
            Ok(res) if stream && res.status().is_success() => {
                let limit = app.config.upstream.first_output_timeout;
                proxy::hold_until_output(res, route.first_output_markers(), limit).await
            }
            other => other.map(|res| (res, Vec::new())),
        };
        match sent {
            Ok((res, _)) if res.status().is_server_error() && attempt + 1 < attempts => {
                if endpoint.health.record_failure(unhealthy_after) {
                    warn!(endpoint = %endpoint.name, "endpoint unhealthy after repeated 5xx");
                }
                tried.push(endpoint.id);
                last_error = Some(UpstreamError::Status(res.status()));
            }
            Ok((res, held)) => {
                if res.status().is_server_error() {
                    endpoint.health.record_failure(unhealthy_after);
                } else if endpoint.health.record_success() {
                    info!(endpoint = %endpoint.name, "endpoint healthy again");
                }
                if res.status().is_success() && route.generates() {
                    app.dispatcher.record(&routing, &mut guard, Instant::now());
                    #[allow(clippy::cast_precision_loss)]
                    m.predicted_prefix_tokens.observe(decision.matched_tokens as f64);
                }
                let labels = RouteLabels { route: route.label() };
                let ttfb = m.time_to_first_byte.get_or_create(&labels).clone();
                let broken = m.broken_responses.get_or_create(&labels).clone();
                let learn = route == Route::Responses && res.status().is_success();
                let (mut head, incoming) = res.into_parts();
                head.headers.remove(header::CONNECTION);
                head.headers.remove("keep-alive");
                let body = ResponseBody::upstream(incoming, guard, start, ttfb)
                    .after(held)
                    .counting_breaks(broken);
                let body = if learn {
                    body.learning_response_id(app.dispatcher.response_owners().clone())
                } else {
                    body
                };
                return Ok(Response::from_parts(head, body));
            }
            Err(error) => {
                if error.endpoint_down() {
                    if endpoint.health.mark_down() {
                        warn!(endpoint = %endpoint.name, %error, "endpoint down");
                    }
                } else {
                    endpoint.health.record_failure(unhealthy_after);
                }
                debug!(endpoint = %endpoint.name, %error, attempt, "attempt failed");
                tried.push(endpoint.id);
                last_error = Some(error);
            }
        }
    }
    Err(last_error.map_or(ApiError::NoEndpoints, ApiError::Upstream))
}

/// The retry metric's reason for what ended an attempt.
fn retry_reason(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Status(s) if s.is_server_error() => "upstream_status_5xx",
        e => e.metric_label(),
    }
}

/// A request about a stored response (`GET`/`DELETE /v1/responses/{id}`, `POST …/cancel`):
/// sent to the endpoint that stored it; when the router does not know which (it restarted, or
/// forgot), to each endpoint in turn until one answers other than 404.
async fn stored_response(
    app: &App,
    upstream: &Upstream,
    req: Request<Incoming>,
    id: &str,
    start: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(app, body, &parts.headers).await?;
    let path = parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str());
    let owners = app.dispatcher.response_owners();
    let endpoints = app.dispatcher.endpoints();
    let owner = owners.owner(id).and_then(|o| endpoints.iter().find(|e| e.id == o));
    let asked: Vec<_> = match owner {
        Some(e) => vec![e.clone()],
        None => endpoints.iter().filter(|e| e.health.is_healthy()).cloned().collect(),
    };
    let mut last_error = None;
    for (i, endpoint) in asked.iter().enumerate() {
        match upstream
            .send(endpoint, parts.method.clone(), path, &parts.headers, body.clone())
            .await
        {
            Ok(res) if res.status() == StatusCode::NOT_FOUND && i + 1 < asked.len() => {}
            Ok(res) => {
                if res.status().is_success() {
                    owners.learn(id, endpoint.id);
                }
                let ttfb = app
                    .metrics
                    .time_to_first_byte
                    .get_or_create(&RouteLabels { route: "responses_by_id" })
                    .clone();
                let guard = crate::endpoint::LoadGuard::new(endpoint.clone(), 0, 0);
                let (mut head, incoming) = res.into_parts();
                head.headers.remove(header::CONNECTION);
                head.headers.remove("keep-alive");
                return Ok(Response::from_parts(
                    head,
                    ResponseBody::upstream(incoming, guard, start, ttfb),
                ));
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.map_or(ApiError::NoEndpoints, ApiError::Upstream))
}

/// `/health` (liveness: the router serves) and `/ready` (readiness: it serves and has an
/// endpoint believed healthy, else 503), both with the endpoint counts.
fn health_response(app: &App, readiness: bool) -> Response<ResponseBody> {
    let endpoints = app.dispatcher.endpoints();
    let healthy = endpoints.iter().filter(|e| e.health.is_healthy()).count();
    let ready = !readiness || healthy > 0;
    let body = serde_json::json!({
        "status": if ready { "ok" } else { "no healthy endpoint" },
        "endpoints": endpoints.len(),
        "healthy_endpoints": healthy,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, Bytes::from(body.to_string()))
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
    let (chunks, sessions) = app.dispatcher.sizes();
    m.index_chunks.set(i64::try_from(chunks).unwrap_or(i64::MAX));
    m.sessions.set(i64::try_from(sessions).unwrap_or(i64::MAX));
    let stored = app.dispatcher.response_owners().remembered();
    m.stored_responses.set(i64::try_from(stored).unwrap_or(i64::MAX));
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
