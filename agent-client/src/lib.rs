//! The node-agent's client, for the processes that use the node's KV tiers: the connector
//! inside every engine worker, the bench, the tests. Blocking and small on purpose: no async
//! runtime, no HTTP, no io_uring (those serve the agent, not its clients).
//!
//! - [`client`]: attach over the agent's Unix socket, receive and map the pool, one request at
//!   a time ([`kvtier_api::agent`] is the protocol);
//! - [`pool`]: the client's view of the shared DRAM pool, and the chunk checksum.

pub mod client;
pub mod pool;

pub use client::{copy_and_checksum, Client, ClientError};
pub use pool::{checksum, MappedPool, MappedStaging};
