//! The replay's HTTP side: one client for every user, the endpoint's model, and one streamed
//! request measured into its record.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::{lock, Ctx, HttpClient, Record, ReplayError};
use crate::sse::SseUsage;

pub(super) fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(http)
}

/// Lists the endpoint's first model.
///
/// # Errors
/// When the endpoint does not answer with a model list.
pub async fn first_model(endpoint: &str) -> Result<String, ReplayError> {
    let err = |reason: String| ReplayError::Models { endpoint: endpoint.to_owned(), reason };
    let uri: http::Uri =
        format!("{endpoint}/v1/models").parse().map_err(|e| err(format!("{e}")))?;
    let req = Request::get(uri).body(Full::new(Bytes::new())).map_err(|e| err(e.to_string()))?;
    let res = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .map_err(|_| err("no answer in 10 s".into()))?
        .map_err(|e| err(e.to_string()))?;
    let status = res.status();
    let body = res.into_body().collect().await.map_err(|e| err(e.to_string()))?.to_bytes();
    if !status.is_success() {
        return Err(err(format!("status {status}")));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| err(e.to_string()))?;
    v["data"][0]["id"].as_str().map(str::to_owned).ok_or_else(|| err("empty model list".into()))
}

/// Sends one request and measures it into `record`.
pub(super) async fn send(ctx: &Ctx, session: &str, body: Vec<u8>, record: &mut Record) {
    use std::sync::atomic::Ordering::Relaxed;
    ctx.in_flight.fetch_add(1, Relaxed);
    record.start = ctx.now();
    let serial = ctx.serial.fetch_add(1, Relaxed);
    lock(&ctx.waiting).insert(serial, record.start);
    let outcome = tokio::time::timeout(
        ctx.real(ctx.opts.request_timeout),
        exchange(ctx, session, body, record, serial),
    )
    .await;
    lock(&ctx.waiting).remove(&serial);
    match outcome {
        Ok(Ok(())) => record.success = true,
        Ok(Err(e)) => record.error = Some(e),
        Err(_) => record.error = Some(format!("no answer within {} s", ctx.opts.request_timeout)),
    }
    record.end = ctx.now();
    ctx.in_flight.fetch_sub(1, Relaxed);
}

async fn exchange(
    ctx: &Ctx,
    session: &str,
    body: Vec<u8>,
    record: &mut Record,
    serial: u64,
) -> Result<(), String> {
    let uri: http::Uri = format!("{}{}", ctx.opts.endpoint, ctx.opts.api.path())
        .parse()
        .map_err(|e| format!("bad endpoint: {e}"))?;
    let mut req = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
    if ctx.opts.session_header {
        req = req.header("x-session-id", session);
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let res = ctx.client.request(req).await.map_err(|e| format!("request failed: {e}"))?;
    let status = res.status();
    let mut body = res.into_body();
    if !status.is_success() {
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(format!("status {}: {text}", status.as_u16()));
    }
    let mut sse = SseUsage::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream broke: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if record.first_token.is_none() && data.windows(6).any(|w| w == b"data: ") {
                record.first_token = Some(ctx.now());
                lock(&ctx.waiting).remove(&serial);
            }
            sse.feed(data);
        }
    }
    if !sse.done {
        return Err("stream ended before its last event".into());
    }
    record.output_tokens_actual = sse.completion_tokens.unwrap_or(sse.content_chunks);
    record.prompt_tokens = sse.prompt_tokens;
    record.cached_tokens = sse.cached_tokens;
    Ok(())
}
