//! Session identity: the headers that agent harnesses send on every request of one
//! conversation, in the order the router consults them.
//!
//! Sources (checked 2026): Claude Code sends `x-claude-code-session-id` and, for a subagent,
//! `x-claude-code-agent-id`; Codex sends `session-id` (older releases `session_id`) and newer
//! releases `thread-id`; OpenCode sends `x-session-id`; Dynamo-aware clients send
//! `x-dynamo-session-id`. kvtier's own header is `X-Session-ID`, which is the same name as
//! OpenCode's, so it comes first.

/// Headers whose value identifies a session, most specific first. Header names are
/// case-insensitive on the wire; these are the lower-case forms.
pub const DEFAULT_SESSION_HEADERS: &[&str] = &[
    "x-session-id",
    "x-claude-code-session-id",
    "x-dynamo-session-id",
    "session-id",
    "session_id",
    "thread-id",
];

/// Headers that name a sub-conversation inside a session: a subagent has its own context
/// (the traces show subagents share no KV blocks with their parent), so it is its own
/// session for routing. Pairs of (session header, child header).
pub const CHILD_SESSION_HEADERS: &[(&str, &str)] =
    &[("x-claude-code-session-id", "x-claude-code-agent-id")];

/// The request body field consulted when no session header is present (OpenAI's `user`).
pub const SESSION_BODY_FIELD: &str = "user";

/// Longest session id accepted, in bytes; longer values are ignored rather than trusted.
pub const MAX_SESSION_ID_BYTES: usize = 512;
