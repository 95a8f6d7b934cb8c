//! Prompt text for traces that carry none.
//!
//! Every trace block id stands for `block_size` tokens of text derived from the run's seed,
//! the agent and the id alone, so equal ids give byte-identical text; a conversation's
//! messages are kept append-only, so an engine's prefix cache sees exactly the reuse the
//! trace records: a turn that extends the previous one shares all its bytes up to the first
//! new block. Text is lowercase words (no escaping in JSON), one token per
//! [`BYTES_PER_TOKEN`] bytes, the simulator's tokenizer rule
//! ([`kvtier_sim::tokens`]); a real tokenizer will count somewhat differently.
//!
//! Rendering follows the simulator's rule too (`role`, newline, text, newline per message),
//! so the last message is padded with turn-specific text until the request holds the
//! trace's `in` tokens.

use std::fmt::Write as _;

use crate::trace::Turn;

/// Bytes of text per token.
pub use kvtier_sim::tokens::BYTES_PER_TOKEN;

/// SplitMix64: a small, fast, well-mixed generator; the replay's only source of randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Mixes values into one seed.
#[must_use]
pub fn mix(parts: &[u64]) -> u64 {
    let mut r = Rng::new(0x6b76_7469_6572_6265);
    let mut h = 0u64;
    for p in parts {
        r.0 ^= p.wrapping_add(h);
        h = r.next_u64();
    }
    h
}

/// A stable 64-bit name for a string (trace and agent ids).
#[must_use]
pub fn name_hash(s: &str) -> u64 {
    kvtier_api::prefix::xxh3_64_with_seed(s.as_bytes(), 0)
}

/// Appends `bytes` bytes of words drawn from `seed` to `out`.
pub fn words(seed: u64, bytes: usize, out: &mut Vec<u8>) {
    let mut r = Rng::new(seed);
    let start = out.len();
    let end = start + bytes;
    while out.len() < end {
        let mut bits = r.next_u64();
        // A word of 2 to 9 letters, then a space.
        let len = 2 + (bits % 8) as usize;
        bits >>= 3;
        for _ in 0..len {
            if out.len() == end {
                break;
            }
            out.push(b'a' + (bits % 26) as u8);
            bits /= 26;
            if bits == 0 {
                bits = r.next_u64();
            }
        }
        if out.len() < end {
            out.push(b' ');
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone)]
struct Message {
    role: Role,
    /// Blocks `start..end` of the history.
    start: usize,
    end: usize,
}

/// The API a replay speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// OpenAI chat completions.
    #[default]
    Chat,
    /// Anthropic Messages as Claude Code sends it: the system prompt in `system`, text blocks,
    /// `cache_control` breakpoints at the end of the system prompt and on the newest message.
    Anthropic,
    /// OpenAI Responses as Codex sends it: `instructions`, the history as `input` items, not
    /// stored.
    Responses,
}

impl Api {
    /// The request path.
    #[must_use]
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
            Api::Responses => "/v1/responses",
        }
    }
}

/// What a request asks of the engine besides its prompt.
#[derive(Debug, Clone)]
pub struct RequestOptions<'a> {
    /// The API spoken.
    pub api: Api,
    /// `model` field.
    pub model: &'a str,
    /// Stream the response (with usage in the last chunk).
    pub stream: bool,
    /// Ask the engine to ignore end-of-sequence so it produces exactly the trace's output.
    pub ignore_eos: bool,
}

/// One agent's history, rendered request by request.
#[derive(Debug, Clone)]
pub struct Conversation {
    seed: u64,
    block_tokens: usize,
    /// Blocks at the start of the first request that are tools and system prompt.
    system_blocks: usize,
    blocks: Vec<u64>,
    messages: Vec<Message>,
    turns: u64,
    /// The canonical warm prefix: its text's seed and its length in blocks.
    warm: (u64, usize),
}

impl Conversation {
    /// A conversation whose text derives from `seed` (the run's seed mixed with the trace
    /// and agent), with `block_tokens` tokens per trace block.
    #[must_use]
    pub fn new(seed: u64, block_tokens: u64, system_tokens: u64) -> Self {
        let block_tokens = block_tokens.max(1) as usize;
        Self {
            seed,
            block_tokens,
            system_blocks: system_tokens as usize / block_tokens,
            blocks: Vec::new(),
            messages: Vec::new(),
            turns: 0,
            warm: (0, 0),
        }
    }

    /// The same conversation opening with `blocks` blocks of the canonical warm prefix (text
    /// from `seed` and the block's position alone, so every conversation given the same
    /// seed opens with the same bytes) in place of its own first blocks' text.
    #[must_use]
    pub fn with_warm_prefix(mut self, seed: u64, blocks: u64) -> Self {
        self.warm = (seed, usize::try_from(blocks).unwrap_or(usize::MAX));
        self
    }

    fn block_bytes(&self) -> usize {
        self.block_tokens * BYTES_PER_TOKEN
    }

    /// Updates the history for `turn` (whose previous turn produced `prev_output` tokens)
    /// and returns the request body.
    pub fn next_body(
        &mut self,
        turn: &Turn,
        prev_output: u64,
        opts: &RequestOptions<'_>,
    ) -> Vec<u8> {
        let ids = &turn.hash_ids;
        // Keep the common prefix; cut messages at it.
        let common = self.blocks.iter().zip(ids).take_while(|(a, b)| a == b).count();
        self.blocks.truncate(common);
        self.messages.retain(|m| m.start < common);
        if let Some(last) = self.messages.last_mut() {
            last.end = last.end.min(common);
        }
        // New blocks: the first request opens with system then user; later ones add the
        // previous answer (as much as it was long) and the client's new input.
        let new = ids.len() - common;
        if new > 0 {
            let mut at = common;
            if self.messages.is_empty() {
                let sys = self.system_blocks.min(new);
                if sys > 0 {
                    self.messages.push(Message { role: Role::System, start: 0, end: sys });
                    at = sys;
                }
            } else {
                let answer =
                    ((prev_output as usize) / self.block_tokens).min(new.saturating_sub(1));
                if answer > 0 {
                    self.messages.push(Message {
                        role: Role::Assistant,
                        start: at,
                        end: at + answer,
                    });
                    at += answer;
                }
            }
            if at < ids.len() {
                self.messages.push(Message { role: Role::User, start: at, end: ids.len() });
            }
            self.blocks.extend_from_slice(&ids[common..]);
        }
        self.turns += 1;
        self.render(turn, opts)
    }

    fn render(&self, turn: &Turn, opts: &RequestOptions<'_>) -> Vec<u8> {
        let bb = self.block_bytes();
        let target = turn.input as usize * BYTES_PER_TOKEN;
        // Bytes of the stream as the engine counts it, before padding.
        let mut stream = 0;
        for m in &self.messages {
            stream += m.role.name().len() + 2 + (m.end - m.start) * bb;
        }
        let needs_user = self.messages.is_empty();
        if needs_user {
            stream += Role::User.name().len() + 2;
        }
        let pad = target.saturating_sub(stream);
        // (role, first block, blocks, padded): the messages in order, the new input last.
        let last = self.messages.len().saturating_sub(1);
        let mut parts: Vec<(Role, usize, &[u64], bool)> = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| (m.role, m.start, &self.blocks[m.start..m.end], i == last && !needs_user))
            .collect();
        if needs_user {
            parts.push((Role::User, self.blocks.len(), &[], true));
        }
        let (warm_seed, warm_blocks) = self.warm;
        let text = |out: &mut Vec<u8>, first: usize, blocks: &[u64], padded: bool| {
            for (k, &id) in blocks.iter().enumerate() {
                let at = first + k;
                let seed = if at < warm_blocks {
                    mix(&[warm_seed, at as u64])
                } else {
                    mix(&[self.seed, id])
                };
                words(seed, bb, out);
            }
            if padded {
                words(mix(&[self.seed, u64::MAX, self.turns]), pad, out);
            }
        };

        let mut out = Vec::with_capacity(target + 256 + self.messages.len() * 64);
        let _ = write!(Sink(&mut out), "{{\"model\":{},", json_string(opts.model));
        // The system prompt is a field of its own in the agents' APIs.
        let system = match (opts.api, parts.first()) {
            (Api::Anthropic | Api::Responses, Some((Role::System, first, blocks, padded))) => {
                let (first, blocks, padded) = (*first, *blocks, *padded);
                parts.remove(0);
                Some((first, blocks, padded))
            }
            _ => None,
        };
        let breakpoint = r#","cache_control":{"type":"ephemeral"}"#;
        match opts.api {
            Api::Chat => out.extend_from_slice(b"\"messages\":["),
            Api::Anthropic => {
                if let Some((first, blocks, padded)) = system {
                    out.extend_from_slice(br#""system":[{"type":"text","text":""#);
                    text(&mut out, first, blocks, padded);
                    let _ = write!(Sink(&mut out), "\"{breakpoint}}}],");
                }
                out.extend_from_slice(b"\"messages\":[");
            }
            Api::Responses => {
                if let Some((first, blocks, padded)) = system {
                    out.extend_from_slice(b"\"instructions\":\"");
                    text(&mut out, first, blocks, padded);
                    out.extend_from_slice(b"\",");
                }
                out.extend_from_slice(b"\"input\":[");
            }
        }
        let newest = parts.len().saturating_sub(1);
        for (i, (role, first, blocks, padded)) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = write!(Sink(&mut out), "{{\"role\":\"{}\",\"content\":", role.name());
            match opts.api {
                Api::Anthropic => out.extend_from_slice(br#"[{"type":"text","text":""#),
                _ => out.push(b'"'),
            }
            text(&mut out, *first, blocks, *padded);
            match opts.api {
                Api::Anthropic if i == newest => {
                    let _ = write!(Sink(&mut out), "\"{breakpoint}}}]}}");
                }
                Api::Anthropic => out.extend_from_slice(b"\"}]}"),
                _ => out.extend_from_slice(b"\"}"),
            }
        }
        let limit = match opts.api {
            Api::Responses => "max_output_tokens",
            _ => "max_tokens",
        };
        let _ = write!(
            Sink(&mut out),
            "],\"{limit}\":{},\"stream\":{}",
            turn.output.max(1),
            opts.stream
        );
        match opts.api {
            Api::Chat if opts.stream => {
                out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
            }
            Api::Responses => out.extend_from_slice(b",\"store\":false"),
            _ => {}
        }
        if opts.ignore_eos {
            out.extend_from_slice(b",\"ignore_eos\":true");
        }
        out.push(b'}');
        out
    }
}

/// `fmt::Write` into a byte vector.
struct Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}
