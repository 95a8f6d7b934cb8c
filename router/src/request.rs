//! What the router reads from a request body (OpenAI chat/completions/responses, Anthropic
//! messages), without ever re-serialising it.
//!
//! The body is scanned once ([`crate::scan`]): all of it is validated as JSON, and the fields
//! that matter for routing are kept as slices of the received bytes, in the order the
//! engine's chat template renders them (tools, then the system prompt or instructions, then
//! each message or input item). Anthropic `cache_control` markers are left out of those
//! slices: an agent moves its breakpoint to the newest message every turn, and the engine
//! never renders it, so a message hashes the same with and without one. The body forwarded
//! to the endpoint is the received `Bytes`, untouched.

use std::ops::Range;

use kvtier_api::prefix::Segments;

use crate::scan::{scan, scan_noting, ScanError};

/// The generation routes the router proxies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/messages` (Anthropic; Claude Code)
    Messages,
    /// `POST /v1/messages/count_tokens` (Anthropic)
    CountTokens,
    /// `POST /v1/responses` (OpenAI Responses; Codex)
    Responses,
}

/// Which API's error shape a route answers in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dialect {
    /// `{"error":{"message","type","param","code"}}`
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`
    Anthropic,
}

impl Route {
    /// What in a streamed response shows the model's first output (the engine sends its
    /// head, and some events, before prefill): a non-empty `choices` for OpenAI's chat and
    /// completions, a content block for Anthropic's, an output event for Responses.
    /// Each is given compact and with the space some servers put after the colon.
    #[must_use]
    pub fn first_output_markers(self) -> [&'static [u8]; 2] {
        match self {
            Route::Chat | Route::Completions => [b"\"choices\":[{", b"\"choices\": [{"],
            Route::Messages | Route::CountTokens => {
                [b"\"type\":\"content_block_", b"\"type\": \"content_block_"]
            }
            Route::Responses => [b"\"type\":\"response.output_", b"\"type\": \"response.output_"],
        }
    }

    /// Fixed metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat_completions",
            Route::Completions => "completions",
            Route::Messages => "messages",
            Route::CountTokens => "messages_count_tokens",
            Route::Responses => "responses",
        }
    }

    /// The error shape its clients expect.
    #[must_use]
    pub fn dialect(self) -> Dialect {
        match self {
            Route::Messages | Route::CountTokens => Dialect::Anthropic,
            Route::Chat | Route::Completions | Route::Responses => Dialect::OpenAi,
        }
    }

    /// Whether the engine computes (and caches) the prompt's KV: a token count does not.
    #[must_use]
    pub fn generates(self) -> bool {
        self != Route::CountTokens
    }
}

/// A request body that cannot be routed, with the reason the client is told.
#[derive(Debug, thiserror::Error)]
pub enum InvalidBody {
    /// Not JSON, or not well-formed.
    #[error("request body is not valid JSON: {0}")]
    Json(#[source] ScanError),
    /// A required field is absent.
    #[error("`{0}` is required")]
    Missing(&'static str),
    /// A routed field appears more than once, so it is ambiguous which one the engine uses.
    #[error("`{0}` appears more than once")]
    Duplicate(&'static str),
    /// A field has the wrong JSON type or shape.
    #[error("`{field}` must be {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

impl InvalidBody {
    /// The field the error is about, for OpenAI's `param`.
    #[must_use]
    pub fn param(&self) -> Option<&'static str> {
        match self {
            InvalidBody::Json(_) => None,
            InvalidBody::Missing(f)
            | InvalidBody::Duplicate(f)
            | InvalidBody::WrongType { field: f, .. } => Some(f),
        }
    }
}

/// The routing view of one request, borrowing from its body.
#[derive(Debug)]
pub struct PromptView<'a> {
    /// The raw `model` value (a JSON string with its quotes), or empty.
    pub model: &'a [u8],
    /// The bytes the engine will render into the prompt, in order.
    pub segments: Segments<'a>,
    /// The session id the body carries, for when no session header does: OpenAI's `user`;
    /// the `session_id` in Anthropic's `metadata.user_id` (Claude Code sends a JSON string
    /// there), else the whole `user_id`; the Responses API's `prompt_cache_key`, then its
    /// `conversation`, then `user`.
    pub user: Option<String>,
    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens`, when given.
    pub max_output_tokens: Option<u64>,
    /// The Responses API's `previous_response_id`: the replica that stored that response
    /// must serve this one.
    pub previous_response: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// The last Anthropic `cache_control` breakpoint in render order: what the client asks the
    /// server to keep warm.
    pub breakpoint: Option<Breakpoint>,
    /// The conversation the body names, when it names one rather than a user: Claude Code's
    /// `session_id`, the Responses API's `prompt_cache_key` or `conversation`. The connector's
    /// KV is tagged with it when no session header is sent.
    pub conversation: Option<String>,
}

/// What the prompt's walk knows of `cache_control`: whether the body has any (the scanner
/// noticed, so bodies without one are not searched again), and the last breakpoint so far.
#[derive(Debug)]
struct Marks {
    seen: bool,
    last: Option<Breakpoint>,
}

/// An Anthropic `cache_control` breakpoint (`{"type":"ephemeral"}`, optional `"ttl"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breakpoint {
    /// Bytes of the prompt's segments up to the end of the block that carries it.
    pub end: usize,
    /// How long the client asks for it to stay warm: 300 s (`5m`, the default) or 3600 s
    /// (`1h`).
    pub ttl_s: u32,
}

impl Breakpoint {
    /// The TTL a `cache_control` value asks for.
    fn ttl_of(value: &[u8]) -> u32 {
        let compact: Vec<u8> = value.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
        if memchr::memmem::find(&compact, b"\"ttl\":\"1h\"").is_some() {
            3600
        } else {
            300
        }
    }
}

/// The top-level fields the router reads.
const FIELDS: [&str; 16] = [
    "model",
    "messages",
    "prompt",
    "tools",
    "user",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "system",
    "metadata",
    "instructions",
    "input",
    "prompt_cache_key",
    "conversation",
    "previous_response_id",
    "max_output_tokens",
];

/// The fields whose array elements are routed one by one.
const LISTS: [&str; 4] = ["messages", "tools", "system", "input"];

#[derive(Default)]
struct Fields<'a> {
    values: [Option<&'a [u8]>; FIELDS.len()],
    elements: [Option<Vec<Range<usize>>>; FIELDS.len()],
    /// Whether any object in the body has a `cache_control` key.
    marked: bool,
}

impl<'a> Fields<'a> {
    /// A routed field's raw value; `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a [u8]> {
        let i = FIELDS.iter().position(|f| *f == name)?;
        self.values[i].filter(|v| *v != b"null")
    }

    /// The elements of a routed array field (see [`LISTS`]).
    fn elements(&self, name: &str) -> Option<&[Range<usize>]> {
        let i = FIELDS.iter().position(|f| *f == name)?;
        self.elements[i].as_deref()
    }
}

fn field_index(body: &[u8], key: &Range<usize>) -> Option<usize> {
    let raw = &body[key.clone()];
    if raw.contains(&b'\\') {
        // An escaped key (rare): decode it as the engine's JSON decoder would.
        let quoted = &body[key.start - 1..key.end + 1];
        let decoded: String = serde_json::from_slice(quoted).ok()?;
        FIELDS.iter().position(|f| *f == decoded)
    } else {
        FIELDS.iter().position(|f| f.as_bytes() == raw)
    }
}

fn fields(body: &[u8]) -> Result<Fields<'_>, InvalidBody> {
    let wants = |k: &[u8]| LISTS.iter().any(|l| l.as_bytes() == k) || k.contains(&b'\\');
    let (members, marked) =
        scan_noting(body, wants, Some(b"cache_control")).map_err(InvalidBody::Json)?;
    let members =
        members.ok_or(InvalidBody::WrongType { field: "body", expected: "a JSON object" })?;
    let mut out = Fields { marked, ..Fields::default() };
    for m in members {
        let Some(i) = field_index(body, &m.key) else { continue };
        if out.values[i].is_some() {
            return Err(InvalidBody::Duplicate(FIELDS[i]));
        }
        out.values[i] = Some(&body[m.value]);
        out.elements[i] = m.elements;
    }
    Ok(out)
}

fn expect(
    v: Option<&[u8]>,
    field: &'static str,
    expected: &'static str,
    ok: impl Fn(u8) -> bool,
) -> Result<(), InvalidBody> {
    match v {
        Some(v) if !ok(v.first().copied().unwrap_or(b' ')) => {
            Err(InvalidBody::WrongType { field, expected })
        }
        _ => Ok(()),
    }
}

fn non_negative_integer(v: Option<&[u8]>, field: &'static str) -> Result<Option<u64>, InvalidBody> {
    v.map(|v| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(InvalidBody::WrongType { field, expected: "a non-negative integer" })
    })
    .transpose()
}

/// Parses and validates `body` for `route`.
///
/// # Errors
/// When the body is not a JSON object, lacks what its route requires (`messages`, `prompt`,
/// `input`), or a routed field has the wrong type.
pub fn parse(route: Route, body: &[u8]) -> Result<PromptView<'_>, InvalidBody> {
    let f = fields(body)?;
    expect(f.get("model"), "model", "a string", |b| b == b'"')?;
    expect(f.get("stream"), "stream", "a boolean", |b| b == b't' || b == b'f')?;
    expect(f.get("tools"), "tools", "an array", |b| b == b'[')?;
    let max_output_tokens = [
        non_negative_integer(f.get("max_completion_tokens"), "max_completion_tokens")?,
        non_negative_integer(f.get("max_tokens"), "max_tokens")?,
        non_negative_integer(f.get("max_output_tokens"), "max_output_tokens")?,
    ]
    .into_iter()
    .flatten()
    .next();

    let mut segments = Segments::new();
    let mut marks = Marks { seen: f.marked, last: None };
    if let Some(tools) = f.get("tools") {
        push_value(&mut segments, &mut marks, body, range_of(body, tools), f.elements("tools"));
    }
    let mut previous_response = None;
    let mut conversation = None;
    let user = match route {
        Route::Chat | Route::Messages | Route::CountTokens => {
            if matches!(route, Route::Messages | Route::CountTokens) {
                if let Some(system) = f.get("system") {
                    match system.first() {
                        Some(b'"') => segments.push(system),
                        Some(b'[') => push_value(
                            &mut segments,
                            &mut marks,
                            body,
                            range_of(body, system),
                            f.elements("system"),
                        ),
                        _ => {
                            return Err(InvalidBody::WrongType {
                                field: "system",
                                expected: "a string or an array of content blocks",
                            })
                        }
                    }
                }
            }
            f.get("messages").ok_or(InvalidBody::Missing("messages"))?;
            let list = f
                .elements("messages")
                .filter(|l| !l.is_empty() && l.iter().all(|m| body[m.start] == b'{'))
                .ok_or(InvalidBody::WrongType {
                    field: "messages",
                    expected: "a non-empty array of objects",
                })?;
            for m in list {
                push_object(&mut segments, &mut marks, body, m.clone(), 0);
            }
            if route == Route::Chat {
                string(f.get("user"), "user")?
            } else {
                let (session, named) = anthropic_session(f.get("metadata"))?;
                if named {
                    conversation.clone_from(&session);
                }
                session
            }
        }
        Route::Completions => {
            let raw = f.get("prompt").ok_or(InvalidBody::Missing("prompt"))?;
            push_open_ended(&mut segments, raw, "prompt")?;
            string(f.get("user"), "user")?
        }
        Route::Responses => {
            if let Some(instructions) = f.get("instructions") {
                expect(Some(instructions), "instructions", "a string", |b| b == b'"')?;
                segments.push(instructions);
            }
            let raw = f.get("input").ok_or(InvalidBody::Missing("input"))?;
            match f.elements("input") {
                Some(items) if raw.first() == Some(&b'[') => {
                    for item in items {
                        segments.push(&body[item.clone()]);
                    }
                }
                _ => push_open_ended(&mut segments, raw, "input")?,
            }
            previous_response = string(f.get("previous_response_id"), "previous_response_id")?;
            let named = match f.get("conversation") {
                Some(c) if c.first() == Some(&b'{') => {
                    serde_json::from_slice::<serde_json::Value>(c)
                        .ok()
                        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                }
                c => string(c, "conversation")?,
            };
            conversation = string(f.get("prompt_cache_key"), "prompt_cache_key")?.or(named);
            conversation.clone().or(string(f.get("user"), "user")?)
        }
    };
    Ok(PromptView {
        model: f.get("model").unwrap_or(&[]),
        breakpoint: marks.last,
        segments,
        user,
        max_output_tokens,
        previous_response,
        stream: f.get("stream") == Some(b"true"),
        conversation,
    })
}

/// Where `value`, a slice of `body`, lies in it.
fn range_of(body: &[u8], value: &[u8]) -> Range<usize> {
    let start = value.as_ptr() as usize - body.as_ptr() as usize;
    start..start + value.len()
}

/// A string field decoded, `None` when absent.
fn string(v: Option<&[u8]>, field: &'static str) -> Result<Option<String>, InvalidBody> {
    match v {
        None => Ok(None),
        // Validated JSON: decoding a string fails only on lone surrogates.
        Some(v) if v.first() == Some(&b'"') => Ok(serde_json::from_slice::<String>(v).ok()),
        Some(_) => Err(InvalidBody::WrongType { field, expected: "a string" }),
    }
}

/// Anthropic's `metadata.user_id`: Claude Code sends a JSON string whose `session_id` names
/// the session (and so the conversation: the flag); any other value is the session id itself.
fn anthropic_session(metadata: Option<&[u8]>) -> Result<(Option<String>, bool), InvalidBody> {
    let Some(m) = metadata else { return Ok((None, false)) };
    if m.first() != Some(&b'{') {
        return Err(InvalidBody::WrongType { field: "metadata", expected: "an object" });
    }
    let value: serde_json::Value = serde_json::from_slice(m).unwrap_or_default();
    let Some(user_id) = value.get("user_id").and_then(|u| u.as_str()) else {
        return Ok((None, false));
    };
    let session = serde_json::from_str::<serde_json::Value>(user_id)
        .ok()
        .and_then(|v| v.get("session_id").and_then(|s| s.as_str()).map(str::to_owned));
    Ok(match session {
        Some(s) => (Some(s), true),
        None => (Some(user_id.to_owned()), false),
    })
}

/// A prompt that the next turn extends: a string without its closing quote (so a longer
/// prompt shares every full chunk of this one), or an array as received.
fn push_open_ended<'a>(
    segments: &mut Segments<'a>,
    raw: &'a [u8],
    field: &'static str,
) -> Result<(), InvalidBody> {
    match raw.first() {
        Some(b'"') => segments.push(&raw[..raw.len() - 1]),
        Some(b'[') => segments.push(raw),
        _ => return Err(InvalidBody::WrongType { field, expected: "a string or an array" }),
    }
    Ok(())
}

fn has_cache_control(raw: &[u8]) -> bool {
    memchr::memmem::find(raw, b"\"cache_control\"").is_some()
}

/// Pushes an array `value` of `body` (its `elements` when scanned) with the `cache_control`
/// members of its objects left out.
fn push_value<'a>(
    segments: &mut Segments<'a>,
    marks: &mut Marks,
    body: &'a [u8],
    value: Range<usize>,
    elements: Option<&[Range<usize>]>,
) {
    match elements {
        Some(list) if marks.seen && has_cache_control(&body[value.clone()]) => {
            let mut cursor = value.start;
            for e in list {
                segments.push(&body[cursor..e.start]);
                push_object(segments, marks, body, e.clone(), 0);
                cursor = e.end;
            }
            segments.push(&body[cursor..value.end]);
        }
        _ => segments.push(&body[value]),
    }
}

/// Pushes the object at `obj` in `body` without its `cache_control` member, nor those of the
/// blocks of its `content` array (one level down); a `cache_control` found moves
/// the last breakpoint in `marks` to the object's end.
fn push_object<'a>(
    segments: &mut Segments<'a>,
    marks: &mut Marks,
    body: &'a [u8],
    obj: Range<usize>,
    depth: u8,
) {
    let raw = &body[obj.clone()];
    if raw.first() != Some(&b'{') || !marks.seen || !has_cache_control(raw) {
        segments.push(raw);
        return;
    }
    let Ok(Some(members)) = scan(raw, |k| depth == 0 && k == b"content") else {
        segments.push(raw);
        return;
    };
    let at = |r: &Range<usize>| obj.start + r.start..obj.start + r.end;
    let mut cursor = obj.start;
    let mut ttl_s = None;
    let start = segments.len();
    for (i, m) in members.iter().enumerate() {
        if &raw[m.key.clone()] == b"cache_control" {
            ttl_s = Some(Breakpoint::ttl_of(&raw[m.value.clone()]));
            // The member and the comma that joins it to its neighbour.
            let cut = match (i.checked_sub(1).map(|p| &members[p]), members.get(i + 1)) {
                (Some(prev), _) => at(&prev.value).end..at(&m.value).end,
                (None, Some(next)) => at(&m.key).start - 1..at(&next.key).start - 1,
                (None, None) => at(&m.key).start - 1..at(&m.value).end,
            };
            segments.push(&body[cursor..cut.start]);
            cursor = cut.end;
        } else if let Some(blocks) = &m.elements {
            for b in blocks {
                let b = at(b);
                segments.push(&body[cursor..b.start]);
                push_object(segments, marks, body, b.clone(), depth + 1);
                cursor = b.end;
            }
        }
    }
    segments.push(&body[cursor..obj.end]);
    if let Some(ttl_s) = ttl_s {
        marks.last = Some(Breakpoint { end: segments.len(), ttl_s });
    } else if let Some(b) = marks.last.as_mut().filter(|b| depth == 0 && b.end > start) {
        // A breakpoint on one of a message's blocks holds the whole message.
        b.end = segments.len();
    }
}

#[cfg(test)]
mod tests;
