//! Router metrics, `kvtier_router_*`, with bounded label values only.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels naming a route and how the request ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `chat_completions`, `completions`, `messages`, `messages_count_tokens`, `responses`,
    /// `responses_by_id`, `models`, `other`.
    pub route: &'static str,
    /// A fixed outcome: `ok`, `upstream_status_4xx`, `bad_request`, …
    pub outcome: &'static str,
}

/// Label naming a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route.
    pub route: &'static str,
}

/// Label naming an endpoint (`host:port`, from the configured or discovered set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The endpoint.
    pub endpoint: String,
}

/// Label for a closed set of reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason.
    pub reason: &'static str,
}

/// Every router metric.
#[derive(Debug)]
pub struct Metrics {
    /// Requests by route and outcome.
    pub requests: Family<OutcomeLabels, Counter>,
    /// Time from the request's arrival to the first response body byte.
    pub time_to_first_byte: Family<RouteLabels, Histogram>,
    /// Routing decisions by reason.
    pub decisions: Family<ReasonLabels, Counter>,
    /// Requests that left their session's or conversation's home, by cause.
    pub moves: Family<ReasonLabels, Counter>,
    /// Retries on another endpoint, by cause.
    pub retries: Family<ReasonLabels, Counter>,
    /// Predicted matched prefix tokens on the chosen endpoint.
    pub predicted_prefix_tokens: Histogram,
    /// Requests in flight per endpoint.
    pub in_flight_requests: Family<EndpointLabels, Gauge>,
    /// Tokens of work in flight per endpoint.
    pub in_flight_tokens: Family<EndpointLabels, Gauge>,
    /// 1 when the endpoint is believed healthy.
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    /// Entries in the prefix index.
    pub index_chunks: Gauge,
    /// Session bindings held.
    pub sessions: Gauge,
    /// Stored responses whose endpoint is remembered.
    pub stored_responses: Gauge,
    /// Responses whose body broke after their head was sent.
    pub broken_responses: Family<RouteLabels, Counter>,
}

impl Metrics {
    /// Registers every metric under `registry` (prefix `kvtier_router`).
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("kvtier_router");
        let m = Self {
            requests: Family::default(),
            time_to_first_byte: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.5, 16))
            }),
            decisions: Family::default(),
            moves: Family::default(),
            retries: Family::default(),
            predicted_prefix_tokens: Histogram::new(exponential_buckets(256.0, 2.0, 12)),
            in_flight_requests: Family::default(),
            in_flight_tokens: Family::default(),
            endpoint_healthy: Family::default(),
            index_chunks: Gauge::default(),
            sessions: Gauge::default(),
            stored_responses: Gauge::default(),
            broken_responses: Family::default(),
        };
        r.register("requests", "Requests by route and outcome", m.requests.clone());
        r.register(
            "time_to_first_byte_seconds",
            "Time from request arrival to the first response body byte",
            m.time_to_first_byte.clone(),
        );
        r.register("routing_decisions", "Routing decisions by reason", m.decisions.clone());
        r.register(
            "session_moves",
            "Requests that left their conversation's endpoint, by cause",
            m.moves.clone(),
        );
        r.register("retries", "Attempts on another endpoint, by cause", m.retries.clone());
        r.register(
            "predicted_prefix_tokens",
            "Predicted matched prefix tokens on the chosen endpoint",
            m.predicted_prefix_tokens.clone(),
        );
        r.register(
            "endpoint_in_flight_requests",
            "Requests in flight per endpoint",
            m.in_flight_requests.clone(),
        );
        r.register(
            "endpoint_in_flight_tokens",
            "Tokens of work in flight per endpoint",
            m.in_flight_tokens.clone(),
        );
        r.register(
            "endpoint_healthy",
            "1 when the endpoint is believed healthy",
            m.endpoint_healthy.clone(),
        );
        r.register("prefix_index_chunks", "Entries in the prefix index", m.index_chunks.clone());
        r.register("sessions", "Session bindings held", m.sessions.clone());
        r.register(
            "broken_responses",
            "Responses whose body broke after the head was sent (the client saw a cut stream)",
            m.broken_responses.clone(),
        );
        r.register(
            "stored_responses",
            "Stored responses (Responses API) whose endpoint is remembered",
            m.stored_responses.clone(),
        );
        m
    }
}
