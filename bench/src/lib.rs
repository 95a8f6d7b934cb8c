//! Agent-trace replay against any OpenAI endpoint, its reports, and the local demo that runs
//! the whole stack (simulated engines, the router, the replay) in one process.

pub mod demo;
pub mod node_tiers;
pub mod plot;
pub mod replay;
pub mod report;
pub mod sources;
pub mod sse;
pub mod synth;
pub mod trace;
