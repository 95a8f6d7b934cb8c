//! What the agent's socket tests share: an agent on a fresh socket path, and chunk bytes.
#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;
use std::sync::Arc;

use kvtier_api::eviction::EvictionPolicy;
use kvtier_node_agent::nvme::NvmeTier;
use kvtier_node_agent::{server, Agent, DramPool, Index, LockMode, Lru, PoolConfig};

pub const SLOT: u32 = 512 * 1024;

/// Starts an agent with `slots` slots on a fresh socket path; returns the path.
pub fn start(slots: u32) -> (Socket, Arc<Agent>, tokio::runtime::Runtime) {
    start_with(slots, None)
}

/// As [`start`], with an NVMe tier in `nvme` when given.
pub fn start_with(
    slots: u32,
    nvme: Option<&std::path::Path>,
) -> (Socket, Arc<Agent>, tokio::runtime::Runtime) {
    start_mode(slots, nvme, false)
}

/// As [`start_with`], writing to NVMe at eviction when `write_back`.
pub fn start_mode(
    slots: u32,
    nvme: Option<&std::path::Path>,
    write_back: bool,
) -> (Socket, Arc<Agent>, tokio::runtime::Runtime) {
    start_policy(slots, nvme, write_back, Box::<Lru>::default())
}

/// As [`start_mode`], evicting in `policy`'s order.
pub fn start_policy(
    slots: u32,
    nvme: Option<&std::path::Path>,
    write_back: bool,
    policy: Box<dyn EvictionPolicy>,
) -> (Socket, Arc<Agent>, tokio::runtime::Runtime) {
    let mut agent = new_agent(slots, policy);
    if let Some(dir) = nvme {
        let (tier, _) = NvmeTier::open(dir, 64 << 20).expect("nvme tier");
        agent = agent.with_nvme(tier).nvme_write_back(write_back);
    }
    serve(agent)
}

/// An agent with `slots` slots of [`SLOT`] bytes, evicting in `policy`'s order.
pub fn new_agent(slots: u32, policy: Box<dyn EvictionPolicy>) -> Agent {
    Agent::new(pool(slots), Index::new(slots, SLOT, policy))
}

/// A DRAM pool of `slots` slots of [`SLOT`] bytes, locked if it can be.
pub fn pool(slots: u32) -> DramPool {
    DramPool::create(PoolConfig {
        bytes: u64::from(slots) * u64::from(SLOT),
        staging_bytes: None,
        slot_bytes: SLOT,
        lock: LockMode::BestEffort,
        huge_pages: false,
    })
    .expect("pool")
}

/// Serves `agent` on a fresh socket path, on a runtime of its own.
pub fn serve(agent: Agent) -> (Socket, Arc<Agent>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir =
        std::env::temp_dir().join(format!("kvtier-agent-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("agent.sock");
    let agent = Arc::new(agent);
    let listener = {
        let _g = rt.enter();
        server::bind(&path).expect("bind")
    };
    rt.spawn(server::serve(listener, agent.clone()));
    (Socket(path), agent, rt)
}

/// The agent's socket path; its folder is removed when the test drops it.
#[derive(Debug)]
pub struct Socket(pub PathBuf);

impl std::ops::Deref for Socket {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Socket {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn chunk(seed: u8) -> Vec<u8> {
    (0..SLOT as usize).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A fresh, absent folder for an NVMe tier, named after `tag` and this process.
pub fn nvme_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvtier-agent-nvme-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
