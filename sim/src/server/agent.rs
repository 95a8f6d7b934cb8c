//! The agents' APIs as vLLM serves them: Anthropic Messages (`/v1/messages`, Claude Code) and
//! OpenAI Responses (`/v1/responses`, Codex), whole and streamed, and the responses an engine
//! stores (`store`, `previous_response_id`, `GET /v1/responses/{id}`): in this engine's memory
//! only, as in vLLM.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{error, json as json_response, AbortOnDrop, Api, Body, Meta};
use crate::driver::Update;
use crate::state::Shared;
use crate::sync::lock;

/// `GET /v1/responses/{id}`.
pub(super) fn get_stored(st: &Shared, id: &str) -> Response<Body> {
    match lock(&st.responses).get(id) {
        Some(v) => json_response(StatusCode::OK, v.to_string()),
        None => error(StatusCode::NOT_FOUND, &format!("Response with id '{id}' not found.")),
    }
}

/// `{"input_tokens": n}` for `/v1/messages/count_tokens`.
pub(super) fn count_tokens(tokens: u32) -> Response<Body> {
    json_response(StatusCode::OK, json!({ "input_tokens": tokens }).to_string())
}

fn text_of(n: u32) -> String {
    super::text_of(n)
}

/// Anthropic's `stop_reason`.
fn stop_reason(meta: &Meta) -> &'static str {
    if meta.stopped {
        "end_turn"
    } else {
        "max_tokens"
    }
}

fn message(meta: &Meta, generated: u32, cached: u64, done: bool) -> Value {
    json!({
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": if done { json!([{ "type": "text", "text": text_of(generated) }]) } else { json!([]) },
        "stop_reason": if done { json!(stop_reason(meta)) } else { Value::Null },
        "stop_sequence": null,
        "usage": {
            "input_tokens": u64::from(meta.prompt_tokens).saturating_sub(cached),
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": generated,
        },
    })
}

fn item_id(meta: &Meta) -> String {
    format!("msg_{}", meta.id)
}

/// The answer's output item: in progress and empty, or done with `generated` tokens of text.
fn output_item(meta: &Meta, generated: Option<u32>) -> Value {
    json!({
        "type": "message",
        "id": item_id(meta),
        "status": if generated.is_some() { "completed" } else { "in_progress" },
        "role": "assistant",
        "content": match generated {
            Some(n) => json!([{ "type": "output_text", "text": text_of(n), "annotations": [] }]),
            None => json!([]),
        },
    })
}

fn response(meta: &Meta, generated: u32, cached: u64, done: bool) -> Value {
    let output = if done { json!([output_item(meta, Some(generated))]) } else { json!([]) };
    json!({
        "id": meta.id,
        "object": "response",
        "created_at": meta.created,
        "status": match (done, meta.stopped) {
            (false, _) => "in_progress",
            (true, true) => "completed",
            (true, false) => "incomplete",
        },
        "incomplete_details": if done && !meta.stopped {
            json!({ "reason": "max_output_tokens" })
        } else {
            Value::Null
        },
        "model": meta.model,
        "output": output,
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "usage": if done { json!({
            "input_tokens": meta.prompt_tokens,
            "input_tokens_details": { "cached_tokens": cached },
            "output_tokens": generated,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": u64::from(meta.prompt_tokens) + u64::from(generated),
        }) } else { Value::Null },
    })
}

/// The finished body of a Messages or Responses request; a response is stored when `store`.
pub(super) fn whole(
    st: &Shared,
    meta: &Meta,
    generated: u32,
    cached: u64,
    store: bool,
) -> Response<Body> {
    let body = match meta.api {
        Api::Messages => message(meta, generated, cached, true),
        _ => {
            let r = response(meta, generated, cached, true);
            if store {
                lock(&st.responses).put(meta.id.clone(), r.clone());
            }
            r
        }
    };
    json_response(StatusCode::OK, body.to_string())
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// One Responses API event: its type and sequence number, the item and content indices of the
/// answer's text where the event is about them, and `fields`.
fn responses_event(meta: &Meta, name: &str, seq: u64, fields: Value) -> String {
    let mut data = json!({ "type": name, "sequence_number": seq });
    if name.starts_with("response.output_text") || name.starts_with("response.content_part") {
        data["item_id"] = item_id(meta).into();
        data["output_index"] = 0.into();
        data["content_index"] = 0.into();
    }
    if let (Value::Object(d), Value::Object(f)) = (&mut data, fields) {
        d.extend(f);
    }
    event(name, &data)
}

/// The server-sent events of a Messages or Responses request, as the engine produces them.
pub(super) fn stream(
    st: std::sync::Arc<Shared>,
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Update>,
    guard: AbortOnDrop,
    store: bool,
) -> Response<Body> {
    let mut state = (0u32, 0u64, Some(guard), 0u64);
    let frames = UnboundedReceiverStream::new(rx).map(move |u| {
        let (generated, cached, guard, seq) = &mut state;
        let mut next = || {
            *seq += 1;
            *seq - 1
        };
        let out = match (meta.api, u) {
            (Api::Messages, Update::First { cached: c }) => {
                *cached = c;
                event(
                    "message_start",
                    &json!({
                        "type": "message_start", "message": message(&meta, 0, c, false),
                    }),
                ) + &event(
                    "content_block_start",
                    &json!({
                        "type": "content_block_start", "index": 0,
                        "content_block": { "type": "text", "text": "" },
                    }),
                )
            }
            (Api::Messages, Update::Tokens(n)) => {
                *generated += n;
                event(
                    "content_block_delta",
                    &json!({
                        "type": "content_block_delta", "index": 0,
                        "delta": { "type": "text_delta", "text": text_of(n) },
                    }),
                )
            }
            (Api::Messages, Update::Done) => {
                if let Some(mut g) = guard.take() {
                    g.armed = false;
                }
                event("content_block_stop", &json!({ "type": "content_block_stop", "index": 0 }))
                    + &event(
                        "message_delta",
                        &json!({
                            "type": "message_delta",
                            "delta": { "stop_reason": stop_reason(&meta), "stop_sequence": null },
                            "usage": { "output_tokens": *generated },
                        }),
                    )
                    + &event("message_stop", &json!({ "type": "message_stop" }))
            }
            (_, Update::First { cached: c }) => {
                *cached = c;
                let started = response(&meta, 0, c, false);
                let part = json!({ "type": "output_text", "text": "", "annotations": [] });
                [
                    ("response.created", json!({ "response": started })),
                    ("response.in_progress", json!({ "response": started })),
                    (
                        "response.output_item.added",
                        json!({ "output_index": 0, "item": output_item(&meta, None) }),
                    ),
                    ("response.content_part.added", json!({ "part": part })),
                ]
                .into_iter()
                .map(|(name, fields)| responses_event(&meta, name, next(), fields))
                .collect()
            }
            (_, Update::Tokens(n)) => {
                *generated += n;
                let delta = json!({ "delta": text_of(n) });
                responses_event(&meta, "response.output_text.delta", next(), delta)
            }
            (_, Update::Done) => {
                if let Some(mut g) = guard.take() {
                    g.armed = false;
                }
                let done = response(&meta, *generated, *cached, true);
                if store {
                    lock(&st.responses).put(meta.id.clone(), done.clone());
                }
                let text = text_of(*generated);
                let part = json!({ "type": "output_text", "text": text, "annotations": [] });
                let item = output_item(&meta, Some(*generated));
                let last = if meta.stopped { "response.completed" } else { "response.incomplete" };
                [
                    ("response.output_text.done", json!({ "text": text })),
                    ("response.content_part.done", json!({ "part": part })),
                    ("response.output_item.done", json!({ "output_index": 0, "item": item })),
                    (last, json!({ "response": done })),
                ]
                .into_iter()
                .map(|(name, fields)| responses_event(&meta, name, next(), fields))
                .collect()
            }
        };
        Ok::<_, Infallible>(Frame::data(Bytes::from(out)))
    });
    let mut res = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    res.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    res
}
