//! kvtier's node-agent: one per node, owning the node's KV tiers and sharing them with every
//! engine replica on the node.
//!
//! - [`pool`]: the DRAM pool, one locked memfd in fixed-size slots that clients map
//!   read-only, and its staging area, which they write new chunks into;
//! - [`staging`]: who holds which staging slot, paired with the pool slot its chunk will be
//!   committed into;
//! - [`index`]: which chunk is in which slot, reservations, pins with leases, eviction in
//!   [`kvtier_api::eviction`]'s order (S3-FIFO by default, LRU: the simulator runs the same);
//! - [`nvme`]: the NVMe tier, one checked file per chunk, rebuilt after a restart, its writes
//!   batched through [`uring`] where the kernel offers io_uring;
//! - [`remote`]: the cluster-wide tier on an existing Redis or Valkey, shared by every node;
//! - [`agent`]: the shared state and the answer to each request;
//! - [`server`]: the Unix socket speaking [`kvtier_api::agent`];
//! - [`http`]: `/metrics` and the residency events (which conversations' chunks entered or
//!   left each tier);
//! - [`client`]: the blocking client (its own crate, `kvtier-agent-client`, so that engines
//!   link none of the above), re-exported for the agent's tests and tools.

pub mod agent;
pub use kvtier_agent_client::client;
pub mod http;
pub mod index;
pub mod nvme;
pub mod pool;
pub mod remote;
pub mod server;
pub mod staging;
pub mod uring;

pub use agent::Agent;
pub use client::Client;
pub use index::{Index, Lru};
pub use pool::{DramPool, LockMode, PoolConfig};
