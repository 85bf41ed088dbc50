//! The attention layer of a decoder block: q/k/v projections, optional per-head q/k norms, RoPE,
//! the K/V write into the paged cache, and one call into `paged_attention` for the rest.

use anyhow::Result;
use mlx_rs::{ops, Array};

use crate::batch::StepBatch;
use crate::kv_cache::PagedKvCache;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::paged_attention::{paged_attention, Scores};

/// Self-attention with the options the families differ in: QKV bias (in the linears), per-head
/// q/k norms (Qwen3, Gemma 3), a sliding window, score soft-capping (Gemma 2), the scale (Gemma),
/// no positional encoding at all (SmolLM3's NoPE layers), attention sinks (gpt-oss).
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub scale: f32,
    /// None: the layer has no positional encoding (NoPE); queries and keys are used as projected.
    pub rope: Option<Rope>,
    /// Keys at positions > query position - window only.
    pub sliding_window: Option<usize>,
    pub softcap: Option<f32>,
    /// `[heads]`: a learned logit per head that joins each softmax's denominator without a value
    /// (gpt-oss), letting a query attend to nothing.
    pub sinks: Option<Array>,
    pub output_gate: OutputGate,
}

/// A gate on the attention output before `o_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputGate {
    Absent,
    /// Qwen3-Next / Qwen3.5: `q_proj` yields, per head, the query and then a gate; the output is
    /// scaled by sigmoid(gate).
    QueryHeadSigmoid,
}

impl Attention {
    pub fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache, layer: usize) -> Result<Array> {
        let t = x.shape()[0];
        let [q, k, v] = self.qkv.forward(x)?;
        let (q, gate) = match self.output_gate {
            OutputGate::Absent => (q, None),
            OutputGate::QueryHeadSigmoid => {
                let p = ops::split_at_indices(&q.reshape(&[t, self.num_heads, 2 * self.head_dim])?, &[self.head_dim], -1)?;
                (p[0].clone(), Some(p[1].reshape(&[t, self.num_heads * self.head_dim])?))
            }
        };
        let mut q = q.reshape(&[t, self.num_heads, self.head_dim])?;
        let mut k = k.reshape(&[t, self.num_kv_heads, self.head_dim])?;
        let v = v.reshape(&[t, self.num_kv_heads, self.head_dim])?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        if let Some(rope) = &self.rope {
            q = rope.at(&q, batch)?;
            k = rope.at(&k, batch)?;
        }
        let g = cache.layer_group[layer];
        let slots = batch.slots.get(g).ok_or_else(|| anyhow::anyhow!("batch has no block tables of KV group {g}"))?;
        cache.write(layer, &k, &v, slots)?;
        let scores = Scores { scale: self.scale, window: self.sliding_window, softcap: self.softcap, sinks: self.sinks.as_ref() };
        let mut o = paged_attention(&q, cache, layer, batch, scores)?;
        if let Some(gate) = gate {
            o = o.multiply(ops::sigmoid(&gate)?)?;
        }
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
