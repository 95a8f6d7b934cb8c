//! A host-memory KV cache shaped as vLLM's FlashAttention lays it out (one tensor per layer,
//! `(2, blocks, block_size, heads, head_dim)`), and the scheduler and workers of two
//! tensor-parallel ranks attached to an agent.
#![allow(dead_code)] // not every test binary uses every helper

use std::time::Duration;

use kvtier_api::chunk::KvLayout;
use kvtier_connector::{HostCopy, SchedulerConfig, SchedulerCore, TensorDesc, WorkerCore};

pub const BLOCKS: usize = 40;
pub const BLOCK: usize = 16;
pub const HEADS: usize = 8;
pub const DIM: usize = 128;
pub const LAYERS: usize = 2;
pub const CHUNK: usize = 128; // 8 blocks: 2 layers x 2 (K, V) x 8 x 32 KiB = 1 MiB = 2 slots
pub const RANKS: usize = 2;

/// One rank's KV cache: a tensor per layer, `(2, BLOCKS, BLOCK, HEADS, DIM)` of 2-byte
/// elements, in host memory.
pub struct Cache {
    layers: Vec<Vec<u16>>,
}

impl Cache {
    pub fn new() -> Self {
        Self { layers: (0..LAYERS).map(|_| vec![0u16; 2 * BLOCKS * BLOCK * HEADS * DIM]).collect() }
    }

    pub fn descs(&mut self) -> Vec<TensorDesc> {
        let shape = vec![2, BLOCKS, BLOCK, HEADS, DIM];
        let strides = vec![
            (BLOCKS * BLOCK * HEADS * DIM) as isize,
            (BLOCK * HEADS * DIM) as isize,
            (HEADS * DIM) as isize,
            DIM as isize,
            1,
        ];
        self.layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| TensorDesc {
                name: format!("model.layers.{i}.self_attn.attn"),
                ptr: l.as_mut_ptr() as u64,
                shape: shape.clone(),
                strides: strides.clone(),
                elem_size: 2,
            })
            .collect()
    }

    pub fn page(&self, layer: usize, kv: usize, block: usize) -> &[u16] {
        let n = BLOCK * HEADS * DIM;
        let at = (kv * BLOCKS + block) * n;
        &self.layers[layer][at..at + n]
    }

    pub fn page_mut(&mut self, layer: usize, kv: usize, block: usize) -> &mut [u16] {
        let n = BLOCK * HEADS * DIM;
        let at = (kv * BLOCKS + block) * n;
        &mut self.layers[layer][at..at + n]
    }

    /// What the engine would compute for token block `t` of the prompt (per rank, layer, K/V).
    pub fn compute(&mut self, rank: usize, block_ids: &[u32]) {
        for (t, &b) in block_ids.iter().enumerate() {
            for layer in 0..LAYERS {
                for kv in 0..2 {
                    let seed = (rank * 1000 + t * 10 + layer * 2 + kv) as u16;
                    for (i, x) in self.page_mut(layer, kv, b as usize).iter_mut().enumerate() {
                        *x = seed.wrapping_mul(31).wrapping_add(i as u16);
                    }
                }
            }
        }
    }
}

pub fn fingerprint(rank: usize) -> u128 {
    KvLayout {
        model: "test/model".into(),
        dtype: "bf16".into(),
        layers: LAYERS as u32,
        kv_heads: HEADS as u32,
        head_dim: DIM as u32,
        tp_rank: rank as u32,
        tp_size: RANKS as u32,
        chunk_tokens: CHUNK as u32,
        byte_order: "flash_attn/NHD".into(),
    }
    .fingerprint()
}

pub fn chunk_bytes() -> usize {
    LAYERS * 2 * (CHUNK / BLOCK) * BLOCK * HEADS * DIM * 2
}

pub fn scheduler(socket: &std::path::Path) -> SchedulerCore {
    SchedulerCore::connect(SchedulerConfig {
        socket: socket.to_owned(),
        layouts: (0..RANKS).map(fingerprint).collect(),
        chunk_tokens: CHUNK,
        block_size: BLOCK,
        chunk_bytes: chunk_bytes(),
        lease: Duration::from_secs(30),
        nvme_wait: Duration::from_millis(200),
        confirm_loads: true,
    })
    .expect("scheduler")
}

#[allow(unsafe_code)]
pub fn workers(socket: &std::path::Path, caches: &mut [Cache]) -> Vec<WorkerCore> {
    caches
        .iter_mut()
        .enumerate()
        .map(|(rank, cache)| {
            let mut w =
                WorkerCore::connect(socket, rank, Box::new(HostCopy::new())).expect("worker");
            // SAFETY: the caches outlive the workers in every test.
            unsafe { w.register(&cache.descs(), BLOCKS, CHUNK / BLOCK, chunk_bytes(), None) }
                .expect("register");
            w
        })
        .collect()
}

pub fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(salt) % 150_000).collect()
}
