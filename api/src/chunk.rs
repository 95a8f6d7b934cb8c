//! Chunk keys: how a request's token ids name the KV chunks the connector stores in the
//! node-agent's tiers (design.md, "Chunk keys").
//!
//! A chunk is `chunk_tokens` consecutive token ids of a request (256 by default); a partial
//! tail is never stored. Its key is a chained 128-bit hash,
//! `key_i = xxh3_128(key_{i-1} ‖ layout ‖ token_ids_i)` with the fixed seed [`CHUNK_SEED`]
//! and `key_{-1} = 0`, every integer little-endian, token ids as `u32`. `layout` is the
//! [`KvLayout::fingerprint`]: the model and everything that changes the bytes of its KV
//! (dtype, shape, tensor-parallel rank), so two layouts never share a key. Nothing here
//! depends on the process (no `PYTHONHASHSEED`, no pointer values): every connector on every
//! node derives the same key for the same tokens.

use twox_hash::XxHash3_128;

/// Seed of every chunk key ("kvtierck").
pub const CHUNK_SEED: u64 = 0x6b76_7469_6572_636b;

/// Tokens per chunk unless configured otherwise.
pub const DEFAULT_CHUNK_TOKENS: usize = 256;

/// The key of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub u128);

impl ChunkKey {
    /// Little-endian bytes (the wire form).
    #[must_use]
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
}

/// What determines the bytes of a model's KV for one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Model id as served (e.g. `MiniMaxAI/MiniMax-M2.5`).
    pub model: String,
    /// KV dtype name (`fp8_e4m3`, `bf16`…).
    pub dtype: String,
    /// Layers whose KV the worker holds.
    pub layers: u32,
    /// KV heads the worker holds (after tensor-parallel sharding).
    pub kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// This worker's tensor-parallel rank and the world size.
    pub tp_rank: u32,
    /// Tensor-parallel world size.
    pub tp_size: u32,
    /// Tokens per chunk.
    pub chunk_tokens: u32,
    /// How a chunk's bytes are ordered (the attention backend's physical KV layout, e.g.
    /// `flash_attn/NHD`): two layouts that order bytes differently never share a key.
    pub byte_order: String,
}

impl KvLayout {
    /// 128-bit fingerprint of the layout.
    #[must_use]
    pub fn fingerprint(&self) -> u128 {
        let mut b = Vec::with_capacity(64 + self.model.len() + self.dtype.len());
        for s in [&self.model, &self.dtype, &self.byte_order] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        for v in [
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.tp_rank,
            self.tp_size,
            self.chunk_tokens,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        XxHash3_128::oneshot_with_seed(CHUNK_SEED, &b)
    }
}

/// Keys of every full chunk of `tokens` under `layout` (a fingerprint).
///
/// # Panics
/// If `chunk_tokens` is zero.
#[must_use]
pub fn chunk_keys(layout: u128, tokens: &[u32], chunk_tokens: usize) -> Vec<ChunkKey> {
    assert!(chunk_tokens > 0, "chunk size must be positive");
    let mut out = Vec::with_capacity(tokens.len() / chunk_tokens);
    let mut buf = Vec::with_capacity(32 + 4 * chunk_tokens);
    let mut prev = 0u128;
    for chunk in tokens.chunks_exact(chunk_tokens) {
        buf.clear();
        buf.extend_from_slice(&prev.to_le_bytes());
        buf.extend_from_slice(&layout.to_le_bytes());
        for t in chunk {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        prev = XxHash3_128::oneshot_with_seed(CHUNK_SEED, &buf);
        out.push(ChunkKey(prev));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            model: "m".into(),
            dtype: "bf16".into(),
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            tp_rank: 0,
            tp_size: 1,
            chunk_tokens: 256,
            byte_order: "flash_attn/NHD".into(),
        }
    }

    #[test]
    fn matches_the_reference_xxh3_128() {
        // The definition, computed with an independent implementation.
        let fp = layout().fingerprint();
        let tokens: Vec<u32> = (0..600).collect();
        let keys = chunk_keys(fp, &tokens, 256);
        assert_eq!(keys.len(), 2, "the partial tail has no key");
        let mut buf = Vec::new();
        buf.extend_from_slice(&0u128.to_le_bytes());
        buf.extend_from_slice(&fp.to_le_bytes());
        for t in 0u32..256 {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        let k0 = xxhash_rust::xxh3::xxh3_128_with_seed(&buf, CHUNK_SEED);
        assert_eq!(keys[0], ChunkKey(k0));
        let mut buf = Vec::new();
        buf.extend_from_slice(&k0.to_le_bytes());
        buf.extend_from_slice(&fp.to_le_bytes());
        for t in 256u32..512 {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(keys[1], ChunkKey(xxhash_rust::xxh3::xxh3_128_with_seed(&buf, CHUNK_SEED)));
    }

    #[test]
    fn keys_chain_and_depend_on_the_layout() {
        let fp = layout().fingerprint();
        let a: Vec<u32> = (0..1024).collect();
        let mut b = a.clone();
        b[10] = 99_999;
        let (ka, kb) = (chunk_keys(fp, &a, 256), chunk_keys(fp, &b, 256));
        // A change in chunk 0 changes every later key (the prefix is part of the name).
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y));
        // A shared prefix shares keys.
        assert_eq!(chunk_keys(fp, &a[..512], 256), ka[..2]);
        let other = KvLayout { tp_rank: 1, tp_size: 2, ..layout() }.fingerprint();
        assert_ne!(chunk_keys(other, &a, 256)[0], ka[0]);
    }
}
