//! Attention of a flattened batch over the paged KV cache.
//!
//! Portable version, on MLX's fused SDPA. A group whose requests all have the same length gathers
//! exactly their cached tokens and needs no mask (causal aligned to the end, or none for decode),
//! which lets MLX pick its fused decode kernels; other groups gather whole pages into a padded
//! `[R, H, P * bs, D]` buffer with a position mask. Either copies the touched history once per
//! layer and step; it is the reference that page-reading kernels must match.

use anyhow::Result;
use mlx_rs::{fast, fast::ScaledDotProductAttentionMask, ops, Array};

use crate::batch::{GroupKeys, StepBatch};
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
    let mut outs = Vec::with_capacity(batch.groups.len());
    for g in &batch.groups {
        let (r, qn) = (g.num_seqs, g.max_q);
        let qg = if batch.identity { q.clone() } else { q.take_axis(&g.q_index, 0)? };
        let qg = qg.reshape(&[r, qn, heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?;
        let o = match &g.keys {
            GroupKeys::Exact { len, slots } => {
                let gather = |flat: &Array| -> Result<Array> {
                    Ok(flat.take_axis(slots, 0)?.reshape(&[r, *len, kv_heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?)
                };
                let (k, v) = (gather(&cache.keys[layer])?, gather(&cache.values[layer])?);
                let mask = (qn > 1).then_some(ScaledDotProductAttentionMask::Causal);
                fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, None)?
            }
            GroupKeys::Paged { max_pages, block_table, mask } => {
                let (k_blocks, v_blocks) = cache.blocks(layer)?;
                let kn = max_pages * bs;
                let gather = |blocks: &Array| -> Result<Array> {
                    Ok(blocks
                        .take_axis(block_table, 0)?
                        .reshape(&[r, kn, kv_heads, head_dim])?
                        .transpose_axes(&[0, 2, 1, 3])?)
                };
                let (k, v) = (gather(&k_blocks)?, gather(&v_blocks)?);
                fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, None)?
            }
        };
        outs.push(o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[r * qn, heads * head_dim])?);
    }
    if batch.identity {
        return Ok(outs.pop().unwrap());
    }
    let all = if outs.len() == 1 { outs.pop().unwrap() } else { ops::concatenate(&outs, 0)? };
    Ok(all.take_axis(&batch.out_index, 0)?)
}
