//! Which conversation a chunk belongs to, and where a conversation's KV is on a node: the
//! contract between the router, the connector and the node-agent (and the simulator, which
//! serves it as the node-agent does). The ledger, its events and the prefetch reply are
//! defined here, without I/O; `kvtier-serve`'s `node_tier` streams and serves them.

use std::collections::HashMap;

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
    /// Parses one line of the stream ([`ResidencyEvent::to_json_line`]); `None` when it is not
    /// one. A tier other than `dram` and `nvme` reads as [`Tier::Absent`].
    #[must_use]
    pub fn from_json_line(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(Self {
            seq: v.get("seq")?.as_u64()?,
            conversation: ConversationKey::from_hex(v.get("conversation")?.as_str()?)?,
            tier: match v.get("tier")?.as_str()? {
                "dram" => Tier::Dram,
                "nvme" => Tier::Nvme,
                _ => Tier::Absent,
            },
            entered: v.get("event")?.as_str()? == "entered",
            chunks: u32::try_from(v.get("chunks")?.as_u64()?).ok()?,
        })
    }

    /// One line of the stream.
    #[must_use]
    pub fn to_json_line(&self) -> String {
        let tier = match self.tier {
            Tier::Dram => "dram",
            Tier::Nvme => "nvme",
            Tier::Absent | Tier::Busy | Tier::Remote => "none",
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

/// Chunks per conversation in each node tier (DRAM, NVMe), and the events its changes make:
/// one when a conversation's first chunk enters a tier and one when its last leaves. The
/// node-agent and the simulator's node tiers keep one each; the owner serialises changes and
/// publishes the events in the order they are returned.
#[derive(Debug, Default)]
pub struct ResidencyLedger {
    counts: HashMap<ConversationKey, [u32; 2]>,
    seq: u64,
}

/// The ledger's slot for `tier` (only DRAM and NVMe hold chunks).
fn slot(tier: Tier) -> Option<usize> {
    match tier {
        Tier::Dram => Some(0),
        Tier::Nvme => Some(1),
        Tier::Absent | Tier::Busy | Tier::Remote => None,
    }
}

impl ResidencyLedger {
    /// One chunk of `conversation` entered (`entered`) or left `tier`; the event when the
    /// conversation's count there moves from or to zero. Chunks of no known conversation
    /// (key 0) and tiers that hold nothing are not counted.
    pub fn change(
        &mut self,
        conversation: ConversationKey,
        tier: Tier,
        entered: bool,
    ) -> Option<ResidencyEvent> {
        let i = slot(tier)?;
        if conversation.0 == 0 {
            return None;
        }
        let c = self.counts.entry(conversation).or_insert([0, 0]);
        let before = c[i];
        let after = if entered { before.saturating_add(1) } else { before.saturating_sub(1) };
        c[i] = after;
        if *c == [0, 0] {
            self.counts.remove(&conversation);
        }
        ((before == 0) != (after == 0)).then(|| {
            self.seq += 1;
            ResidencyEvent { seq: self.seq, conversation, tier, entered: after > 0, chunks: after }
        })
    }

    /// Chunks of `conversation` in `tier`.
    #[must_use]
    pub fn chunks(&self, conversation: ConversationKey, tier: Tier) -> u32 {
        slot(tier).and_then(|i| self.counts.get(&conversation).map(|c| c[i])).unwrap_or(0)
    }

    /// The current residency as `entered` events (what a new subscriber gets first).
    #[must_use]
    pub fn snapshot(&self) -> Vec<ResidencyEvent> {
        let mut now = Vec::new();
        for (conversation, c) in &self.counts {
            for (tier, chunks) in [(Tier::Dram, c[0]), (Tier::Nvme, c[1])] {
                if chunks > 0 {
                    now.push(ResidencyEvent {
                        seq: self.seq,
                        conversation: *conversation,
                        tier,
                        entered: true,
                        chunks,
                    });
                }
            }
        }
        now
    }
}

/// The member of a request's `kv_transfer_params` that carries its conversation (16 hex
/// digits), set by the router for the connector.
pub const CONVERSATION_PARAM: &str = "kvtier_conversation";

/// The member of a request's `kv_transfer_params` that carries its [`Hold`].
pub const HOLD_PARAM: &str = "kvtier_hold";

/// What a client asked the server to keep warm (an Anthropic `cache_control` breakpoint):
/// the prompt's chunks up to `upto` of its length, for `ttl_s` seconds. The router measures
/// `upto` on the request's text (it cannot see tokens); the engine's side applies it to the
/// prompt's tokens, rounding down to whole chunks. ADR 0013.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hold {
    /// Seconds to keep the chunks resident.
    pub ttl_s: u32,
    /// The share of the prompt, from its start, to keep (0..=1).
    pub upto: f64,
}

impl Hold {
    /// The JSON value it travels as (`{"ttl_s":300,"upto":0.9731}`).
    #[must_use]
    pub fn to_json(self) -> String {
        format!("{{\"ttl_s\":{},\"upto\":{:.4}}}", self.ttl_s, self.upto.clamp(0.0, 1.0))
    }

    /// Reads [`Hold::to_json`]'s value; `None` when it is not one.
    #[must_use]
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let ttl_s = u32::try_from(v.get("ttl_s")?.as_u64()?).ok()?;
        let upto = v.get("upto")?.as_f64()?;
        (upto.is_finite() && (0.0..=1.0).contains(&upto)).then_some(Self { ttl_s, upto })
    }
}

/// The path of a prefetch: `POST /prefetch/<conversation hex>` brings the conversation's NVMe
/// chunks into DRAM (at most as many as DRAM holds).
#[must_use]
pub fn prefetch_path(conversation: ConversationKey) -> String {
    format!("/prefetch/{}", conversation.to_hex())
}

/// The conversation a prefetch path names ([`prefetch_path`]).
#[must_use]
pub fn prefetch_target(path: &str) -> Option<ConversationKey> {
    path.strip_prefix("/prefetch/").and_then(ConversationKey::from_hex)
}

/// A prefetch's answer: how many of the conversation's chunks are in DRAM afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchReply {
    /// Chunks of the conversation in DRAM once the prefetch is done.
    pub dram_chunks: u32,
}

impl PrefetchReply {
    /// The reply's body.
    #[must_use]
    pub fn to_json_line(self) -> String {
        format!("{{\"dram_chunks\":{}}}\n", self.dram_chunks)
    }

    /// Parses [`PrefetchReply::to_json_line`].
    #[must_use]
    pub fn from_json(body: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        Some(Self { dram_chunks: u32::try_from(v.get("dram_chunks")?.as_u64()?).ok()? })
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
        assert_eq!(ResidencyEvent::from_json_line(e.to_json_line().trim()), Some(e));
        assert_eq!(ResidencyEvent::from_json_line("{\"seq\":1}"), None);
        let p = prefetch_path(k);
        assert_eq!(prefetch_target(&p), Some(k));
        assert_eq!(prefetch_target("/prefetch/zz"), None);
        let r = PrefetchReply { dram_chunks: 12 };
        assert_eq!(PrefetchReply::from_json(&r.to_json_line()), Some(r));
    }

    #[test]
    fn the_ledger_reports_a_conversations_first_chunk_in_and_last_out() {
        let mut l = ResidencyLedger::default();
        let c = ConversationKey(7);
        let e = l.change(c, Tier::Dram, true).expect("first in");
        assert_eq!((e.seq, e.entered, e.chunks), (1, true, 1));
        assert_eq!(l.change(c, Tier::Dram, true), None, "the second chunk is no event");
        assert_eq!(l.change(c, Tier::Nvme, true).map(|e| e.tier), Some(Tier::Nvme));
        assert_eq!(l.chunks(c, Tier::Dram), 2);
        assert_eq!(l.snapshot().len(), 2);
        assert_eq!(l.change(c, Tier::Dram, false), None);
        let e = l.change(c, Tier::Dram, false).expect("last out");
        assert_eq!((e.seq, e.entered, e.chunks), (3, false, 0));
        assert_eq!(l.change(c, Tier::Dram, false), None, "never below zero");
        assert_eq!(l.change(ConversationKey(0), Tier::Dram, true), None, "unknown: not counted");
        assert_eq!(l.change(c, Tier::Busy, true), None);
        assert_eq!(l.change(c, Tier::Nvme, false).map(|e| e.seq), Some(4));
        assert!(l.snapshot().is_empty());
    }
}
