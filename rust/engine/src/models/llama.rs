//! Llama (`LlamaForCausalLM`) and the decoder most families share: pre-norm blocks of attention
//! (RoPE, no window) and a gated SiLU MLP. Mistral, Qwen2, Qwen3, Phi-3, Mixtral, Qwen3-MoE and SmolLM3 are
//! this decoder with other attention or MLP weights; their files build it through
//! [`Model::load_with`]. Names follow the HF checkpoint.

use anyhow::{bail, Result};
use mlx_rs::Array;

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::layers::attention::{Attention, OutputGate, Qkv};
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, Mlp};
use crate::layers::moe::SparseMoe;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::models::{kv_per_layer, RopeRules, decoder_weights, expect_activation, full_attention, CausalLm, Family, PartialRotary};
use crate::paged_attention::AttentionFeatures;
use crate::weights::{Bias, Weights};

pub const LLAMA: Family = Family {
    architectures: &["LlamaForCausalLM"],
    gguf_architecture: Some("llama"),
    validate: |config| expect_activation(config, "silu"),
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(Model::load(config, w)?)),
};

/// The MLP of a block: dense, or a mixture of experts.
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Self::Dense(m) => m.forward(x),
            Self::Sparse(m) => m.forward(x),
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Dense(m) => m.linears(),
            Self::Sparse(m) => m.linears(),
        }
    }
}

pub struct Block {
    pub self_attn: Attention,
    pub mlp: FeedForward,
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

/// What a family's attention has beyond separate q/k/v/o projections.
#[derive(Debug, Clone, Copy)]
pub struct AttnOptions {
    /// q, k and v have biases.
    pub qkv_bias: Bias,
    /// o has a bias (most families: with `attention_bias`, as q/k/v).
    pub o_bias: Bias,
    /// Per-head RMSNorm of queries and keys before RoPE (`q_norm`, `k_norm`).
    pub qk_norm: bool,
}

/// Attention of layer `layer` at `{prefix}.self_attn` from separate q/k/v/o projections.
pub fn attention(config: &ModelConfig, w: &mut Weights, prefix: &str, layer: usize, opts: AttnOptions) -> Result<Attention> {
    let AttnOptions { qkv_bias, o_bias, qk_norm } = opts;
    let p = format!("{prefix}.self_attn");
    let q_proj = w.linear(&format!("{p}.q_proj"), qkv_bias)?;
    let k_proj = w.linear(&format!("{p}.k_proj"), qkv_bias)?;
    let v_proj = w.linear(&format!("{p}.v_proj"), qkv_bias)?;
    let o_proj = w.linear(&format!("{p}.o_proj"), o_bias)?;
    let (q_norm, k_norm) = if qk_norm {
        let eps = config.rms_norm_eps;
        (Some(w.rms_norm(&format!("{p}.q_norm"), eps)?), Some(w.rms_norm(&format!("{p}.k_norm"), eps)?))
    } else {
        (None, None)
    };
    attention_from(config, layer, Qkv::new(q_proj, k_proj, v_proj)?, o_proj, q_norm, k_norm)
}

/// The shape, scale, RoPE and window of a layer's attention around given projections.
pub fn attention_from(
    config: &ModelConfig,
    layer: usize,
    qkv: Qkv,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
) -> Result<Attention> {
    let head_dim = config.head_dim();
    Ok(Attention {
        qkv,
        o_proj,
        q_norm,
        k_norm,
        num_heads: config.num_attention_heads as i32,
        num_kv_heads: config.num_kv_heads() as i32,
        head_dim: head_dim as i32,
        scale: 1.0 / (head_dim as f32).sqrt(),
        rope: Some(rope(config)?),
        sliding_window: config.layer_windows()[layer],
        softcap: None,
        sinks: None,
        output_gate: OutputGate::Absent,
    })
}

/// RoPE of the config (theta and scaling), on the first `rotary_dim` features of each head.
pub fn rope(config: &ModelConfig) -> Result<Rope> {
    Rope::from_config(
        config.rotary_dim(),
        config.rope_theta,
        config.rope_scaling.as_ref(),
        config.max_position_embeddings,
        config.original_max_position_embeddings,
    )
}

/// The gated MLP at `{prefix}.mlp`.
pub fn dense_mlp(config: &ModelConfig, w: &mut Weights, prefix: &str) -> Result<FeedForward> {
    let p = format!("{prefix}.mlp");
    let b = Bias::from(config.mlp_bias);
    Ok(FeedForward::Dense(Mlp::new(
        w.linear(&format!("{p}.gate_proj"), b)?,
        w.linear(&format!("{p}.up_proj"), b)?,
        w.linear(&format!("{p}.down_proj"), b)?,
        Activation::from_name(config.activation())?,
    )?))
}

impl Model {
    /// The blocks over given input embeddings `[T, hidden]` (a multimodal model's, with image
    /// rows at its placeholders).
    pub fn forward_embeddings(&self, mut h: Array, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, batch, cache, i)?;
        }
        Ok(h)
    }

    pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Self> {
        Self::load_with(
            config,
            w,
            |w, p, i| {
                let opts = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: false };
                attention(config, w, p, i, opts)
            },
            |w, p, _| dense_mlp(config, w, p),
        )
    }

    /// The decoder with each layer's attention and MLP built by the given functions
    /// (`(weights, "model.layers.{i}", i)`).
    pub fn load_with(
        config: &ModelConfig,
        w: &mut Weights,
        attn: impl Fn(&mut Weights, &str, usize) -> Result<Attention>,
        mlp: impl Fn(&mut Weights, &str, usize) -> Result<FeedForward>,
    ) -> Result<Self> {
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Block {
                self_attn: attn(w, &p, i)?,
                mlp: mlp(w, &p, i)?,
                input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), eps)?,
                post_attention_layernorm: w.rms_norm(&format!("{p}.post_attention_layernorm"), eps)?,
            });
        }
        let (embed_tokens, lm_head) = embeddings(config, w, HeadTying::AsConfigSays)?;
        let norm = w.rms_norm("model.norm", eps)?;
        Ok(Self { embed_tokens, layers, norm, lm_head })
    }
}

/// When the LM head may be the embedding (a checkpoint without `lm_head.weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadTying {
    /// When config.json's `tie_word_embeddings` says so.
    AsConfigSays,
    /// Always (families whose LM head is the embedding by definition).
    Always,
}

/// The embedding, and the LM head unless it is tied to it.
pub fn embeddings(config: &ModelConfig, w: &mut Weights, tying: HeadTying) -> Result<(Linear, Option<Linear>)> {
    let tied = match tying {
        HeadTying::AsConfigSays => config.tie_word_embeddings,
        HeadTying::Always => true,
    };
    let embed_tokens = w.linear("model.embed_tokens", Bias::Absent)?;
    let lm_head = if w.contains("lm_head.weight") {
        Some(w.linear("lm_head", Bias::Absent)?)
    } else if tied {
        None
    } else {
        bail!("checkpoint has no lm_head.weight and config.json does not tie word embeddings");
    };
    if embed_tokens.out_features() as usize != config.vocab_size {
        bail!(
            "embedding has {} rows but config.json says vocab_size {}",
            embed_tokens.out_features(),
            config.vocab_size
        );
    }
    Ok((embed_tokens, lm_head))
}

impl CausalLm for Model {
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        self.forward_embeddings(self.embed_tokens.rows(&batch.token_ids)?, batch, cache)
    }

    fn final_norm(&self, hidden: &Array) -> Result<Array> {
        self.norm.forward(hidden)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        let x = self.norm.forward(hidden)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(head.forward(&x)?.as_dtype(mlx_rs::Dtype::Float32)?)
    }

    fn weights(&self) -> Vec<&Array> {
        let layers = self
            .layers
            .iter()
            .map(|l| (&l.self_attn, l.mlp.linears(), vec![&l.input_layernorm, &l.post_attention_layernorm]));
        let mut v = decoder_weights(&self.embed_tokens, self.lm_head.as_ref(), &self.norm, layers);
        v.extend(self.layers.iter().filter_map(|l| match &l.mlp {
            FeedForward::Sparse(m) => m.routing_bias(),
            FeedForward::Dense(_) => None,
        }));
        v
    }

    fn attention_features(&self) -> AttentionFeatures {
        AttentionFeatures { sinks: self.layers.iter().any(|l| l.self_attn.sinks.is_some()) }
    }
}
