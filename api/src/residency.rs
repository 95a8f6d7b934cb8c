//! Which conversation a chunk belongs to, and where a conversation's KV is on a node: the
//! contract between the router, the connector and the node-agent (and the simulator, which
//! serves it as the node-agent does). The ledger, its events and the prefetch reply are
//! defined here, without I/O; `kvtier-serve`'s `node_tier` streams and serves them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

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
///
/// The remote tier is the cluster's, not the node's: a `remote` event says that this node
/// wrote the conversation's KV to the store, where it stays for `ttl_s` seconds unless the
/// store evicts it first. No agent sees the store's evictions, so there is no `left` for it;
/// its holders count it until the TTL lapses, on every node, even after the writer is gone.
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
    /// Chunks of the conversation in the tier after the change (0 for the remote tier).
    pub chunks: u32,
    /// Remote tier: seconds the store keeps what was written (0 for the node's own tiers).
    pub ttl_s: u32,
}

impl ResidencyEvent {
    /// Parses one line of the stream ([`ResidencyEvent::to_json_line`]); `None` when it is not
    /// one. A tier other than `dram`, `nvme` and `remote` reads as [`Tier::Absent`].
    #[must_use]
    pub fn from_json_line(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(Self {
            seq: v.get("seq")?.as_u64()?,
            conversation: ConversationKey::from_hex(v.get("conversation")?.as_str()?)?,
            tier: match v.get("tier")?.as_str()? {
                "dram" => Tier::Dram,
                "nvme" => Tier::Nvme,
                "remote" => Tier::Remote,
                _ => Tier::Absent,
            },
            entered: v.get("event")?.as_str()? == "entered",
            chunks: u32::try_from(v.get("chunks")?.as_u64()?).ok()?,
            ttl_s: v
                .get("ttl_s")
                .and_then(serde_json::Value::as_u64)
                .map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
        })
    }

    /// One line of the stream.
    #[must_use]
    pub fn to_json_line(&self) -> String {
        let tier = match self.tier {
            Tier::Dram => "dram",
            Tier::Nvme => "nvme",
            Tier::Remote => "remote",
            Tier::Absent | Tier::Busy => "none",
        };
        let ttl = if self.ttl_s > 0 { format!(",\"ttl_s\":{}", self.ttl_s) } else { String::new() };
        format!(
            "{{\"seq\":{},\"conversation\":\"{}\",\"tier\":\"{tier}\",\"event\":\"{}\",\"chunks\":{}{ttl}}}\n",
            self.seq,
            self.conversation.to_hex(),
            if self.entered { "entered" } else { "left" },
            self.chunks
        )
    }
}

/// Chunks per conversation in each node tier (DRAM, NVMe), and the events its changes make:
/// one when a conversation's first chunk enters a tier and one when its last leaves; and the
/// conversations this node wrote to the remote tier within its TTL. The node-agent and the
/// simulator's node tiers keep one each; the owner serialises changes and publishes the
/// events in the order they are returned.
#[derive(Debug, Default)]
pub struct ResidencyLedger {
    counts: HashMap<ConversationKey, [u32; 2]>,
    remote: HashMap<ConversationKey, RemoteNote>,
    seq: u64,
}

/// A conversation written to the remote tier: when that was last announced, and until when
/// the store keeps its latest write.
#[derive(Clone, Copy, Debug)]
struct RemoteNote {
    announced: Instant,
    expires: Instant,
}

/// Remote writes of a conversation within this share of the TTL of its last announcement
/// are not announced again (they only extend what its holders already count, by less).
const REMOTE_ANNOUNCE_EVERY: u32 = 8;

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
            ResidencyEvent {
                seq: self.seq,
                conversation,
                tier,
                entered: after > 0,
                chunks: after,
                ttl_s: 0,
            }
        })
    }

    /// This node wrote chunks of `conversation` to the remote tier at `now`, where they stay
    /// for `ttl`; the event when its holders should hear of it (the first write, or the first
    /// after an eighth of the TTL). Conversation 0 (unknown) is not announced.
    pub fn remote_written(
        &mut self,
        conversation: ConversationKey,
        ttl: Duration,
        now: Instant,
    ) -> Option<ResidencyEvent> {
        if conversation.0 == 0 || ttl.is_zero() {
            return None;
        }
        let expires = now + ttl;
        if let Some(n) = self.remote.get_mut(&conversation) {
            n.expires = expires;
            if now < n.announced + ttl / REMOTE_ANNOUNCE_EVERY {
                return None;
            }
            n.announced = now;
        } else {
            // Notes lapse with their TTL; drop the lapsed ones now and then.
            if self.remote.len() >= 1024 && self.remote.len().is_power_of_two() {
                self.remote.retain(|_, n| n.expires > now);
            }
            self.remote.insert(conversation, RemoteNote { announced: now, expires });
        }
        self.seq += 1;
        Some(ResidencyEvent {
            seq: self.seq,
            conversation,
            tier: Tier::Remote,
            entered: true,
            chunks: 0,
            ttl_s: ttl_secs(ttl),
        })
    }

    /// Chunks of `conversation` in `tier`.
    #[must_use]
    pub fn chunks(&self, conversation: ConversationKey, tier: Tier) -> u32 {
        slot(tier).and_then(|i| self.counts.get(&conversation).map(|c| c[i])).unwrap_or(0)
    }

    /// The current residency as `entered` events (what a new subscriber gets first): the
    /// node's tiers, then the remote writes whose TTL has not lapsed at `at`, with what is
    /// left of it.
    #[must_use]
    pub fn snapshot(&self, at: Instant) -> Vec<ResidencyEvent> {
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
                        ttl_s: 0,
                    });
                }
            }
        }
        for (conversation, n) in &self.remote {
            let left = n.expires.saturating_duration_since(at);
            if !left.is_zero() {
                now.push(ResidencyEvent {
                    seq: self.seq,
                    conversation: *conversation,
                    tier: Tier::Remote,
                    entered: true,
                    chunks: 0,
                    ttl_s: ttl_secs(left),
                });
            }
        }
        now
    }
}

/// Whole seconds of `ttl`, at least 1, at most `u32::MAX`.
fn ttl_secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX)
}

/// The member of a request's `kv_transfer_params` that carries its conversation (16 hex
/// digits), set by the router for the connector.
pub const CONVERSATION_PARAM: &str = "kvtier_conversation";

/// The share of a node's DRAM tier that holds may keep from eviction unless told otherwise:
/// holds are first come, first served, so unheld conversations always keep the rest.
pub const HOLD_SHARE: f64 = 0.25;

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

    /// Parses [`Hold::to_json`]'s text; `None` when it is not one.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        Self::from_json(&serde_json::from_str(text).ok()?)
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
            ttl_s: 0,
        };
        assert_eq!(
            e.to_json_line(),
            "{\"seq\":7,\"conversation\":\"00000000000000ff\",\"tier\":\"nvme\",\"event\":\"left\",\"chunks\":0}\n"
        );
        assert_eq!(ResidencyEvent::from_json_line(e.to_json_line().trim()), Some(e.clone()));
        assert_eq!(ResidencyEvent::from_json_line("{\"seq\":1}"), None);
        let r = ResidencyEvent { tier: Tier::Remote, entered: true, ttl_s: 3600, ..e };
        assert!(r
            .to_json_line()
            .contains("\"tier\":\"remote\",\"event\":\"entered\",\"chunks\":0,\"ttl_s\":3600}"));
        assert_eq!(ResidencyEvent::from_json_line(r.to_json_line().trim()), Some(r));
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
        assert_eq!(l.snapshot(Instant::now()).len(), 2);
        assert_eq!(l.change(c, Tier::Dram, false), None);
        let e = l.change(c, Tier::Dram, false).expect("last out");
        assert_eq!((e.seq, e.entered, e.chunks), (3, false, 0));
        assert_eq!(l.change(c, Tier::Dram, false), None, "never below zero");
        assert_eq!(l.change(ConversationKey(0), Tier::Dram, true), None, "unknown: not counted");
        assert_eq!(l.change(c, Tier::Busy, true), None);
        assert_eq!(l.change(c, Tier::Nvme, false).map(|e| e.seq), Some(4));
        assert!(l.snapshot(Instant::now()).is_empty());
    }

    #[test]
    fn remote_writes_are_announced_once_per_eighth_of_the_ttl_and_lapse_with_it() {
        let mut l = ResidencyLedger::default();
        let (c, ttl, t0) = (ConversationKey(9), Duration::from_secs(800), Instant::now());
        let e = l.remote_written(c, ttl, t0).expect("first write");
        assert_eq!((e.tier, e.entered, e.ttl_s, e.seq), (Tier::Remote, true, 800, 1));
        assert_eq!(l.remote_written(c, ttl, t0 + Duration::from_secs(99)), None);
        let e = l.remote_written(c, ttl, t0 + Duration::from_secs(100)).expect("an eighth on");
        assert_eq!(e.seq, 2);
        assert_eq!(l.remote_written(ConversationKey(0), ttl, t0), None, "unknown: not announced");
        assert_eq!(l.chunks(c, Tier::Remote), 0, "the store's chunks are not the node's");
        // A new subscriber hears of it with what is left of its TTL, until it lapses.
        let s = l.snapshot(t0 + Duration::from_secs(400));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].tier, s[0].ttl_s), (Tier::Remote, 500));
        assert!(l.snapshot(t0 + Duration::from_secs(900)).is_empty());
    }
}
