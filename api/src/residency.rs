//! Which conversation a chunk belongs to, and where a conversation's KV is on a node: the
//! contract between the router, the connector and the node-agent.

use crate::agent::Tier;

/// Names a conversation across the router, the connector and the agent.
///
/// The router derives it and forwards it to the engine in the request body's
/// `kv_transfer_params.kvtier.conversation` (16 hex digits); the connector sends it with the
/// chunks it commits; the agent reports residency per conversation. With a session id it is
/// [`ConversationKey::of_session`]; without one the router uses the prefix hash it already
/// keys the conversation by (its tip at the conversation's first request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationKey(pub u64);

/// Seed of session-derived conversation keys ("kvtierco").
pub const CONVERSATION_SEED: u64 = 0x6b76_7469_6572_636f;

impl ConversationKey {
    /// The key of the conversation carrying session id `session`.
    #[must_use]
    pub fn of_session(session: &str) -> Self {
        Self(crate::prefix::xxh3_64_with_seed(session.as_bytes(), CONVERSATION_SEED))
    }

    /// The form it travels in (`kv_transfer_params`, residency events).
    #[must_use]
    pub fn to_hex(self) -> String {
        format!("{:016x}", self.0)
    }

    /// Parses [`ConversationKey::to_hex`].
    #[must_use]
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Self)
    }
}

/// A change in where a conversation's KV is on one node: the first of its chunks entered a
/// tier, or the last one left it. The agent streams these, one JSON object per line, on
/// `GET /residency` (current residency first, as `entered` events, then changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidencyEvent {
    /// Increasing per agent run; a gap means events were dropped (resubscribe).
    pub seq: u64,
    /// The conversation.
    pub conversation: ConversationKey,
    /// The tier.
    pub tier: Tier,
    /// True: entered; false: left.
    pub entered: bool,
    /// Chunks of the conversation in the tier after the change.
    pub chunks: u32,
}

impl ResidencyEvent {
    /// One line of the stream.
    #[must_use]
    pub fn to_json_line(&self) -> String {
        let tier = match self.tier {
            Tier::Dram => "dram",
            Tier::Nvme => "nvme",
            Tier::Absent | Tier::Busy => "none",
        };
        format!(
            "{{\"seq\":{},\"conversation\":\"{}\",\"tier\":\"{tier}\",\"event\":\"{}\",\"chunks\":{}}}\n",
            self.seq,
            self.conversation.to_hex(),
            if self.entered { "entered" } else { "left" },
            self.chunks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_keys_and_residency_lines() {
        let k = ConversationKey::of_session("abc");
        assert_eq!(k, ConversationKey::of_session("abc"));
        assert_ne!(k, ConversationKey::of_session("abd"));
        assert_eq!(ConversationKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(ConversationKey::from_hex("xyz"), None);
        let e = ResidencyEvent {
            seq: 7,
            conversation: ConversationKey(255),
            tier: Tier::Nvme,
            entered: false,
            chunks: 0,
        };
        assert_eq!(
            e.to_json_line(),
            "{\"seq\":7,\"conversation\":\"00000000000000ff\",\"tier\":\"nvme\",\"event\":\"left\",\"chunks\":0}\n"
        );
    }
}
