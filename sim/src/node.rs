//! What a simulated replica serves as its node's agent would: the node tiers' residency
//! stream and prefetch, and the conversation a request's KV is attributed to.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::server::{error, json, Body, Shared};

/// The host tiers' residency events, one JSON object per line, as the node-agent streams them.
pub(crate) fn residency(st: &Arc<Shared>) -> Response<Body> {
    let (now, rx) = st.tiers.subscribe();
    let (tx, out) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        for e in now {
            if tx.send(e.to_json_line().into()).is_err() {
                return;
            }
        }
        let mut rx = rx;
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if tx.send(e.to_json_line().into()).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let frames = UnboundedReceiverStream::new(out).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut res = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    res
}

/// `POST /prefetch/CONVERSATION`: the node-agent's prefetch. The blocks move from NVMe to DRAM
/// after the time reading them takes at the profile's NVMe bandwidth (simulated).
pub(crate) async fn prefetch(st: &Arc<Shared>, path: &str) -> Response<Body> {
    let Some(key) =
        path.strip_prefix("/prefetch/").and_then(kvtier_api::residency::ConversationKey::from_hex)
    else {
        return error(StatusCode::NOT_FOUND, "POST /prefetch/<conversation hex>");
    };
    let blocks = st.tiers.nvme_blocks_of(key.0);
    let c = &st.config.cost;
    let seconds = blocks.len() as f64 * c.block_bytes / c.nvme_bytes_per_s;
    tokio::time::sleep(std::time::Duration::from_secs_f64(seconds / st.clock.scale())).await;
    let moved = st.tiers.promote(&blocks, key.0);
    json(StatusCode::OK, format!("{{\"dram_chunks\":{moved}}}\n"))
}

/// The conversation a request belongs to, from its session header.
pub(crate) fn conversation_of(req: &Request<Incoming>) -> u64 {
    ["x-session-id", "x-claude-code-session-id"]
        .iter()
        .find_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()))
        .map_or(0, |s| kvtier_api::residency::ConversationKey::of_session(s).0)
}
