//! Gemma 2 and Gemma 3 text (`Gemma2ForCausalLM`, `Gemma3ForCausalLM`): embeddings scaled by
//! sqrt(hidden_size), RMSNorm with gain (1 + w), "sandwich" norms around attention and MLP,
//! GELU (tanh) MLP, attention scale query_pre_attn_scalar^-0.5, alternating local (sliding
//! window) and global layers, logit soft-capping (Gemma 2: attention scores and final logits).
//! Gemma 3 adds per-head (1 + w) q/k norms and a separate RoPE base for local layers.
//! Block: sandwich norms (before and after attention and MLP); attention with RoPE, windowed on
//! local layers (Gemma 3: q/k RMSNorm before RoPE); gated GELU (tanh) MLP.

use anyhow::Result;
use mlx_rs::{Array, Dtype};

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::layers::attention::Attention;
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, Mlp};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::layers::{scalar, softcap};
use crate::models::llama::{attention, embeddings, AttnOptions, HeadTying};
use crate::models::{kv_per_layer, RopeRules, decoder_weights, expect_activation, CausalLm, Family, PartialRotary};
use crate::weights::{Bias, Weights};

pub const GEMMA: Family = Family {
    architectures: &["Gemma2ForCausalLM", "Gemma3ForCausalLM"],
    gguf_architecture: None,
    validate: |config| expect_activation(config, "gelu_pytorch_tanh"),
    layer_windows,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(Model::load(config, w)?)),
};

/// Local (sliding-window) and global layers: by `layer_types` (transformers 5), else every
/// `sliding_window_pattern`-th layer global (Gemma 3), else alternating from a local layer (Gemma 2).
fn layer_windows(config: &ModelConfig) -> Vec<Option<usize>> {
    (0..config.num_hidden_layers)
        .map(|i| {
            let local = match (&config.layer_types, config.sliding_window_pattern) {
                (Some(t), _) => t.get(i).is_some_and(|t| t == "sliding_attention"),
                (None, Some(p)) => (i + 1) % p != 0,
                (None, None) => i % 2 == 0,
            };
            if local { config.sliding_window } else { None }
        })
        .collect()
}

pub struct Block {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: RmsNorm,
    pub post_feedforward_layernorm: RmsNorm,
}

impl Block {
    fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache, layer: usize) -> Result<Array> {
        let a = self.self_attn.forward(&self.input_layernorm.forward(x)?, batch, cache, layer)?;
        let h = x.add(self.post_attention_layernorm.forward(&a)?)?;
        let m = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        Ok(h.add(self.post_feedforward_layernorm.forward(&m)?)?)
    }
}

pub struct Model {
    pub embed_tokens: Linear,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// Gemma ties the head to the embedding; a checkpoint may still carry lm_head.weight.
    pub lm_head: Option<Linear>,
    pub hidden_size: usize,
    pub final_logit_softcapping: Option<f32>,
}

impl Model {
    pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let gemma3 = config.architecture()? == "Gemma3ForCausalLM";
        let eps = config.rms_norm_eps;
        let scale = config.query_pre_attn_scalar.unwrap_or(config.head_dim() as f32).powf(-0.5);
        let windows = config.layer_windows();
        // Gemma 3's local layers use their own base (and no scaling).
        let local_rope = match (gemma3, config.rope_local_base_freq) {
            (true, Some(base)) => Some(base),
            (true, None) => Some(10000.0),
            _ => None,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let opts = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: false };
            let mut self_attn = attention(config, w, &p, i, opts)?;
            if gemma3 {
                self_attn.q_norm = Some(w.rms_norm_plus_one(&format!("{p}.self_attn.q_norm"), eps)?);
                self_attn.k_norm = Some(w.rms_norm_plus_one(&format!("{p}.self_attn.k_norm"), eps)?);
            }
            if let (Some(base), Some(_)) = (local_rope, windows[i]) {
                self_attn.rope = Some(Rope::from_config(config.head_dim(), base, None, None, None)?);
            }
            self_attn.scale = scale;
            self_attn.softcap = config.attn_logit_softcapping;
            let norm = |w: &mut Weights, name: &str| w.rms_norm_plus_one(&format!("{p}.{name}"), eps);
            layers.push(Block {
                self_attn,
                mlp: Mlp::new(
                    w.linear(&format!("{p}.mlp.gate_proj"), Bias::Absent)?,
                    w.linear(&format!("{p}.mlp.up_proj"), Bias::Absent)?,
                    w.linear(&format!("{p}.mlp.down_proj"), Bias::Absent)?,
                    Activation::from_name(config.activation())?,
                )?,
                input_layernorm: norm(w, "input_layernorm")?,
                post_attention_layernorm: norm(w, "post_attention_layernorm")?,
                pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
                post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
            });
        }
        let (embed_tokens, lm_head) = embeddings(config, w, HeadTying::Always)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: w.rms_norm_plus_one("model.norm", eps)?,
            lm_head,
            hidden_size: config.hidden_size,
            final_logit_softcapping: config.final_logit_softcapping,
        })
    }
}

impl CausalLm for Model {
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let h = self.embed_tokens.rows(&batch.token_ids)?;
        // The normalizer is rounded to the activation dtype, as in the reference implementation.
        let mut h = h.multiply(scalar((self.hidden_size as f32).sqrt(), &h)?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, batch, cache, i)?;
        }
        Ok(h)
    }

    fn final_norm(&self, hidden: &Array) -> Result<Array> {
        self.norm.forward(hidden)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        let x = self.norm.forward(hidden)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let logits = head.forward(&x)?.as_dtype(Dtype::Float32)?;
        match self.final_logit_softcapping {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    fn weights(&self) -> Vec<&Array> {
        let layers = self.layers.iter().map(|l| {
            let norms = vec![
                &l.input_layernorm,
                &l.post_attention_layernorm,
                &l.pre_feedforward_layernorm,
                &l.post_feedforward_layernorm,
            ];
            (&l.self_attn, l.mlp.linears(), norms)
        });
        decoder_weights(&self.embed_tokens, self.lm_head.as_ref(), &self.norm, layers)
    }
}
