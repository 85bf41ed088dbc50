//! Attention of a flattened batch over the paged KV cache.
//!
//! Portable version: each group gathers its requests' pages into a padded `[R, H, P * bs, D]`
//! buffer and calls MLX's fused SDPA with a position mask. It copies the touched history once per
//! layer and step; it is the reference that custom kernels must match.

use anyhow::Result;
use mlx_rs::{fast, ops, Array};

use crate::batch::StepBatch;
use crate::kv_cache::PagedKvCache;

/// `q`: `[T, heads, head_dim]` (K/V of this step already written to the cache).
/// Returns `[T, heads * head_dim]`.
pub fn paged_attention(
    q: &Array,
    cache: &PagedKvCache,
    layer: usize,
    batch: &StepBatch,
    scale: f32,
) -> Result<Array> {
    let heads = q.shape()[1];
    let head_dim = q.shape()[2];
    let kv_heads = cache.kv_heads as i32;
    let bs = cache.block_size as i32;
    let (k_blocks, v_blocks) = cache.blocks(layer)?;
    let mut outs = Vec::with_capacity(batch.groups.len());
    for g in &batch.groups {
        let (r, qn, kn) = (g.num_seqs, g.max_q, g.max_pages * bs);
        let qg = q
            .take_axis(&g.q_index, 0)?
            .reshape(&[r, qn, heads, head_dim])?
            .transpose_axes(&[0, 2, 1, 3])?;
        let gather = |blocks: &Array| -> Result<Array> {
            Ok(blocks
                .take_axis(&g.block_table, 0)?
                .reshape(&[r, kn, kv_heads, head_dim])?
                .transpose_axes(&[0, 2, 1, 3])?)
        };
        let k = gather(&k_blocks)?;
        let v = gather(&v_blocks)?;
        let o = fast::scaled_dot_product_attention(&qg, &k, &v, scale, &g.mask, None)?;
        outs.push(o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[r * qn, heads * head_dim])?);
    }
    let all = if outs.len() == 1 { outs.pop().unwrap() } else { ops::concatenate(&outs, 0)? };
    Ok(all.take_axis(&batch.out_index, 0)?)
}
