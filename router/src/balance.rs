//! The routing decision, as pure code over plain data.
//!
//! # Cost, in tokens of engine work
//!
//! For a request of `P` prompt tokens and an endpoint `E` with a predicted prefix match of
//! `M(E)` tokens, `L(E)` tokens of in-flight work and `R(E)` tokens of resident context (the
//! latest prompt of every conversation living on `E`):
//!
//! ```text
//! cost(E)     = (P − M(E)) + L(E)            the prefill E must do + the work queued before it
//! cost_new(E) = cost(E) + R(E)               for a conversation that has no home yet
//! ```
//!
//! Both terms of `cost` are in the unit vLLM schedules: tokens of the per-step token budget
//! (`max_num_batched_tokens`); each uncached prompt token and each output token takes one.
//! `L(E)` counts, for every request in flight on `E`, its predicted uncached prompt tokens
//! until its first response byte, plus its expected output tokens until it ends (see
//! [`EXPECTED_OUTPUT_TOKENS`]). So `cost(E)` is, up to the engine's speed, the time before
//! this request's first token on `E`.
//!
//! `R(E)` spreads *new* conversations. Their prefix match is only what they share with
//! others (a system prompt, the tool list), a one-time saving, while the endpoint that gets
//! them will hold their context and serve every later turn, each turn's work growing with
//! it. Adding the context already living on `E` makes a new conversation prefer the endpoint
//! with the least of it unless the shared prefix saves more than the imbalance: conversations
//! that share only a system prompt do not pile onto the endpoint that saw it first. And a new
//! conversation is only placed where `R(E) ≤ min R + P`: the transient queue term `L` (an
//! endpoint whose requests just finished looks cheaper than one still prefilling) can then
//! never run one endpoint more than two conversations of this size ahead of the least loaded.
//!
//! # Decision
//!
//! 1. A request with a *home* (a bound session, or the endpoint that served the turn this
//!    request continues) stays there while the home is healthy and
//!    `cost(home) ≤ min cost(E) + overload_bound`. Reason `session` or `prefix`.
//! 2. Otherwise (no home, home gone or unhealthy, home overloaded) the healthy endpoint with
//!    the lowest `cost_new` among those with `R(E) ≤ min R + P` (for no home or a dead
//!    home) or the lowest `cost` (overloaded home) wins; reason `prefix` when the winner's
//!    predicted match beats the others', else `load`.
//! 3. If no endpoint is healthy, the same rule runs over all of them (health may be stale,
//!    and trying beats refusing): reason `fallback`.
//!
//! Ties go to fewer in-flight tokens, then less resident context, then the lower id.

use crate::endpoint::EndpointId;

/// Output tokens expected from a request that does not cap them lower: the median output of
/// the Claude Code traces in `shared/traces` (216 tokens; median input is 104k tokens, so
/// prefill dominates an agent turn's work).
pub const EXPECTED_OUTPUT_TOKENS: u64 = 216;

/// One endpoint as the decision sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Which endpoint.
    pub id: EndpointId,
    /// Believed to serve.
    pub healthy: bool,
    /// `L(E)`: in-flight work in tokens.
    pub in_flight_tokens: u64,
    /// `R(E)`: resident context of the conversations living on it, in tokens.
    pub resident_tokens: u64,
    /// `M(E)`: predicted prefix match for this request, in tokens.
    pub matched_tokens: u64,
}

/// Why a request has a home.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HomeKind {
    /// Its session is bound there.
    Session,
    /// The turn it continues was served there.
    Continuation,
}

/// Where the request's conversation lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Home {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// How it was found.
    pub kind: HomeKind,
}

/// Why an endpoint was chosen: a closed set, counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The session's binding.
    Session,
    /// The predicted prefix match (a continuation, or the best match for a new request).
    Prefix,
    /// Load alone.
    Load,
    /// No endpoint was healthy; the least costly one was tried anyway.
    Fallback,
    /// The request continues a response only one endpoint stored.
    ResponseOwner,
}

impl Reason {
    /// Fixed metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Reason::Session => "session",
            Reason::Prefix => "prefix",
            Reason::Load => "load",
            Reason::Fallback => "fallback",
            Reason::ResponseOwner => "response_owner",
        }
    }
}

/// Why a request with a home was sent elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Move {
    /// The home is unhealthy, gone, or already failed this request.
    HomeUnavailable,
    /// The home's cost exceeded the best by more than the overload bound.
    HomeOverloaded,
}

impl Move {
    /// Fixed metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Move::HomeUnavailable => "home_unavailable",
            Move::HomeOverloaded => "home_overloaded",
        }
    }
}

/// The outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Where to send the request.
    pub endpoint: EndpointId,
    /// Why.
    pub reason: Reason,
    /// Predicted matched tokens on the chosen endpoint.
    pub matched_tokens: u64,
    /// Predicted prefill tokens on the chosen endpoint.
    pub uncached_tokens: u64,
    /// Set when a request with a home left it.
    pub moved: Option<Move>,
}

/// What the decision needs to know about the request.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    /// `P`: prompt tokens.
    pub prompt_tokens: u64,
    /// Its conversation's home, if any.
    pub home: Option<Home>,
    /// Endpoints this request already failed on (retries).
    pub exclude: &'a [EndpointId],
    /// Extra cost a home may carry over the best endpoint before the request moves.
    pub overload_bound: u64,
}

fn cost(ask: &Ask<'_>, c: &Candidate) -> u64 {
    ask.prompt_tokens.saturating_sub(c.matched_tokens) + c.in_flight_tokens
}

fn cost_new(ask: &Ask<'_>, c: &Candidate) -> u64 {
    cost(ask, c) + c.resident_tokens
}

fn best<'c>(
    pool: impl Iterator<Item = &'c Candidate>,
    f: impl Fn(&Candidate) -> u64,
) -> Option<&'c Candidate> {
    pool.min_by_key(|c| (f(c), c.in_flight_tokens, c.resident_tokens, c.id))
}

/// Chooses an endpoint for one request. `None` only when every candidate is excluded.
#[must_use]
pub fn choose(candidates: &[Candidate], ask: &Ask<'_>) -> Option<Decision> {
    let open = || candidates.iter().filter(|c| !ask.exclude.contains(&c.id));
    let any_healthy = open().any(|c| c.healthy);
    let pool = || open().filter(move |c| c.healthy || !any_healthy);

    let decide = |c: &Candidate, reason: Reason, moved: Option<Move>| {
        let reason = if any_healthy { reason } else { Reason::Fallback };
        Decision {
            endpoint: c.id,
            reason,
            matched_tokens: c.matched_tokens,
            uncached_tokens: ask.prompt_tokens.saturating_sub(c.matched_tokens),
            moved,
        }
    };
    let by_match = |c: &Candidate| {
        if c.matched_tokens > 0 && pool().any(|o| o.matched_tokens < c.matched_tokens) {
            Reason::Prefix
        } else {
            Reason::Load
        }
    };

    // A new conversation may go only where the resident context is within one conversation
    // of this size of the least: whatever the timing of concurrent decisions, no endpoint
    // runs more than two such conversations ahead.
    let min_resident = pool().map(|c| c.resident_tokens).min().unwrap_or(0);
    let settle = || {
        let window = min_resident.saturating_add(ask.prompt_tokens);
        best(pool().filter(|c| c.resident_tokens <= window), |c| cost_new(ask, c))
    };
    let Some(home) = ask.home else {
        let c = settle()?;
        return Some(decide(c, by_match(c), None));
    };
    let Some(at_home) = pool().find(|c| c.id == home.endpoint && (c.healthy || !any_healthy))
    else {
        let c = settle()?;
        return Some(decide(c, by_match(c), Some(Move::HomeUnavailable)));
    };
    let c = best(pool(), |c| cost(ask, c))?;
    if cost(ask, at_home) <= cost(ask, c).saturating_add(ask.overload_bound) {
        let reason = match home.kind {
            HomeKind::Session => Reason::Session,
            HomeKind::Continuation => Reason::Prefix,
        };
        return Some(decide(at_home, reason, None));
    }
    Some(decide(c, by_match(c), Some(Move::HomeOverloaded)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: u32, in_flight: u64, held: u64, matched: u64) -> Candidate {
        Candidate {
            id: EndpointId::new(id),
            healthy: true,
            in_flight_tokens: in_flight,
            resident_tokens: held,
            matched_tokens: matched,
        }
    }

    fn ask(prompt: u64, home: Option<(u32, HomeKind)>) -> Ask<'static> {
        Ask {
            prompt_tokens: prompt,
            home: home.map(|(e, kind)| Home { endpoint: EndpointId::new(e), kind }),
            exclude: &[],
            overload_bound: 8192,
        }
    }

    #[test]
    fn session_sticks_when_other_endpoints_are_idle() {
        // Home carries 5k tokens more work than the idle endpoint: within the 8k bound.
        let cands = [cand(1, 5_000, 0, 0), cand(2, 0, 0, 0)];
        let d = choose(&cands, &ask(1000, Some((1, HomeKind::Session)))).expect("decision");
        assert_eq!((d.endpoint, d.reason), (EndpointId::new(1), Reason::Session));
    }

    #[test]
    fn session_moves_when_its_home_is_overloaded_beyond_the_bound() {
        let cands = [cand(1, 30_000, 0, 0), cand(2, 0, 0, 0)];
        let d = choose(&cands, &ask(1000, Some((1, HomeKind::Session)))).expect("decision");
        assert_eq!(d.endpoint, EndpointId::new(2));
        assert_eq!(d.moved, Some(Move::HomeOverloaded));
    }

    #[test]
    fn a_long_cached_prefix_outweighs_a_queue_shorter_than_itself() {
        // 100k cached on 1 with a 60k queue beats a cold idle endpoint: 61k < 100k.
        let cands = [cand(1, 60_000, 0, 99_000), cand(2, 0, 0, 0)];
        let d = choose(&cands, &ask(100_000, Some((1, HomeKind::Continuation)))).expect("d");
        assert_eq!((d.endpoint, d.reason), (EndpointId::new(1), Reason::Prefix));
        assert_eq!(d.uncached_tokens, 1_000);
    }

    #[test]
    fn a_dead_home_is_left_for_the_cheapest_healthy_endpoint() {
        let mut cands = [cand(1, 0, 0, 5_000), cand(2, 0, 9, 0), cand(3, 0, 1, 0)];
        cands[0].healthy = false;
        let d = choose(&cands, &ask(5_000, Some((1, HomeKind::Session)))).expect("d");
        assert_eq!(d.endpoint, EndpointId::new(3));
        assert_eq!((d.reason, d.moved), (Reason::Load, Some(Move::HomeUnavailable)));
    }

    #[test]
    fn new_conversations_sharing_a_system_prompt_spread_by_resident_context() {
        // Endpoint 1 holds the 2k-token system prompt and one 12k conversation.
        let cands = [cand(1, 0, 12_000, 2_000), cand(2, 0, 0, 0)];
        let d = choose(&cands, &ask(12_000, None)).expect("d");
        assert_eq!((d.endpoint, d.reason), (EndpointId::new(2), Reason::Load));
        // Once every endpoint holds about as much, the shared prefix decides.
        let cands = [cand(1, 0, 12_000, 2_000), cand(2, 0, 11_000, 0)];
        let d = choose(&cands, &ask(12_000, None)).expect("d");
        assert_eq!((d.endpoint, d.reason), (EndpointId::new(1), Reason::Prefix));
    }

    #[test]
    fn a_new_conversation_never_lands_more_than_one_conversation_above_the_least_resident() {
        // Endpoint 1 finished its requests (no queue) and holds the shared prefix; endpoint 2
        // is still prefilling new conversations. Cost alone would pick 1 again and again.
        let cands = [cand(1, 0, 2 * 2_800, 2_000), cand(2, 2 * 2_900, 2_800, 0)];
        let d = choose(&cands, &ask(2_800, None)).expect("d");
        assert_eq!(d.endpoint, EndpointId::new(1), "within one conversation of the least");
        let cands = [cand(1, 0, 3 * 2_800, 2_000), cand(2, 2 * 2_900, 2_800, 0)];
        let d = choose(&cands, &ask(2_800, None)).expect("d");
        assert_eq!(d.endpoint, EndpointId::new(2), "two conversations ahead: excluded");
    }

    #[test]
    fn unhealthy_everywhere_falls_back_instead_of_refusing() {
        let mut cands = [cand(1, 5, 0, 0), cand(2, 0, 0, 0)];
        cands.iter_mut().for_each(|c| c.healthy = false);
        let d = choose(&cands, &ask(10, None)).expect("d");
        assert_eq!((d.endpoint, d.reason), (EndpointId::new(2), Reason::Fallback));
    }

    #[test]
    fn excluded_endpoints_are_never_chosen() {
        let cands = [cand(1, 0, 0, 10), cand(2, 50, 0, 0)];
        let ex = [EndpointId::new(1)];
        let a = Ask { exclude: &ex, ..ask(10, Some((1, HomeKind::Session))) };
        let d = choose(&cands, &a).expect("d");
        assert_eq!((d.endpoint, d.moved), (EndpointId::new(2), Some(Move::HomeUnavailable)));
        let all = [EndpointId::new(1), EndpointId::new(2)];
        assert!(choose(&cands, &Ask { exclude: &all, ..ask(10, None) }).is_none());
    }

    #[test]
    fn ties_go_to_less_in_flight_then_less_held_then_lower_id() {
        let cands = [cand(3, 0, 0, 0), cand(2, 0, 0, 0), cand(1, 0, 5, 0)];
        assert_eq!(choose(&cands, &ask(10, None)).map(|d| d.endpoint), Some(EndpointId::new(2)));
    }
}
