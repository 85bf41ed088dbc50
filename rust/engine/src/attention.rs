//! Attention over the paged KV cache: the attention layer every family shares, and the attention
//! of a flattened batch over the pages.
//!
//! Portable version, on MLX's fused SDPA. A group whose requests all have the same length gathers
//! exactly their cached tokens and needs no mask (causal aligned to the end, or none for decode),
//! which lets MLX pick its fused decode kernels; other groups (and sliding-window or soft-capped
//! layers) gather whole pages into a padded `[R, H, P * bs, D]` buffer with a position mask.
//! Either copies the touched history once per layer and step; it is the reference that
//! page-reading kernels must match.

use anyhow::Result;
use mlx_rs::{fast, fast::ScaledDotProductAttentionMask, ops, Array, Dtype};

use crate::batch::StepBatch;
use crate::kv_cache::PagedKvCache;
use crate::nn::{softcap, Linear, RmsNorm, Rope};

/// Self-attention with the options the families differ in: QKV bias (in the linears), per-head
/// q/k norms (Qwen3, Gemma 3), a sliding window, score soft-capping (Gemma 2), the scale (Gemma).
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub scale: f32,
    pub rope: Rope,
    /// Keys at positions > query position - window only.
    pub sliding_window: Option<usize>,
    pub softcap: Option<f32>,
}

impl Attention {
    pub fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache, layer: usize) -> Result<Array> {
        let t = x.shape()[0];
        let [q, k, v] = self.qkv.forward(x)?;
        let mut q = q.reshape(&[t, self.num_heads, self.head_dim])?;
        let mut k = k.reshape(&[t, self.num_kv_heads, self.head_dim])?;
        let v = v.reshape(&[t, self.num_kv_heads, self.head_dim])?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let q = self.rope.forward(&q, &batch.positions, &batch.seq_ends)?;
        let k = self.rope.forward(&k, &batch.positions, &batch.seq_ends)?;
        let g = cache.layer_group[layer];
        let slots = batch.slots.get(g).ok_or_else(|| anyhow::anyhow!("batch has no block tables of KV group {g}"))?;
        cache.write(layer, &k, &v, slots)?;
        let o = paged_attention(&q, cache, layer, batch, self.scale, self.sliding_window.is_some(), self.softcap)?;
        self.o_proj.forward(&o)
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = self.qkv.linears();
        v.push(&self.o_proj);
        v
    }

    pub fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        self.q_norm.iter().chain(self.k_norm.iter())
    }
}

/// The query, key and value projections: stacked into one weight (one matmul per layer instead
/// of three; kernel launches bound small decode steps on GPUs), or apart when they cannot share
/// one (different quantizations).
pub enum Qkv {
    Stacked { linear: Linear, q: i32, kv: i32 },
    Apart([Linear; 3]),
}

impl Qkv {
    pub fn new(q_proj: Linear, k_proj: Linear, v_proj: Linear) -> Result<Self> {
        Ok(match Linear::stack_rows(&[&q_proj, &k_proj, &v_proj])? {
            Some(linear) => Self::Stacked { linear, q: q_proj.out_features(), kv: k_proj.out_features() },
            None => Self::Apart([q_proj, k_proj, v_proj]),
        })
    }

    /// `[T, q]`, `[T, kv]`, `[T, kv]`.
    pub fn forward(&self, x: &Array) -> Result<[Array; 3]> {
        Ok(match self {
            Self::Stacked { linear, q, kv } => {
                let mut p = linear.forward_split(x, &[*q, q + kv])?.into_iter();
                [p.next().unwrap(), p.next().unwrap(), p.next().unwrap()]
            }
            Self::Apart([q, k, v]) => [q.forward(x)?, k.forward(x)?, v.forward(x)?],
        })
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Stacked { linear, .. } => vec![linear],
            Self::Apart(l) => l.iter().collect(),
        }
    }
}

/// `q`: `[T, heads, head_dim]` (K/V of this step already written to the cache).
/// `windowed`: read only the pages of the batch's sliding window. Returns `[T, heads * head_dim]`.
pub fn paged_attention(
    q: &Array,
    cache: &PagedKvCache,
    layer: usize,
    batch: &StepBatch,
    scale: f32,
    windowed: bool,
    cap: Option<f32>,
) -> Result<Array> {
    let heads = q.shape()[1];
    let head_dim = q.shape()[2];
    let kv_heads = cache.kv_heads as i32;
    let bs = cache.block_size as i32;
    let (k_blocks, v_blocks) = cache.blocks(layer)?;
    let kv_group = cache.layer_group[layer];
    let mut outs = Vec::with_capacity(batch.groups.len());
    for g in &batch.groups {
        let group = g.pages.get(kv_group).ok_or_else(|| anyhow::anyhow!("batch has no block tables of KV group {kv_group}"))?;
        let pages = match (windowed, &group.window) {
            (true, Some(p)) => p,
            (true, None) => anyhow::bail!("sliding-window layer but the batch has no window pages"),
            (false, _) => &group.full,
        };
        let (r, qn, kn) = (g.num_seqs, g.max_q, pages.max_pages * bs);
        let qg = if batch.identity { q.clone() } else { q.take_axis(&g.q_index, 0)? };
        let qg = qg.reshape(&[r, qn, heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?;
        let o = match (&group.exact, windowed, cap) {
            // Requests of one length: exactly their tokens, no mask array (MLX's fused kernels).
            (Some(exact), false, None) => {
                let storage = cache.layer_storage[layer];
                let gather = |flat: &Array| -> Result<Array> {
                    Ok(flat
                        .take_axis(&exact.slots, 0)?
                        .reshape(&[r, exact.len, kv_heads, head_dim])?
                        .transpose_axes(&[0, 2, 1, 3])?)
                };
                let (k, v) = (gather(&cache.keys[storage])?, gather(&cache.values[storage])?);
                let mask = (qn > 1).then_some(ScaledDotProductAttentionMask::Causal);
                fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, None)?
            }
            _ => {
                let gather = |blocks: &Array| -> Result<Array> {
                    Ok(blocks
                        .take_axis(&pages.block_table, 0)?
                        .reshape(&[r, kn, kv_heads, head_dim])?
                        .transpose_axes(&[0, 2, 1, 3])?)
                };
                let k = gather(&k_blocks)?;
                let v = gather(&v_blocks)?;
                let mask = &pages.mask;
                match cap {
                    None => fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, None)?,
                    Some(cap) => softcapped_attention(&qg, &k, &v, scale, mask, cap)?,
                }
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

/// Attention with `cap * tanh(scores / cap)` before the mask (SDPA has no soft-capping).
/// `q` `[R, H, Q, D]`, `k`/`v` `[R, KVH, K, D]`, `mask` `[R, 1, Q, K]` bool.
fn softcapped_attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: &Array, cap: f32) -> Result<Array> {
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
    let p = ops::softmax_axis(&scores, -1, None)?.as_dtype(v.dtype())?;
    let o = p.reshape(&[r, kvh, (h / kvh) * qn, -1])?.matmul(v)?;
    Ok(o.reshape(&[r, h, qn, d])?)
}
