//! Llama family (`LlamaForCausalLM`, `MistralForCausalLM` without sliding window): Llama 2/3,
//! SmolLM2, Mistral. Names follow the HF config and checkpoint.

use anyhow::{bail, Result};
use mlx_rs::{ops, Array};

use crate::attention::paged_attention;
use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::models::CausalLm;
use crate::nn::{Linear, RmsNorm, Rope};
use crate::weights::Weights;

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub scale: f32,
    pub rope: Rope,
}

impl Attention {
    fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache, layer: usize) -> Result<Array> {
        let t = x.shape()[0];
        let q = self.q_proj.forward(x)?.reshape(&[t, self.num_heads, self.head_dim])?;
        let k = self.k_proj.forward(x)?.reshape(&[t, self.num_kv_heads, self.head_dim])?;
        let v = self.v_proj.forward(x)?.reshape(&[t, self.num_kv_heads, self.head_dim])?;
        let q = self.rope.forward(&q, &batch.positions)?;
        let k = self.rope.forward(&k, &batch.positions)?;
        cache.write(layer, &k, &v, &batch.slots)?;
        let o = paged_attention(&q, cache, layer, batch, self.scale)?;
        self.o_proj.forward(&o)
    }
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let gate = self.gate_proj.forward(x)?;
        let silu = gate.multiply(ops::sigmoid(&gate)?)?;
        self.down_proj.forward(&silu.multiply(self.up_proj.forward(x)?)?)
    }
}

pub struct Block {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl Block {
    fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache, layer: usize) -> Result<Array> {
        let h = x.add(self.self_attn.forward(&self.input_layernorm.forward(x)?, batch, cache, layer)?)?;
        Ok(h.add(self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

pub struct Model {
    pub embed_tokens: Linear,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// None when the output projection is tied to the embedding.
    pub lm_head: Option<Linear>,
}

impl Model {
    pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let head_dim = config.head_dim();
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = config.attention_bias;
            let mb = config.mlp_bias;
            layers.push(Block {
                self_attn: Attention {
                    q_proj: w.linear(&format!("{p}.self_attn.q_proj"), ab)?,
                    k_proj: w.linear(&format!("{p}.self_attn.k_proj"), ab)?,
                    v_proj: w.linear(&format!("{p}.self_attn.v_proj"), ab)?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), ab)?,
                    num_heads: config.num_attention_heads as i32,
                    num_kv_heads: config.num_kv_heads() as i32,
                    head_dim: head_dim as i32,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    rope: Rope::from_config(head_dim, config.rope_theta, config.rope_scaling.as_ref())?,
                },
                mlp: Mlp {
                    gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), mb)?,
                    up_proj: w.linear(&format!("{p}.mlp.up_proj"), mb)?,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), mb)?,
                },
                input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), eps)?,
                post_attention_layernorm: w.rms_norm(&format!("{p}.post_attention_layernorm"), eps)?,
            });
        }
        let embed_tokens = w.linear("model.embed_tokens", false)?;
        let lm_head = if w.contains("lm_head.weight") {
            Some(w.linear("lm_head", false)?)
        } else if config.tie_word_embeddings {
            None
        } else {
            bail!("checkpoint has no lm_head.weight and config.json does not tie word embeddings");
        };
        let norm = w.rms_norm("model.norm", eps)?;
        if embed_tokens.out_features() as usize != config.vocab_size {
            bail!(
                "embedding has {} rows but config.json says vocab_size {}",
                embed_tokens.out_features(),
                config.vocab_size
            );
        }
        Ok(Self { embed_tokens, layers, norm, lm_head })
    }
}

impl CausalLm for Model {
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let mut h = self.embed_tokens.rows(&batch.token_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, batch, cache, i)?;
        }
        Ok(h)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        let x = self.norm.forward(hidden)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(head.forward(&x)?.as_dtype(mlx_rs::Dtype::Float32)?)
    }

    fn parameters(&self) -> Vec<&Linear> {
        let mut v = vec![&self.embed_tokens];
        v.extend(self.lm_head.as_ref());
        for l in &self.layers {
            let a = &l.self_attn;
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            v.extend([&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]);
        }
        v
    }

    fn norms(&self) -> Vec<&RmsNorm> {
        let mut v = vec![&self.norm];
        for l in &self.layers {
            v.extend([&l.input_layernorm, &l.post_attention_layernorm]);
        }
        v
    }
}
