//! A simulated replica's node tiers as the node-agent serves its own
//! ([`kvtier_serve::node_tier`]): the residency stream and prefetch, and the conversation a
//! request's KV is attributed to.

use std::sync::Arc;

use http::Request;
use kvtier_api::residency::{ConversationKey, PrefetchReply};
use kvtier_serve::node_tier::{NodeTier, Subscription};

use crate::clock::SimClock;
use crate::engine::HostTiers;

/// The node tiers one replica writes through to (shared with its node's other replicas), and
/// what a prefetch costs.
#[derive(Debug)]
pub(crate) struct SimNode {
    pub(crate) tiers: HostTiers,
    /// Bytes of one block, and NVMe's read bandwidth in bytes per simulated second.
    pub(crate) block_bytes: f64,
    pub(crate) nvme_bytes_per_s: f64,
    pub(crate) clock: SimClock,
}

impl NodeTier for SimNode {
    fn subscribe(&self) -> Subscription {
        self.tiers.subscribe()
    }

    /// The blocks move from NVMe to DRAM after the time reading them takes at the profile's
    /// NVMe bandwidth (simulated).
    async fn prefetch(self: Arc<Self>, conversation: ConversationKey) -> PrefetchReply {
        let blocks = self.tiers.nvme_blocks_of(conversation);
        let seconds = blocks.len() as f64 * self.block_bytes / self.nvme_bytes_per_s;
        let real = seconds / self.clock.scale();
        if real.is_finite() && real > 0.0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(real)).await;
        }
        self.tiers.promote(&blocks, conversation, self.clock.now());
        PrefetchReply { dram_chunks: self.tiers.dram_blocks_of(conversation) }
    }
}

/// The conversation a request belongs to, from its session header.
pub(crate) fn conversation_of<B>(req: &Request<B>) -> ConversationKey {
    ["x-session-id", "x-claude-code-session-id"]
        .iter()
        .find_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()))
        .map_or(ConversationKey(0), ConversationKey::of_session)
}
