//! kvtier's engine simulator: a vLLM-compatible OpenAI server whose engine is a model of
//! continuous batching, chunked prefill, an HBM prefix cache and host KV tiers, run at a
//! chosen multiple of real time. Routing and tiering are measured with it on real agent
//! traces, without GPUs.

pub mod clock;
mod driver;
pub mod engine;
mod metrics;
mod node;
pub mod plan;
pub mod profile;
pub mod server;
mod state;
mod sync;
pub mod tokens;

pub use clock::SimClock;
pub use engine::{Engine, EngineConfig, Strategy};
pub use profile::Profile;
pub use server::{Sim, SimOptions, Snapshot};
