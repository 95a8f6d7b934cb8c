//! kvtier's router: an OpenAI-compatible proxy that keeps each agent conversation on the
//! engine replica that holds its KV.
//!
//! A request is read whole (bounded), validated, hashed over its entire prompt
//! ([`kvtier_api::prefix`]), matched against the prefix index ([`affinity`]) and the session
//! bindings ([`session`]), then sent to the endpoint of lowest cost ([`balance`]), its body
//! forwarded byte-identical and its response streamed back frame by frame. Failures before the
//! first response byte are retried on the next best endpoint.

mod affinity;
mod app;
mod balance;
mod body;
mod cli;
mod config;
mod discovery;
mod dispatch;
mod endpoint;
mod error;
mod handler;
mod health;
mod metrics;
mod models;
mod proxy;
pub mod request;
mod responses;
mod scan;
mod server;
mod session;
mod tiers;

pub use balance::{Reason, EXPECTED_OUTPUT_TOKENS};
pub use cli::{ConfigError, PodSelector, RouterArgs};
pub use config::{
    parse_bytes, parse_duration, AffinityConfig, ClientLimits, HealthConfig, Policy, RouterConfig,
    SessionConfig, SessionPlacement, TierConfig, UpstreamConfig,
};
pub use discovery::{Discovery, PodDiscovery, StaticDiscovery};
pub use endpoint::{EndpointSpec, EndpointSpecError};
pub use server::run;
pub use tiers::{GapModel, PrefetchConfig, TierCosts};
