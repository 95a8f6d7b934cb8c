//! OpenAI's chat completions and completions bodies as vLLM sends them, whole and streamed.

use std::convert::Infallible;
use std::fmt::Write as _;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{json, text_of, AbortOnDrop, Api, Body, Meta};
use crate::driver::Update;

/// OpenAI's `usage`, with the cached prompt tokens vLLM reports.
fn usage(meta: &Meta, completion: u32, cached: u64) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": u64::from(meta.prompt_tokens) + u64::from(completion),
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

/// A finished chat or completions body.
pub(super) fn whole_response(meta: &Meta, generated: u32, cached: u64) -> Response<Body> {
    let choice = if meta.api == Api::Chat {
        serde_json::json!({
            "index": 0,
            "message": { "role": "assistant", "content": text_of(generated) },
            "finish_reason": meta.finish_reason(),
        })
    } else {
        serde_json::json!({
            "index": 0, "text": text_of(generated), "finish_reason": meta.finish_reason(),
        })
    };
    let body = serde_json::json!({
        "id": meta.id,
        "object": if meta.api == Api::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage(meta, generated, cached),
    });
    json(StatusCode::OK, body.to_string())
}

/// A streamed chat or completions body: OpenAI's server-sent events, the usage chunk when
/// asked for, then `[DONE]`.
pub(super) fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Update>,
    guard: AbortOnDrop,
    include_usage: bool,
) -> Response<Body> {
    let object = if meta.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |meta: &Meta, choice: serde_json::Value| -> Bytes {
        let v = serde_json::json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": [choice],
        });
        Bytes::from(format!("data: {v}\n\n"))
    };
    let delta = |meta: &Meta, text: String, finish: Option<&str>| -> serde_json::Value {
        if meta.api == Api::Chat {
            serde_json::json!({ "index": 0, "delta": { "content": text }, "finish_reason": finish })
        } else {
            serde_json::json!({ "index": 0, "text": text, "finish_reason": finish })
        }
    };
    let mut state = (0u32, 0u64, Some(guard));
    let frames = UnboundedReceiverStream::new(rx).map(move |u| {
        let bytes = match u {
            Update::First { cached } => {
                state.1 = cached;
                if meta.api == Api::Chat {
                    chunk(
                        &meta,
                        serde_json::json!({
                            "index": 0,
                            "delta": { "role": "assistant", "content": "" },
                            "finish_reason": null,
                        }),
                    )
                } else {
                    Bytes::new()
                }
            }
            Update::Tokens(n) => {
                state.0 += n;
                chunk(&meta, delta(&meta, text_of(n), None))
            }
            Update::Done => {
                if let Some(mut g) = state.2.take() {
                    g.armed = false;
                }
                let mut out = String::from_utf8_lossy(&chunk(
                    &meta,
                    delta(&meta, String::new(), Some(meta.finish_reason())),
                ))
                .into_owned();
                if include_usage {
                    let v = serde_json::json!({
                        "id": meta.id, "object": object, "created": meta.created,
                        "model": meta.model, "choices": [],
                        "usage": usage(&meta, state.0, state.1),
                    });
                    let _ = write!(out, "data: {v}\n\n");
                }
                out.push_str("data: [DONE]\n\n");
                Bytes::from(out)
            }
        };
        Ok::<_, Infallible>(Frame::data(bytes))
    });
    let mut res = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    res.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    res
}
