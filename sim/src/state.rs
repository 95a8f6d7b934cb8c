//! What a simulated engine's request handlers share: its configuration, the channel to the
//! engine task, the figures that task publishes, its node tiers and the responses it stored.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use kvtier_serve::node_tier::NodeTierRoutes;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::clock::SimClock;
use crate::driver::{Msg, Snapshot};
use crate::engine::EngineConfig;
use crate::node::SimNode;

/// One simulated engine's state, shared by its handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) model: String,
    pub(crate) config: EngineConfig,
    pub(crate) clock: SimClock,
    pub(crate) tx: mpsc::UnboundedSender<Msg>,
    pub(crate) snapshot: Arc<Mutex<Snapshot>>,
    pub(crate) next_id: AtomicU64,
    /// Makes this engine's stored-response ids unlike any other engine's.
    pub(crate) id_salt: u64,
    pub(crate) profile: String,
    pub(crate) answer_tokens: Option<u32>,
    /// The node tier's routes (`/residency`, `/prefetch`) over its node tiers.
    pub(crate) node: NodeTierRoutes<SimNode>,
    /// The Responses API's stored responses.
    pub(crate) responses: Mutex<Stored>,
}

/// How many stored responses an engine keeps (oldest dropped first).
const STORED_RESPONSES: usize = 1024;

/// The responses this engine stored, newest last.
#[derive(Debug, Default)]
pub(crate) struct Stored(VecDeque<(String, Value)>);

impl Stored {
    pub(crate) fn put(&mut self, id: String, response: Value) {
        if self.0.len() == STORED_RESPONSES {
            self.0.pop_front();
        }
        self.0.push_back((id, response));
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.0.iter().any(|(i, _)| i == id)
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Value> {
        self.0.iter().find(|(i, _)| i == id).map(|(_, v)| v)
    }
}
