//! Choosing the endpoint for a request and remembering where it went: the glue between the
//! endpoint set, the prefix index, the session table and the pure decision in
//! [`crate::balance`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvtier_api::prefix::model_seed;

use crate::affinity::{Match, PrefixIndex, Prompt};
use crate::balance::{
    self, Ask, Candidate, Decision, Home, HomeKind, Reason, EXPECTED_OUTPUT_TOKENS,
};
use crate::config::{Policy, RouterConfig};
use crate::endpoint::{Endpoint, EndpointChange, EndpointId, EndpointSpec, Endpoints, LoadGuard};
use crate::request::PromptView;
use crate::responses::ResponseOwners;
use crate::session::{SessionKey, SessionTable};
use crate::tiers::TierRouting;
use kvtier_api::residency::ConversationKey;

/// Affinity state shared by every request.
#[derive(Debug)]
struct State {
    index: PrefixIndex,
    sessions: SessionTable,
}

/// What the router knows about one request, computed once before the first attempt.
#[derive(Debug)]
pub struct Routing<'a> {
    prompt: Prompt<'a>,
    prompt_tokens: u64,
    session: Option<SessionKey>,
    conversation: Option<ConversationKey>,
    matched: Match,
    home: Option<Home>,
    /// The endpoint that stored the response this request continues: nowhere else can serve it.
    owner: Option<EndpointId>,
    /// Output tokens this request is expected to produce.
    expected_output_tokens: u64,
}

/// Chooses endpoints and records placements.
#[derive(Debug)]
pub struct Dispatcher {
    policy: Policy,
    chunk_bytes: usize,
    bytes_per_token: u64,
    overload_bound: u64,
    endpoints: Endpoints,
    // std Mutex: held for microseconds of map work and never across an await.
    state: Mutex<State>,
    next_round_robin: AtomicUsize,
    tiers: Option<Arc<TierRouting>>,
    placement: crate::config::SessionPlacement,
    owners: Arc<ResponseOwners>,
}

/// How many stored responses' endpoints are remembered (about 100 bytes each).
const RESPONSE_OWNERS: usize = 1 << 16;

impl Dispatcher {
    /// A dispatcher with no endpoints yet.
    #[must_use]
    pub fn new(config: &RouterConfig) -> Self {
        Self {
            policy: config.policy,
            chunk_bytes: config.affinity.chunk_bytes.get(),
            bytes_per_token: u64::from(config.affinity.bytes_per_token.get()),
            overload_bound: config.affinity.overload_bound_tokens,
            endpoints: Endpoints::default(),
            state: Mutex::new(State {
                index: PrefixIndex::new(config.affinity.index_capacity.get()),
                sessions: SessionTable::new(config.session.idle_ttl, config.session.capacity),
            }),
            next_round_robin: AtomicUsize::new(0),
            tiers: config.tiers.as_ref().map(|t| {
                Arc::new(
                    TierRouting::new(t.costs, t.chunk_tokens)
                        .with_control_token(t.control_token.clone()),
                )
            }),
            placement: config.session.placement,
            owners: Arc::new(ResponseOwners::new(RESPONSE_OWNERS)),
        }
    }

    /// Which endpoint stored which response.
    pub fn response_owners(&self) -> &Arc<ResponseOwners> {
        &self.owners
    }

    /// The home rendezvous hashing gives a session without a binding, among the healthy
    /// endpoints (all of them when none is).
    fn hashed_home(&self, key: SessionKey) -> Option<EndpointId> {
        let endpoints = self.endpoints();
        let healthy: Vec<&Arc<Endpoint>> =
            endpoints.iter().filter(|e| e.health.is_healthy()).collect();
        let pool: Vec<&Arc<Endpoint>> =
            if healthy.is_empty() { endpoints.iter().collect() } else { healthy };
        let name = key.rendezvous(pool.iter().map(|e| e.name.as_str()))?;
        pool.iter().find(|e| e.name == name).map(|e| e.id)
    }

    /// The tier-aware state, when on (the residency feeds write into it).
    pub fn tiers(&self) -> Option<&Arc<TierRouting>> {
        self.tiers.as_ref()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters for routing, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Arc<[Arc<Endpoint>]> {
        self.endpoints.snapshot()
    }

    /// Applies a new endpoint set from discovery.
    pub fn set_endpoints(&self, specs: &[EndpointSpec]) -> EndpointChange {
        let change = self.endpoints.replace(specs);
        if !change.removed.is_empty() {
            let mut state = self.state();
            for e in &change.removed {
                state.index.forget(e.id);
            }
        }
        change
    }

    fn tokens(&self, bytes: usize) -> u64 {
        (bytes as u64).div_ceil(self.bytes_per_token)
    }

    /// Hashes the prompt and looks up its session and prefix.
    pub fn prepare<'a>(
        &self,
        view: &'a PromptView<'a>,
        session: Option<SessionKey>,
        conversation: Option<ConversationKey>,
        now: Instant,
    ) -> Routing<'a> {
        let chunks = if self.policy == Policy::Affinity {
            view.segments.chunk_hashes(model_seed(view.model), self.chunk_bytes)
        } else {
            Vec::new()
        };
        let prompt = Prompt { chunks, stream: &view.segments, chunk_bytes: self.chunk_bytes };
        let (matched, home) = if self.policy == Policy::Affinity {
            let mut state = self.state();
            let bound = session.and_then(|k| state.sessions.get(k, now));
            let matched = state.index.lookup(&prompt);
            let home = match (bound, matched.continues) {
                (Some(endpoint), _) => Some(Home { endpoint, kind: HomeKind::Session }),
                (None, Some(endpoint)) => Some(Home { endpoint, kind: HomeKind::Continuation }),
                (None, None) => match (self.placement, session) {
                    (crate::config::SessionPlacement::Hash, Some(k)) => {
                        drop(state);
                        self.hashed_home(k)
                            .map(|endpoint| Home { endpoint, kind: HomeKind::Session })
                    }
                    _ => None,
                },
            };
            (matched, home)
        } else {
            (Match::default(), None)
        };
        let owner = view.previous_response.as_deref().and_then(|id| self.owners.owner(id));
        Routing {
            owner,
            prompt_tokens: self.tokens(view.segments.len()),
            prompt,
            session,
            conversation,
            matched,
            home,
            expected_output_tokens: view
                .max_output_tokens
                .map_or(EXPECTED_OUTPUT_TOKENS, |m| m.min(EXPECTED_OUTPUT_TOKENS)),
        }
    }

    /// Chooses an endpoint not in `exclude` and accounts the request's work on it; `None`
    /// when no endpoint is left.
    ///
    /// The choice and the accounting happen under one lock, so requests deciding at the same
    /// time on different threads see each other's load instead of all picking the same
    /// least-loaded endpoint.
    pub fn choose(
        &self,
        routing: &Routing<'_>,
        exclude: &[EndpointId],
    ) -> Option<(LoadGuard, Decision)> {
        let endpoints = self.endpoints();
        let state = self.state();
        let owner = routing.owner.filter(|o| endpoints.iter().any(|e| e.id == *o));
        let decision = match (owner, self.policy) {
            (Some(owner), _) => {
                if exclude.contains(&owner) {
                    return None;
                }
                let matched = self.tokens(routing.matched.chunks_on(owner) * self.chunk_bytes);
                Decision {
                    endpoint: owner,
                    reason: Reason::ResponseOwner,
                    matched_tokens: matched,
                    uncached_tokens: routing.prompt_tokens.saturating_sub(matched),
                    moved: None,
                }
            }
            (None, Policy::Affinity) => {
                let candidates: Vec<Candidate> = endpoints
                    .iter()
                    .map(|e| {
                        let hbm = self.tokens(routing.matched.chunks_on(e.id) * self.chunk_bytes);
                        Candidate {
                            id: e.id,
                            healthy: e.health.is_healthy(),
                            in_flight_tokens: e.load.tokens(),
                            resident_tokens: self.tokens(
                                usize::try_from(state.index.resident_bytes(e.id))
                                    .unwrap_or(usize::MAX),
                            ) + e.load.placing_tokens(),
                            matched_tokens: self.with_tiers(routing, e, hbm),
                        }
                    })
                    .collect();
                balance::choose(
                    &candidates,
                    &Ask {
                        prompt_tokens: routing.prompt_tokens,
                        home: routing.home,
                        exclude,
                        overload_bound: self.overload_bound,
                    },
                )?
            }
            (None, Policy::LeastLoad | Policy::RoundRobin) => {
                self.choose_plain(&endpoints, routing, exclude)?
            }
        };
        let endpoint = endpoints.iter().find(|e| e.id == decision.endpoint)?.clone();
        let guard =
            LoadGuard::new(endpoint, decision.uncached_tokens, routing.expected_output_tokens);
        // A conversation new to this endpoint brings its whole context along.
        let arrives = routing.home.is_none_or(|h| h.endpoint != decision.endpoint);
        let guard = if self.policy == Policy::Affinity && arrives {
            guard.placing(routing.prompt_tokens)
        } else {
            guard
        };
        drop(state);
        Some((guard, decision))
    }

    /// A candidate's predicted match counting what its node's tiers hold of the conversation,
    /// valued at what loading it saves.
    fn with_tiers(&self, routing: &Routing<'_>, e: &Endpoint, hbm: u64) -> u64 {
        let (Some(t), Some(c), Some(node)) = (&self.tiers, routing.conversation, e.spec.node())
        else {
            return hbm;
        };
        let held = t.holding_for(c, node, routing.prompt_tokens);
        let saved = crate::tiers::saved_tokens(routing.prompt_tokens, hbm, held, t.costs);
        // Truncation keeps the estimate on the safe side.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let saved = saved as u64;
        hbm.max(saved)
    }

    fn choose_plain(
        &self,
        endpoints: &[Arc<Endpoint>],
        routing: &Routing<'_>,
        exclude: &[EndpointId],
    ) -> Option<Decision> {
        let open: Vec<&Arc<Endpoint>> =
            endpoints.iter().filter(|e| !exclude.contains(&e.id)).collect();
        let healthy: Vec<&Arc<Endpoint>> =
            open.iter().copied().filter(|e| e.health.is_healthy()).collect();
        let (pool, reason) =
            if healthy.is_empty() { (open, Reason::Fallback) } else { (healthy, Reason::Load) };
        let chosen = match self.policy {
            Policy::RoundRobin => {
                let n = self.next_round_robin.fetch_add(1, Ordering::Relaxed);
                *pool.get(n % pool.len().max(1))?
            }
            _ => *pool.iter().min_by_key(|e| (e.load.tokens(), e.id))?,
        };
        Some(Decision {
            endpoint: chosen.id,
            reason,
            matched_tokens: 0,
            uncached_tokens: routing.prompt_tokens,
            moved: None,
        })
    }

    /// Records that the guard's endpoint accepted the request: its prefix and its
    /// conversation's context are now there, and its session is bound there.
    pub fn record(&self, routing: &Routing<'_>, guard: &mut LoadGuard, now: Instant) {
        if self.policy != Policy::Affinity {
            return;
        }
        let endpoint = guard.endpoint().id;
        if let (Some(t), Some(c)) = (&self.tiers, routing.conversation) {
            t.saw(c, routing.prompt_tokens);
        }
        let mut state = self.state();
        state.index.insert(&routing.prompt, endpoint, &routing.matched);
        guard.placed();
        if let Some(key) = routing.session {
            state.sessions.bind(key, endpoint, now);
        }
    }

    /// Drops idle session bindings.
    pub fn sweep(&self, now: Instant) {
        self.state().sessions.sweep(now);
    }

    /// (prefix-index entries, session bindings), for gauges.
    pub fn sizes(&self) -> (usize, usize) {
        let state = self.state();
        (state.index.len(), state.sessions.len())
    }
}
