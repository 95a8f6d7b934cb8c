//! The simulator's tokenizer: a documented, deterministic rule that turns a request's text
//! into a token count and the chained hashes of its KV blocks.
//!
//! The prompt is the byte stream an engine's chat template would see, in order:
//! - the `tools` array, as the JSON text received;
//! - for every message: its `role`, a newline, its text, a newline. The text is `content`
//!   when it is a string, or the `text` of each part when it is an array (other parts count
//!   as their JSON text); `tool_calls` count as their JSON text.
//!
//! For `/v1/messages` the Anthropic `system` prompt (its JSON text) follows the tools; for
//! `/v1/responses` the stream is the tools, the `instructions`, then the `input` (its text when
//! a string, else its JSON text).
//!
//! For `/v1/completions` the stream is the `prompt` string (or the strings of an array, one
//! after another; token-id arrays count one token per id, the ids as their decimal text).
//!
//! One token is [`BYTES_PER_TOKEN`] bytes, rounded up. A block is `block_tokens` tokens; its
//! key is the xxh3 of its bytes chained with the previous key, starting from the model's
//! seed ([`kvtier_api::prefix`]). Equal text at equal positions therefore gives equal blocks,
//! and a prompt that extends another shares all of its full blocks, which is what a real
//! tokenizer gives for append-only agent histories.

use kvtier_api::prefix::{model_seed, Segments};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Bytes of text per token (English text and code average about four with BPE tokenizers).
pub const BYTES_PER_TOKEN: usize = 4;

/// A prompt measured by the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Tokens.
    pub tokens: u32,
    /// Keys of the full blocks.
    pub blocks: Vec<u64>,
}

/// Tokens of `bytes` bytes of text.
#[must_use]
pub fn tokens_of(bytes: usize) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN) as u64
}

/// Measures the byte stream `stream` for `model`.
#[must_use]
pub fn measure(model: &str, stream: &Segments<'_>, block_tokens: u32) -> Prompt {
    let tokens = u32::try_from(tokens_of(stream.len())).unwrap_or(u32::MAX);
    let blocks =
        stream.chunk_hashes(model_seed(model.as_bytes()), block_tokens as usize * BYTES_PER_TOKEN);
    Prompt { tokens, blocks }
}

/// Text of a message: a string, or parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// Text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
    /// Anything else the part holds, as JSON text.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`…
    pub role: String,
    /// Text.
    #[serde(default)]
    pub content: Option<Content>,
    /// Tool calls of an assistant message.
    #[serde(default)]
    pub tool_calls: Option<Box<RawValue>>,
}

/// Keeps the owned pieces of a rendered prompt alive while [`Segments`] borrows them.
#[derive(Debug, Default)]
pub struct Rendered {
    pieces: Vec<String>,
}

impl Rendered {
    /// Renders chat `messages` (after `tools` and an Anthropic `system` prompt, as their JSON
    /// text) into the byte stream the rule counts.
    pub fn chat<'a>(
        &'a mut self,
        tools: Option<&'a RawValue>,
        system: Option<&'a RawValue>,
        messages: &'a [Message],
    ) -> Segments<'a> {
        // Parts that are not text are rendered to owned strings first.
        self.pieces.clear();
        for m in messages {
            if let Some(Content::Parts(parts)) = &m.content {
                for p in parts {
                    if p.text.is_none() {
                        self.pieces.push(serde_json::Value::Object(p.rest.clone()).to_string());
                    }
                }
            }
        }
        let mut owned = self.pieces.iter();
        let mut s = Segments::new();
        if let Some(t) = tools {
            s.push(t.get().as_bytes());
        }
        if let Some(t) = system {
            s.push(t.get().as_bytes());
        }
        for m in messages {
            s.push(m.role.as_bytes());
            s.push(b"\n");
            match &m.content {
                Some(Content::Text(t)) => s.push(t.as_bytes()),
                Some(Content::Parts(parts)) => {
                    for p in parts {
                        match &p.text {
                            Some(t) => s.push(t.as_bytes()),
                            None => {
                                if let Some(o) = owned.next() {
                                    s.push(o.as_bytes());
                                }
                            }
                        }
                    }
                }
                None => {}
            }
            if let Some(calls) = &m.tool_calls {
                s.push(calls.get().as_bytes());
            }
            s.push(b"\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str, block_tokens: u32) -> Prompt {
        #[derive(Deserialize)]
        struct B<'a> {
            #[serde(borrow)]
            tools: Option<&'a RawValue>,
            messages: Vec<Message>,
        }
        let b: B<'_> = serde_json::from_str(body).expect("test body");
        let mut r = Rendered::default();
        let s = r.chat(b.tools, None, &b.messages);
        measure("m", &s, block_tokens)
    }

    #[test]
    fn four_bytes_per_token_rounded_up() {
        // "user\n" + 11 bytes + "\n" = 17 bytes = 5 tokens.
        let p = chat(r#"{"messages":[{"role":"user","content":"hello world"}]}"#, 1);
        assert_eq!(p.tokens, 5);
        assert_eq!(p.blocks.len(), 4, "only full blocks have keys");
    }

    #[test]
    fn an_extended_conversation_shares_every_full_block() {
        let long = "x".repeat(1000);
        let one = format!(r#"{{"messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let two = format!(
            r#"{{"messages":[{{"role":"user","content":"{long}"}},{{"role":"assistant","content":"ok"}}]}}"#
        );
        let (a, b) = (chat(&one, 16), chat(&two, 16));
        assert!(b.tokens > a.tokens);
        assert_eq!(&b.blocks[..a.blocks.len()], &a.blocks[..]);
        // A different first message changes every key.
        let other = chat(&one.replace("\"x", "\"y"), 16);
        assert!(other.blocks.iter().zip(&a.blocks).all(|(x, y)| x != y));
    }

    #[test]
    fn parts_and_tools_count() {
        let plain = chat(r#"{"messages":[{"role":"user","content":"abcd"}]}"#, 1);
        let parts =
            chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcd"}]}]}"#, 1);
        assert_eq!(plain, parts, "a text part reads as its text");
        let tools = chat(
            r#"{"tools":[{"type":"function","function":{"name":"f"}}],"messages":[{"role":"user","content":"abcd"}]}"#,
            1,
        );
        assert!(tools.tokens > plain.tokens);
    }
}
