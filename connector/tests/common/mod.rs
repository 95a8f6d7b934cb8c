//! A node-agent on a fresh socket, for the tests.

pub mod cache;

use std::path::PathBuf;
use std::sync::Arc;

use kvtier_node_agent::nvme::NvmeTier;
use kvtier_node_agent::{server, Agent, DramPool, Index, LockMode, Lru, PoolConfig};

/// Bytes per pool slot.
pub const SLOT: u32 = 512 * 1024;

/// The agent's folder, removed on drop.
pub struct AgentDir(PathBuf);

impl Drop for AgentDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts an agent with `slots` slots of [`SLOT`] bytes; returns its folder guard, socket
/// path and the runtime serving it.
#[allow(dead_code)] // not every test binary uses both forms
pub fn start_agent(slots: u32, tag: &str) -> (AgentDir, PathBuf, tokio::runtime::Runtime) {
    let (d, p, rt, _) = start_agent_with(slots, tag);
    (d, p, rt)
}

/// As [`start_agent`], with the agent itself (to watch its residency).
pub fn start_agent_with(
    slots: u32,
    tag: &str,
) -> (AgentDir, PathBuf, tokio::runtime::Runtime, Arc<Agent>) {
    let dir = std::env::temp_dir().join(format!("kvtier-conn-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("agent.sock");
    let (rt, agent) = serve_agent(&path, slots);
    (AgentDir(dir), path, rt, agent)
}

/// As [`start_agent`], with an NVMe tier in the agent's folder that the DRAM tier spills to.
#[allow(dead_code)] // not every test binary uses every form
pub fn start_agent_nvme(slots: u32, tag: &str) -> (AgentDir, PathBuf, tokio::runtime::Runtime) {
    let dir = std::env::temp_dir().join(format!("kvtier-conn-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("nvme")).expect("dir");
    let path = dir.join("agent.sock");
    let (tier, _) = NvmeTier::open(&dir.join("nvme"), 64 << 20).expect("nvme tier");
    let (rt, _) = serve(&path, agent(slots).with_nvme(tier));
    (AgentDir(dir), path, rt)
}

/// As [`start_agent_with`], the agent also using the remote tier at `url` (a node of a
/// cluster-wide store: agents started so share what they save).
#[allow(dead_code)] // not every test binary uses every form
pub fn start_agent_remote(
    slots: u32,
    tag: &str,
    url: &str,
) -> (AgentDir, PathBuf, tokio::runtime::Runtime, Arc<Agent>) {
    let dir = std::env::temp_dir().join(format!("kvtier-conn-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("agent.sock");
    let cfg = kvtier_node_agent::remote::RemoteConfig::new(vec![url.to_owned()]);
    let tier = kvtier_node_agent::remote::RemoteTier::new(cfg).expect("remote tier");
    let (rt, agent) = serve(&path, agent(slots).with_remote(tier));
    (AgentDir(dir), path, rt, agent)
}

fn agent(slots: u32) -> Agent {
    let pool = DramPool::create(PoolConfig {
        bytes: u64::from(slots) * u64::from(SLOT),
        staging_bytes: None,
        slot_bytes: SLOT,
        lock: LockMode::Off,
        huge_pages: false,
    })
    .expect("pool");
    let index = Index::new(slots, SLOT, Box::<Lru>::default())
        .with_hold_share(kvtier_api::residency::HOLD_SHARE);
    Agent::new(pool, index)
}

fn serve(path: &std::path::Path, agent: Agent) -> (tokio::runtime::Runtime, Arc<Agent>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let agent = Arc::new(agent);
    let listener = {
        let _g = rt.enter();
        server::bind(path).expect("bind")
    };
    rt.spawn(server::serve(listener, agent.clone()));
    (rt, agent)
}

/// An agent with `slots` slots of [`SLOT`] bytes serving on `path` (a socket left there by an
/// earlier agent is replaced, as when the agent's pod restarts); dropping the runtime stops it
/// and closes its connections.
pub fn serve_agent(path: &std::path::Path, slots: u32) -> (tokio::runtime::Runtime, Arc<Agent>) {
    serve(path, agent(slots))
}
