//! Types and contracts shared by every kvtier part. No I/O lives here.
//!
//! - [`prefix`]: how the router hashes a request's text into chained chunk hashes, so that
//!   every router replica (and, later, residency events) agree on what a prefix is.
//! - [`session`]: which request headers carry an agent session id.
//! - [`chunk`]: how token ids name KV chunks in the node-agent's tiers.
//! - [`agent`]: the node-agent's wire protocol.
//! - [`residency`]: conversation keys and residency events (router, connector, agent).
//! - [`crd`]: the `KVCachedInference` custom resource and the checks on its spec.

pub mod agent;
pub mod chunk;
pub mod crd;
pub mod eviction;
pub mod prefix;
pub mod residency;
pub mod session;
pub mod units;
pub mod wire;
