//! Attention of a flattened batch over the paged KV cache, after the layer has written this
//! step's K/V. The batch splits its requests into query groups; each group is served by one
//! [`AttentionBackend`], chosen once for the model and cache.

mod cuda;
mod gather;

use anyhow::Result;
use mlx_rs::{ops, Array, Dtype};

use crate::batch::StepBatch;
use crate::kv_cache::PagedKvCache;

/// What a model's attention asks of a backend beyond the cache's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttentionFeatures {
    /// Some layer has attention sinks (a learned logit per head in each softmax's denominator).
    pub sinks: bool,
}

/// How attention reads the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBackend {
    /// Copies of the touched pages, then MLX's SDPA: portable (CPU, Metal, CUDA), prefill and
    /// decode; the reference the kernel must match.
    #[default]
    Gather,
    /// Decode groups read the pages in place with a CUDA kernel; prefill groups still gather.
    PageKernel,
}

impl AttentionBackend {
    /// The page-reading kernel wherever it runs for a cache of this head size and dtype, unless
    /// gathering is requested (A/B measurements) or the model has attention sinks: the kernel's
    /// online softmax has no sink term, so such models gather (MLX's SDPA takes the sinks).
    pub fn choose(gather_requested: bool, head_dim: usize, dtype: Dtype, features: AttentionFeatures) -> Self {
        if !gather_requested && !features.sinks && cuda::available(head_dim, dtype) {
            Self::PageKernel
        } else {
            Self::Gather
        }
    }

    /// The backend of a query group with up to `max_q` queries per request: the kernel serves
    /// decode (one query) only.
    pub fn for_group(self, max_q: usize) -> Self {
        if max_q == 1 { self } else { Self::Gather }
    }

    /// How decode attention reads the history, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Gather => "gathers the pages",
            Self::PageKernel => "reads the pages in place",
        }
    }
}

/// How a layer turns queries and keys into attention weights.
#[derive(Clone, Copy)]
pub struct Scores<'a> {
    pub scale: f32,
    /// The layer's sliding window (keys at positions > query position - window only).
    pub window: Option<usize>,
    /// `cap * tanh(score / cap)` before the mask (Gemma 2).
    pub softcap: Option<f32>,
    /// `[heads]`: one more logit per head in each softmax's denominator (gpt-oss).
    pub sinks: Option<&'a Array>,
}

/// `q`: `[T, heads, head_dim]` (K/V of this step already written to the cache).
/// Returns `[T, heads * head_dim]`.
pub fn paged_attention(q: &Array, cache: &PagedKvCache, layer: usize, batch: &StepBatch, scores: Scores) -> Result<Array> {
    let Scores { scale, window, softcap: cap, sinks } = scores;
    let (heads, head_dim) = (q.shape()[1], q.shape()[2]);
    let kv_group = cache.layer_group[layer];
    let mut outs = Vec::with_capacity(batch.query_groups.len());
    for g in &batch.query_groups {
        let pages = g.pages.get(kv_group).ok_or_else(|| anyhow::anyhow!("batch has no block tables of KV group {kv_group}"))?;
        let qg = if batch.identity { q.clone() } else { q.take_axis(&g.q_index, 0)? };
        let o = match g.backend {
            // Every page from position 0 (such groups have no window pages): the kernel itself
            // starts at the window.
            AttentionBackend::PageKernel => {
                anyhow::ensure!(sinks.is_none(), "the page-reading kernel has no attention sinks (the backend choice excludes it)");
                let o = cuda::paged_decode(&qg, cache, layer, &pages.full, &g.seq_lens, scale, window, cap)?;
                o.reshape(&[g.num_seqs, heads * head_dim])?
            }
            AttentionBackend::Gather => gather::attend(&qg, cache, layer, g, pages, scale, window, cap, sinks)?,
        };
        outs.push(o);
    }
    if batch.identity {
        return Ok(outs.pop().unwrap());
    }
    let all = if outs.len() == 1 { outs.pop().unwrap() } else { ops::concatenate(&outs, 0)? };
    Ok(all.take_axis(&batch.out_index, 0)?)
}
