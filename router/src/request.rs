//! What the router reads from an OpenAI request body, without ever re-serialising it.
//!
//! The body is parsed once with borrowed [`RawValue`]s: the fields that matter for routing
//! are validated and their exact received bytes are kept as slices of the body, in the
//! order the engine's chat template renders them (tools, then each message). Everything
//! else is skipped (but still checked to be well-formed JSON). The body forwarded to the
//! endpoint is the received `Bytes`, untouched.

use kvtier_api::prefix::Segments;
use serde::Deserialize;
use serde_json::value::RawValue;

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
    Json(#[source] serde_json::Error),
    /// A required field is absent.
    #[error("`{0}` is required")]
    Missing(&'static str),
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
            InvalidBody::Missing(f) | InvalidBody::WrongType { field: f, .. } => Some(f),
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

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
}

fn first_byte(v: &RawValue) -> u8 {
    v.get().as_bytes().first().copied().unwrap_or(b' ')
}

fn expect(
    v: Option<&RawValue>,
    field: &'static str,
    expected: &'static str,
    ok: impl Fn(u8) -> bool,
) -> Result<(), InvalidBody> {
    match v {
        Some(v) if !ok(first_byte(v)) => Err(InvalidBody::WrongType { field, expected }),
        _ => Ok(()),
    }
}

fn non_negative_integer(
    v: Option<&RawValue>,
    field: &'static str,
) -> Result<Option<u64>, InvalidBody> {
    v.map(|v| {
        v.get()
            .parse::<u64>()
            .map_err(|_| InvalidBody::WrongType { field, expected: "a non-negative integer" })
    })
    .transpose()
}

/// Parses and validates `body` for `route`.
///
/// # Errors
/// When the body is not a JSON object, lacks `messages` (chat) or `prompt` (completions),
/// or a routed field has the wrong type.
pub fn parse(route: Route, body: &[u8]) -> Result<PromptView<'_>, InvalidBody> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(InvalidBody::WrongType { field: "body", expected: "a JSON object" });
    }
    let parsed: Body<'_> = serde_json::from_slice(body).map_err(InvalidBody::Json)?;
    expect(parsed.model, "model", "a string", |b| b == b'"')?;
    expect(parsed.user, "user", "a string", |b| b == b'"')?;
    expect(parsed.stream, "stream", "a boolean", |b| b == b't' || b == b'f')?;
    expect(parsed.tools, "tools", "an array", |b| b == b'[')?;
    let max_output_tokens =
        match non_negative_integer(parsed.max_completion_tokens, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => non_negative_integer(parsed.max_tokens, "max_tokens")?,
        };

    let mut segments = Segments::new();
    if let Some(tools) = parsed.tools {
        segments.push(tools.get().as_bytes());
    }
    match route {
        Route::Chat => {
            let messages = parsed.messages.ok_or(InvalidBody::Missing("messages"))?;
            let list: Vec<&RawValue> =
                serde_json::from_str(messages.get()).map_err(|_| InvalidBody::WrongType {
                    field: "messages",
                    expected: "a non-empty array of objects",
                })?;
            if list.is_empty() || list.iter().any(|m| first_byte(m) != b'{') {
                return Err(InvalidBody::WrongType {
                    field: "messages",
                    expected: "a non-empty array of objects",
                });
            }
            for m in list {
                segments.push(m.get().as_bytes());
            }
        }
        Route::Completions => {
            let prompt = parsed.prompt.ok_or(InvalidBody::Missing("prompt"))?;
            let raw = prompt.get().as_bytes();
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
    let user = match parsed.user {
        Some(u) => Some(serde_json::from_str::<String>(u.get()).map_err(InvalidBody::Json)?),
        None => None,
    };
    Ok(PromptView {
        model: parsed.model.map_or(&[][..], |m| m.get().as_bytes()),
        segments,
        user,
        max_output_tokens,
    })
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
        ];
        for (route, body, param) in cases {
            let err = parse(*route, body).expect_err("must be rejected");
            assert_eq!(err.param(), *param, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn nulls_mean_absent() {
        let v = parse(Route::Chat, br#"{"messages":[{}],"tools":null,"user":null,"stream":null}"#)
            .expect("valid");
        assert!(v.user.is_none());
    }
}
