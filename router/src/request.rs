//! What the router reads from an OpenAI request body, without ever re-serialising it.
//!
//! The body is scanned once ([`crate::scan`]): all of it is validated as JSON, and the fields
//! that matter for routing are kept as slices of the received bytes, in the order the
//! engine's chat template renders them (tools, then each message). The body forwarded to the
//! endpoint is the received `Bytes`, untouched.

use std::ops::Range;

use kvtier_api::prefix::Segments;

use crate::scan::{scan, ScanError};

/// The OpenAI routes the router proxies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

impl Route {
    /// Fixed metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat_completions",
            Route::Completions => "completions",
        }
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
    /// The body's `user` field.
    pub user: Option<String>,
    /// `max_completion_tokens` or `max_tokens`, when given.
    pub max_output_tokens: Option<u64>,
}

/// The top-level fields the router reads.
const FIELDS: [&str; 8] = [
    "model",
    "messages",
    "prompt",
    "tools",
    "user",
    "stream",
    "max_tokens",
    "max_completion_tokens",
];

#[derive(Default)]
struct Fields<'a> {
    values: [Option<&'a [u8]>; FIELDS.len()],
    messages: Option<Vec<Range<usize>>>,
}

impl<'a> Fields<'a> {
    /// A routed field's raw value; `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a [u8]> {
        let i = FIELDS.iter().position(|f| *f == name)?;
        self.values[i].filter(|v| *v != b"null")
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
    let members = scan(body, |k| k == b"messages" || k.contains(&b'\\'))
        .map_err(InvalidBody::Json)?
        .ok_or(InvalidBody::WrongType { field: "body", expected: "a JSON object" })?;
    let mut out = Fields::default();
    for m in members {
        let Some(i) = field_index(body, &m.key) else { continue };
        if out.values[i].is_some() {
            return Err(InvalidBody::Duplicate(FIELDS[i]));
        }
        out.values[i] = Some(&body[m.value]);
        if FIELDS[i] == "messages" {
            out.messages = m.elements;
        }
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
/// When the body is not a JSON object, lacks `messages` (chat) or `prompt` (completions),
/// or a routed field has the wrong type.
pub fn parse(route: Route, body: &[u8]) -> Result<PromptView<'_>, InvalidBody> {
    let f = fields(body)?;
    expect(f.get("model"), "model", "a string", |b| b == b'"')?;
    expect(f.get("user"), "user", "a string", |b| b == b'"')?;
    expect(f.get("stream"), "stream", "a boolean", |b| b == b't' || b == b'f')?;
    expect(f.get("tools"), "tools", "an array", |b| b == b'[')?;
    let max_output_tokens =
        match non_negative_integer(f.get("max_completion_tokens"), "max_completion_tokens")? {
            Some(n) => Some(n),
            None => non_negative_integer(f.get("max_tokens"), "max_tokens")?,
        };

    let mut segments = Segments::new();
    if let Some(tools) = f.get("tools") {
        segments.push(tools);
    }
    match route {
        Route::Chat => {
            f.get("messages").ok_or(InvalidBody::Missing("messages"))?;
            let list = f
                .messages
                .as_ref()
                .filter(|l| !l.is_empty() && l.iter().all(|m| body[m.start] == b'{'))
                .ok_or(InvalidBody::WrongType {
                    field: "messages",
                    expected: "a non-empty array of objects",
                })?;
            for m in list {
                segments.push(&body[m.clone()]);
            }
        }
        Route::Completions => {
            let raw = f.get("prompt").ok_or(InvalidBody::Missing("prompt"))?;
            match raw.first() {
                // Leave the closing quote out, so a longer prompt of the next turn shares
                // every full chunk of this one.
                Some(b'"') => segments.push(&raw[..raw.len() - 1]),
                Some(b'[') => segments.push(raw),
                _ => {
                    return Err(InvalidBody::WrongType {
                        field: "prompt",
                        expected: "a string or an array",
                    })
                }
            }
        }
    }
    let user = match f.get("user") {
        // Validated JSON string: decoding cannot fail but for lone surrogates.
        Some(u) => serde_json::from_slice::<String>(u).ok(),
        None => None,
    };
    Ok(PromptView { model: f.get("model").unwrap_or(&[]), segments, user, max_output_tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_segments_are_tools_then_messages_as_received() {
        let body = br#"{"messages": [ {"role":"system","content":"S"} ,{"role":"user", "content":"U"}],
            "model":"m","tools":[{"type":"function"}],"stream":true,"max_tokens":9,"user":"alice"}"#;
        let v = parse(Route::Chat, body).expect("valid");
        let mut expected = Segments::new();
        expected.push(br#"[{"type":"function"}]"#);
        expected.push(br#"{"role":"system","content":"S"}"#);
        expected.push(br#"{"role":"user", "content":"U"}"#);
        assert_eq!(v.segments.chunk_hashes(1, 1), expected.chunk_hashes(1, 1));
        assert_eq!(v.model, br#""m""#);
        assert_eq!(v.max_output_tokens, Some(9));
        assert_eq!(v.user.as_deref(), Some("alice"));
    }

    #[test]
    fn completion_prompt_leaves_out_the_closing_quote() {
        let v = parse(Route::Completions, br#"{"prompt":"abc"}"#).expect("valid");
        assert_eq!(v.segments.len(), 4);
        assert!(parse(Route::Completions, br#"{"prompt":[1,2,3]}"#).is_ok());
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let cases: &[(Route, &[u8], Option<&str>)] = &[
            (Route::Chat, b"{not json", None),
            (Route::Chat, b"[]", Some("body")),
            (Route::Chat, b"{}", Some("messages")),
            (Route::Chat, br#"{"messages":"hi"}"#, Some("messages")),
            (Route::Chat, br#"{"messages":[]}"#, Some("messages")),
            (Route::Chat, br#"{"messages":[1]}"#, Some("messages")),
            (Route::Chat, br#"{"messages":[{}],"stream":"yes"}"#, Some("stream")),
            (Route::Chat, br#"{"messages":[{}],"model":3}"#, Some("model")),
            (Route::Chat, br#"{"messages":[{}],"max_tokens":-1}"#, Some("max_tokens")),
            (Route::Chat, br#"{"messages":[{}],"tools":{}}"#, Some("tools")),
            (Route::Chat, br#"{"messages":[{}],"user":{}}"#, Some("user")),
            (Route::Completions, b"{}", Some("prompt")),
            (Route::Completions, br#"{"prompt":7}"#, Some("prompt")),
            (Route::Chat, br#"{"messages":[{}],"messages":[{}]}"#, Some("messages")),
            (Route::Chat, br#"{"messages":[{}]} x"#, None),
        ];
        for (route, body, param) in cases {
            let err = parse(*route, body).expect_err("must be rejected");
            assert_eq!(err.param(), *param, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn escaped_keys_are_read_as_the_engine_reads_them() {
        let v = parse(Route::Chat, br#"{"mess\u0061ges":[{"role":"user"}]}"#).expect("valid");
        assert_eq!(v.segments.len(), 15);
    }

    #[test]
    fn nulls_mean_absent() {
        let v = parse(Route::Chat, br#"{"messages":[{}],"tools":null,"user":null,"stream":null}"#)
            .expect("valid");
        assert!(v.user.is_none());
    }
}
