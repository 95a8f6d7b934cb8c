//! kvtier's operator: reconciles a `KVCachedInference` into engine replicas with the flags
//! their KV strategy needs, kvtier's router in front, and the node-agent where a tier is used.

pub mod cli;
pub mod controller;
pub mod engine;
pub mod metrics;
pub mod objects;
pub mod status;
