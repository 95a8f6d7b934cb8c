//! kvtier's vLLM KV connector, the Rust core: chunk keys from token ids, the scheduler side
//! (what the node's tiers hold, what to load and save each step), the worker side (copies
//! between the KV cache and the node-agent's pool), and the Python bindings the connector
//! class in `python/kvtier/connector.py` calls.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "rocm")]
pub mod hip;
pub mod layout;
pub mod link;
pub mod plan;
pub mod scheduler;
pub mod transfer;
pub mod worker;

#[cfg(feature = "python")]
mod python;

pub use layout::{block_layout, ChunkGeometry, TensorDesc};
pub use plan::{LoadJob, Plan, SaveJob};
pub use scheduler::{SchedulerConfig, SchedulerCore, Step};
pub use transfer::{HostCopy, Transfer};
pub use worker::{LoadReport, SaveReport, WorkerCore};
