//! The portable path, on MLX's fused SDPA. A group whose requests all have the same length gathers
//! exactly their cached tokens and needs no mask (causal aligned to the end, or none for decode),
//! which lets MLX pick its fused decode kernels; other groups (and sliding-window or soft-capped
//! layers) gather whole pages into a padded `[R, H, P * bs, D]` buffer with a position mask.
//! Either copies the touched history once per layer and step.

use anyhow::Result;
use mlx_rs::{fast, fast::ScaledDotProductAttentionMask, ops, Array, Dtype};

use crate::batch::{QueryGroup, GroupPages};
use crate::kv_cache::PagedKvCache;
use crate::layers::softcap;

/// Attention of one query group: `qg` `[R * Q, heads, head_dim]`, the group's padded query rows.
/// Returns `[R * Q, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    qg: &Array,
    cache: &PagedKvCache,
    layer: usize,
    g: &QueryGroup,
    group: &GroupPages,
    scale: f32,
    window: Option<usize>,
    cap: Option<f32>,
    sinks: Option<&Array>,
) -> Result<Array> {
    let windowed = window.is_some();
    let (heads, head_dim) = (qg.shape()[1], qg.shape()[2]);
    let kv_heads = cache.kv_heads(layer) as i32;
    let bs = cache.block_size(layer) as i32;
    let pages = match (windowed, &group.window) {
        (true, Some(p)) => p,
        (true, None) => anyhow::bail!("sliding-window layer but the batch has no window pages"),
        (false, _) => &group.full,
    };
    let (r, qn, kn) = (g.num_seqs, g.max_q, pages.max_pages * bs);
    let qg = qg.reshape(&[r, qn, heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?;
    let o = match (&group.exact, windowed, cap) {
        // Requests of one length: exactly their tokens, no mask array (MLX's fused kernels).
        (Some(exact), false, None) => {
            let (k_slots, v_slots) = cache.slots(layer)?;
            let gather = |flat: &Array| -> Result<Array> {
                Ok(flat
                    .take_axis(&exact.slots, 0)?
                    .reshape(&[r, exact.len, kv_heads, head_dim])?
                    .transpose_axes(&[0, 2, 1, 3])?)
            };
            let (k, v) = (gather(&k_slots)?, gather(&v_slots)?);
            let mask = (qn > 1).then_some(ScaledDotProductAttentionMask::Causal);
            fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, sinks)?
        }
        _ => {
            let (k_blocks, v_blocks) = cache.blocks(layer)?;
            let gather = |blocks: &Array| -> Result<Array> {
                Ok(blocks
                    .take_axis(&pages.block_table, 0)?
                    .reshape(&[r, kn, kv_heads, head_dim])?
                    .transpose_axes(&[0, 2, 1, 3])?)
            };
            let k = gather(&k_blocks)?;
            let v = gather(&v_blocks)?;
            let mask =
                pages.mask.as_ref().ok_or_else(|| anyhow::anyhow!("decode group built for the page-reading kernel"))?;
            match cap {
                None => fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, sinks)?,
                Some(cap) => softcapped_attention(&qg, &k, &v, scale, mask, cap, sinks)?,
            }
        }
    };
    Ok(o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[r * qn, heads * head_dim])?)
}

/// Attention with `cap * tanh(scores / cap)` before the mask (SDPA has no soft-capping), and the
/// sinks as one more column of logits, dropped after the softmax.
/// `q` `[R, H, Q, D]`, `k`/`v` `[R, KVH, K, D]`, `mask` `[R, 1, Q, K]` bool.
fn softcapped_attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: &Array, cap: f32, sinks: Option<&Array>) -> Result<Array> {
    let (r, h, qn, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let kvh = k.shape()[1];
    // Query heads grouped by their KV head: [R, KVH, H/KVH * Q, D].
    let qg = q.reshape(&[r, kvh, (h / kvh) * qn, d])?;
    let scores = qg
        .multiply(Array::from_f32(scale).as_dtype(q.dtype())?)?
        .matmul(k.swap_axes(-1, -2)?)?
        .as_dtype(Dtype::Float32)?;
    let scores = softcap(&scores, cap)?.reshape(&[r, kvh, h / kvh, qn, -1])?;
    let mask = mask.reshape(&[r, 1, 1, qn, -1])?;
    let scores = ops::select(&mask, &scores, Array::from_f32(f32::NEG_INFINITY))?;
    let kn = scores.shape()[4];
    let p = match sinks {
        None => ops::softmax_axis(&scores, -1, None)?,
        Some(sinks) => {
            let sink = ops::broadcast_to(sinks.as_dtype(Dtype::Float32)?.reshape(&[1, kvh, h / kvh, 1, 1])?, &[r, kvh, h / kvh, qn, 1])?;
            let p = ops::softmax_axis(&ops::concatenate(&[scores, sink], -1)?, -1, None)?;
            p.take_axis(&Array::from_iter(0..kn, &[kn]), -1)?
        }
    };
    let p = p.as_dtype(v.dtype())?;
    let o = p.reshape(&[r, kvh, (h / kvh) * qn, -1])?.matmul(v)?;
    Ok(o.reshape(&[r, h, qn, d])?)
}

