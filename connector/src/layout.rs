//! Where a block's KV bytes are, derived from the registered tensors' shapes and strides, not
//! from a hard-coded shape: vLLM's attention backends lay KV out differently (FlashAttention's
//! `(2, blocks, block_size, heads, head_dim)`, HND stride orders, block-outermost cross-layer
//! tensors, MLA's `(blocks, block_size, dim)`), and the same code must serve them all.
//!
//! For one tensor, the bytes of block `b` are a set of contiguous runs ([`Segment`]s) at the
//! same offsets for every block, shifted by `b` times the block dimension's stride. The runs
//! are found by dropping the block dimension, ordering the rest by stride (physical order) and
//! merging dimensions that are contiguous.
//!
//! A chunk's bytes in the pool are, for each block of the chunk, for each layer in order, that
//! layer's runs ([`ChunkGeometry`]): the same bytes whether the engine registered one tensor
//! per layer or one cross-layer tensor ([`TensorDesc::split`] turns it into per-layer views),
//! so the two never need different keys. With a block-outermost cross-layer tensor the pieces
//! of a block coalesce into one copy of every layer's KV (megabytes, at link speed).

use std::ops::Range;

/// One registered KV tensor, as the worker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// Layer name (for errors).
    pub name: String,
    /// Address of element `[0, 0, ...]`.
    pub ptr: u64,
    /// Shape, in elements.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub strides: Vec<isize>,
    /// Bytes per element.
    pub elem_size: usize,
}

impl TensorDesc {
    /// Views of `self` along dimension `dim`, one per index (a cross-layer KV tensor split
    /// into its layers).
    ///
    /// # Errors
    /// When `dim` is not a dimension.
    pub fn split(&self, dim: usize) -> Result<Vec<TensorDesc>, LayoutError> {
        if dim >= self.shape.len() || self.strides.len() != self.shape.len() {
            return Err(LayoutError::Malformed(self.name.clone()));
        }
        let step = self.strides[dim] * self.elem_size as isize;
        let mut shape = self.shape.clone();
        let mut strides = self.strides.clone();
        shape.remove(dim);
        strides.remove(dim);
        Ok((0..self.shape[dim])
            .map(|i| TensorDesc {
                name: format!("{}[{i}]", self.name),
                ptr: (self.ptr as i128 + i as i128 * step as i128) as u64,
                shape: shape.clone(),
                strides: strides.clone(),
                elem_size: self.elem_size,
            })
            .collect())
    }
}

/// A contiguous run of one block's bytes, relative to the block's origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset from the tensor's address of block 0's run.
    pub offset: isize,
    /// Bytes.
    pub len: usize,
}

/// How one tensor holds blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// Tensor address.
    pub ptr: u64,
    /// Bytes between block `b` and block `b + 1`.
    pub block_stride: isize,
    /// Blocks the tensor holds.
    pub num_blocks: usize,
    /// The runs of block 0, in the chunk's byte order.
    pub segments: Vec<Segment>,
}

impl BlockLayout {
    /// Bytes of one block in this tensor.
    #[must_use]
    pub fn block_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// A short description of the byte order (for the layout fingerprint).
    #[must_use]
    pub fn describe(&self) -> String {
        let runs: Vec<String> = self.segments.iter().map(|s| s.len.to_string()).collect();
        format!("{}x[{}]", self.segments.len(), runs.first().cloned().unwrap_or_default())
    }
}

/// Why a tensor cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Shape and strides disagree, or the element size is zero.
    #[error("tensor {0}: shape, strides and element size do not describe a tensor")]
    Malformed(String),
    /// No dimension (or more than one) has the number of blocks the cache was allocated with.
    #[error(
        "tensor {name}: cannot tell the block dimension ({num_blocks} blocks) in shape {shape:?}"
    )]
    BlockDim {
        /// Layer.
        name: String,
        /// Blocks expected.
        num_blocks: usize,
        /// Shape seen.
        shape: Vec<usize>,
    },
    /// The tensor overlaps itself (a zero or broadcast stride).
    #[error("tensor {0}: a stride of zero or overlapping dimensions")]
    Overlap(String),
    /// Tensors disagree on the block size in bytes.
    #[error("tensors {0} and {1} hold blocks of different sizes")]
    Mixed(String, String),
}

/// Derives the block layout of `t`, whose block dimension has `num_blocks` entries. When
/// several dimensions have that size (a head dimension of 64 in a cache of 64 blocks), the
/// one with the largest stride is the block dimension: blocks are never interleaved inside a
/// head. `block_dim` names it explicitly.
///
/// # Errors
/// When the tensor is malformed or its block dimension cannot be told.
pub fn block_layout(
    t: &TensorDesc,
    num_blocks: usize,
    block_dim: Option<usize>,
) -> Result<BlockLayout, LayoutError> {
    let n = t.shape.len();
    if n == 0 || t.strides.len() != n || t.elem_size == 0 {
        return Err(LayoutError::Malformed(t.name.clone()));
    }
    let dim = match block_dim {
        Some(d) if d < n && t.shape[d] == num_blocks => d,
        Some(_) => {
            return Err(LayoutError::BlockDim {
                name: t.name.clone(),
                num_blocks,
                shape: t.shape.clone(),
            })
        }
        None => {
            let found = (0..n).filter(|&d| t.shape[d] == num_blocks).max_by_key(|&d| t.strides[d]);
            match found {
                Some(d) => d,
                None => {
                    return Err(LayoutError::BlockDim {
                        name: t.name.clone(),
                        num_blocks,
                        shape: t.shape.clone(),
                    })
                }
            }
        }
    };
    let e = t.elem_size as isize;
    // The other dimensions in physical order (largest stride first), sizes 1 dropped.
    let mut rest: Vec<(usize, isize)> = (0..n)
        .filter(|&d| d != dim && t.shape[d] != 1)
        .map(|d| (t.shape[d], t.strides[d] * e))
        .collect();
    if rest.iter().any(|&(_, s)| s <= 0) || t.strides[dim] <= 0 {
        return Err(LayoutError::Overlap(t.name.clone()));
    }
    rest.sort_by_key(|d| std::cmp::Reverse(d.1));
    // Merge the innermost dimensions while they are contiguous.
    let mut run = e;
    let mut inner = rest.len();
    while inner > 0 && rest[inner - 1].1 == run {
        run *= rest[inner - 1].0 as isize;
        inner -= 1;
    }
    let outer = &rest[..inner];
    let count: usize = outer.iter().map(|&(s, _)| s).product();
    let mut segments = Vec::with_capacity(count);
    let mut idx = vec![0usize; outer.len()];
    for _ in 0..count {
        let offset: isize = idx.iter().zip(outer).map(|(&i, &(_, s))| i as isize * s).sum();
        segments.push(Segment { offset, len: run as usize });
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < outer[k].0 {
                break;
            }
            idx[k] = 0;
        }
    }
    // A run longer than the block stride would overlap the next block's.
    let block_stride = t.strides[dim] * e;
    if num_blocks > 1 && segments.iter().any(|s| s.len as isize > block_stride) {
        return Err(LayoutError::Overlap(t.name.clone()));
    }
    Ok(BlockLayout { ptr: t.ptr, block_stride, num_blocks, segments })
}

/// Where a chunk's bytes come from and go to: every tensor's runs for each block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkGeometry {
    /// Per tensor, in registration order.
    pub tensors: Vec<BlockLayout>,
    /// Blocks per chunk.
    pub blocks_per_chunk: usize,
}

/// One copy between a block run and the chunk's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Address in the KV cache.
    pub addr: u64,
    /// Offset in the chunk's byte stream.
    pub stream_offset: usize,
    /// Bytes.
    pub len: usize,
}

impl ChunkGeometry {
    /// Geometry for `tensors` with `blocks_per_chunk` blocks per chunk.
    ///
    /// # Errors
    /// When tensors disagree on the number of blocks (`LayoutError::Mixed`).
    pub fn new(tensors: Vec<BlockLayout>, blocks_per_chunk: usize) -> Result<Self, LayoutError> {
        if let Some(first) = tensors.first() {
            if let Some(other) = tensors.iter().find(|t| t.num_blocks != first.num_blocks) {
                return Err(LayoutError::Mixed(
                    format!("{:#x}", first.ptr),
                    format!("{:#x}", other.ptr),
                ));
            }
        }
        Ok(Self { tensors, blocks_per_chunk })
    }

    /// Bytes of one block over every tensor.
    #[must_use]
    pub fn bytes_per_block(&self) -> usize {
        self.tensors.iter().map(BlockLayout::block_bytes).sum()
    }

    /// Bytes of one chunk.
    #[must_use]
    pub fn chunk_bytes(&self) -> usize {
        self.bytes_per_block() * self.blocks_per_chunk
    }

    /// Blocks each tensor holds.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.tensors.first().map_or(0, |t| t.num_blocks)
    }

    /// The copies that move blocks `block_ids[j]` (for `j` in `from..`) of one chunk. `from`
    /// skips blocks already computed locally; their bytes stay in the stream but are not
    /// copied. Pieces adjacent both in memory and in the stream are merged into one.
    ///
    /// # Panics
    /// If `block_ids` is longer than a chunk (a bug in the caller).
    #[must_use]
    pub fn pieces(&self, block_ids: &[u32], from: usize) -> Vec<Piece> {
        self.pieces_of(block_ids, from, 0..self.tensors.len())
    }

    /// As [`ChunkGeometry::pieces`], for the tensors (layers) in `layers` only. Stream offsets
    /// are those of the whole chunk, so the pieces of ranges that cover every layer are the
    /// chunk's.
    ///
    /// # Panics
    /// If `block_ids` is longer than a chunk or `layers` goes beyond the tensors (bugs in the
    /// caller).
    #[must_use]
    pub fn pieces_of(&self, block_ids: &[u32], from: usize, layers: Range<usize>) -> Vec<Piece> {
        assert!(block_ids.len() <= self.blocks_per_chunk, "more blocks than a chunk holds");
        let per_block = self.bytes_per_block();
        let before: usize = self.tensors[..layers.start].iter().map(BlockLayout::block_bytes).sum();
        let mut out: Vec<Piece> = Vec::new();
        for (j, &b) in block_ids.iter().enumerate().skip(from) {
            let mut at = j * per_block + before;
            for t in &self.tensors[layers.clone()] {
                let origin = t.ptr as i128 + i128::from(b) * t.block_stride as i128;
                for s in &t.segments {
                    let addr = (origin + s.offset as i128) as u64;
                    match out.last_mut() {
                        Some(p)
                            if p.addr + p.len as u64 == addr && p.stream_offset + p.len == at =>
                        {
                            p.len += s.len;
                        }
                        _ => out.push(Piece { addr, stream_offset: at, len: s.len }),
                    }
                    at += s.len;
                }
            }
        }
        out
    }

    /// How many consecutive layers one load stage moves, so that a stage's copies reach
    /// `min_copy` bytes where the layout allows it. When a block's layers lie next to each
    /// other (the cross-layer layout) copies grow with the layers per stage; when each layer
    /// is a tensor of its own they do not, and every layer is a stage (its small copies go to
    /// the runtime as one batch).
    #[must_use]
    pub fn layers_per_stage(&self, min_copy: usize) -> usize {
        let n = self.tensors.len();
        if n <= 1 {
            return 1;
        }
        let one = self.pieces_of(&[0], 0, 0..1);
        let all = self.pieces_of(&[0], 0, 0..n);
        let largest = one.iter().map(|p| p.len).max().unwrap_or(0);
        let coalesce = all.len() < one.len() * n;
        if largest == 0 || largest >= min_copy || !coalesce {
            return 1;
        }
        min_copy.div_ceil(largest).min(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
        let mut s = vec![1isize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1] as isize;
        }
        s
    }

    fn desc(shape: &[usize], strides: Vec<isize>) -> TensorDesc {
        TensorDesc { name: "l0".into(), ptr: 0x1000, shape: shape.to_vec(), strides, elem_size: 2 }
    }

    #[test]
    fn flash_attention_blocks_are_a_k_run_and_a_v_run() {
        // (2, blocks, block_size, heads, head_dim) = Llama-3-8B with block size 16.
        let shape = [2, 100, 16, 8, 128];
        let l = block_layout(&desc(&shape, contiguous_strides(&shape)), 100, None).expect("layout");
        let page = 16 * 8 * 128 * 2;
        assert_eq!(
            l.segments,
            vec![
                Segment { offset: 0, len: page },
                Segment { offset: (100 * page) as isize, len: page },
            ]
        );
        assert_eq!(l.block_stride, page as isize);
        assert_eq!(l.block_bytes(), 2 * page);
    }

    #[test]
    fn an_hnd_stride_order_is_still_two_runs() {
        // Logical (2, B, N, H, D) stored as (2, B, H, N, D).
        let (b, n, h, d) = (10, 16, 8, 128);
        let phys = contiguous_strides(&[2, b, h, n, d]);
        let strides = vec![phys[0], phys[1], phys[3], phys[2], phys[4]];
        let l = block_layout(&desc(&[2, b, n, h, d], strides), b, None).expect("layout");
        assert_eq!(l.segments.len(), 2);
        assert_eq!(l.segments[0].len, n * h * d * 2);
    }

    #[test]
    fn block_outermost_and_mla_layouts_are_one_run() {
        // Cross-layer block-outermost: (blocks, layers, 2, block_size, heads, dim).
        let shape = [50, 32, 2, 16, 8, 128];
        let l = block_layout(&desc(&shape, contiguous_strides(&shape)), 50, None).expect("layout");
        assert_eq!(l.segments, vec![Segment { offset: 0, len: 32 * 2 * 16 * 8 * 128 * 2 }]);
        // MLA: (blocks, block_size, dim).
        let shape = [64, 16, 576];
        let l = block_layout(&desc(&shape, contiguous_strides(&shape)), 64, None).expect("layout");
        assert_eq!(l.segments, vec![Segment { offset: 0, len: 16 * 576 * 2 }]);
    }

    #[test]
    fn ambiguous_or_broken_tensors_are_refused() {
        // 64 blocks and a head dimension of 64: the block dimension has the larger stride.
        let shape = [2, 64, 16, 2, 64];
        let t64 = desc(&shape, contiguous_strides(&shape));
        let l = block_layout(&t64, 64, None).expect("layout");
        assert_eq!(l.block_stride, 16 * 2 * 64 * 2);
        let shape = [2, 2, 16, 8, 128];
        let t = desc(&shape, contiguous_strides(&shape));
        assert_eq!(block_layout(&t, 2, Some(1)).expect("named").block_stride, 16 * 8 * 128 * 2);
        assert!(matches!(block_layout(&t, 2, Some(4)), Err(LayoutError::BlockDim { .. })));
        assert!(matches!(block_layout(&t, 7, None), Err(LayoutError::BlockDim { .. })));
        let mut bad = t.clone();
        bad.strides.pop();
        assert_eq!(block_layout(&bad, 2, Some(1)), Err(LayoutError::Malformed("l0".into())));
        let mut broadcast = t;
        broadcast.strides[4] = 0;
        assert_eq!(block_layout(&broadcast, 2, Some(1)), Err(LayoutError::Overlap("l0".into())));
    }

    #[test]
    fn pieces_walk_blocks_then_layers_then_runs() {
        let shape = [2, 8, 16, 1, 4];
        let mk = |ptr| {
            let mut t = desc(&shape, contiguous_strides(&shape));
            t.ptr = ptr;
            block_layout(&t, 8, None).expect("layout")
        };
        let g = ChunkGeometry::new(vec![mk(0x10000), mk(0x20000)], 2).expect("geometry");
        let page = 16 * 4 * 2; // block_size x dim x 2 bytes
        assert_eq!(g.bytes_per_block(), 2 * 2 * page);
        assert_eq!(g.chunk_bytes(), 2 * 2 * 2 * page);
        let p = g.pieces(&[5, 3], 0);
        assert_eq!(p.len(), 2 * 2 * 2);
        assert_eq!(p[0], Piece { addr: 0x10000 + 5 * page as u64, stream_offset: 0, len: page });
        assert_eq!(p[1].addr, 0x10000 + (8 * page + 5 * page) as u64, "V run of block 5");
        assert_eq!(
            p[2],
            Piece { addr: 0x20000 + 5 * page as u64, stream_offset: 2 * page, len: page }
        );
        assert_eq!(p[4].addr, 0x10000 + 3 * page as u64);
        assert_eq!(p[4].stream_offset, 4 * page, "block 3 follows every layer of block 5");
        // Skipping the first block keeps the stream offsets of the rest.
        let q = g.pieces(&[5, 3], 1);
        assert_eq!(q, p[4..].to_vec());
    }

    #[test]
    fn a_cross_layer_tensor_gives_the_same_stream_as_per_layer_tensors_in_fewer_copies() {
        // Logical (layers, 2, blocks, block_size, heads, dim), physically blocks outermost.
        let (l, b, n, h, d) = (4, 6, 16, 2, 8);
        let phys = contiguous_strides(&[b, l, 2, n, h, d]);
        let strides = vec![phys[1], phys[2], phys[0], phys[3], phys[4], phys[5]];
        let cross = TensorDesc {
            name: "cross".into(),
            ptr: 0x4000_0000,
            shape: vec![l, 2, b, n, h, d],
            strides,
            elem_size: 2,
        };
        let layers = cross.split(0).expect("split");
        assert_eq!(layers.len(), l);
        let layouts = layers
            .iter()
            .map(|t| block_layout(t, b, None))
            .collect::<Result<Vec<_>, _>>()
            .expect("layouts");
        assert_eq!(layouts[0].segments.len(), 1, "K and V of a layer are adjacent");
        let g = ChunkGeometry::new(layouts, 2).expect("geometry");
        let p = g.pieces(&[4, 1], 0);
        let block = l * 2 * n * h * d * 2;
        assert_eq!(p.len(), 2, "one copy per block, every layer at once");
        assert_eq!(
            p[0],
            Piece { addr: 0x4000_0000 + 4 * block as u64, stream_offset: 0, len: block }
        );
        assert_eq!(p[1].stream_offset, block);
        assert!(cross.split(9).is_err());
    }

    #[test]
    fn stages_of_layers_cover_the_chunk_and_grow_only_where_copies_do() {
        // Per-layer tensors: K and V runs per layer, never adjacent across layers.
        let shape = [2, 8, 16, 1, 4];
        let mk = |ptr| {
            let mut t = desc(&shape, contiguous_strides(&shape));
            t.ptr = ptr;
            block_layout(&t, 8, None).expect("layout")
        };
        let g =
            ChunkGeometry::new(vec![mk(0x10000), mk(0x20000), mk(0x30000)], 2).expect("geometry");
        assert_eq!(g.layers_per_stage(1 << 19), 1);
        let mut staged: Vec<Piece> =
            (0..3).flat_map(|l| g.pieces_of(&[5, 3], 0, l..l + 1)).collect();
        staged.sort_by_key(|p| p.stream_offset);
        assert_eq!(staged, g.pieces(&[5, 3], 0), "the stages together are the chunk");

        // Cross-layer: a block's layers are adjacent, so stages take enough layers per copy.
        let (l, b, n, h, d) = (8, 4, 16, 2, 8);
        let phys = contiguous_strides(&[b, l, 2, n, h, d]);
        let strides = vec![phys[1], phys[2], phys[0], phys[3], phys[4], phys[5]];
        let cross = TensorDesc {
            name: "x".into(),
            ptr: 0x1_0000,
            shape: vec![l, 2, b, n, h, d],
            strides,
            elem_size: 2,
        };
        let layouts = cross
            .split(0)
            .expect("split")
            .iter()
            .map(|t| block_layout(t, b, None))
            .collect::<Result<Vec<_>, _>>()
            .expect("layouts");
        let g = ChunkGeometry::new(layouts, 1).expect("geometry");
        let layer = 2 * n * h * d * 2;
        assert_eq!(g.layers_per_stage(3 * layer), 3);
        assert_eq!(g.layers_per_stage(100 * layer), l, "never more than every layer");
        assert_eq!(g.layers_per_stage(layer), 1);
        let p = g.pieces_of(&[2], 0, 3..6);
        assert_eq!(
            p,
            vec![Piece {
                addr: 0x1_0000 + (2 * l + 3) as u64 * layer as u64,
                stream_offset: 3 * layer,
                len: 3 * layer
            }]
        );
    }
}
