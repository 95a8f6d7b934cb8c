//! kvtier's operator: reconciles a `KVCachedInference` into engine replicas with the flags
//! their KV strategy needs, kvtier's router in front, and the node-agent where a tier is used.
//!
//! So far: [`engine`], the pure builder of the engine's command line and environment (also
//! what the resource's status reports). The reconcile loop, the other objects and the
//! end-to-end tests against a real API server are the rest of issue 4.

pub mod engine;
