//! Qwen3-Next (`Qwen3NextForCausalLM`) and Qwen3.5 / Qwen3.6 (`Qwen3_5ForCausalLM`,
//! `Qwen3_5MoeForCausalLM`, and the text stack of their `*ForConditionalGeneration`
//! checkpoints): hybrid stacks where most layers are Gated DeltaNet linear attention
//! (`layer_types` "linear_attention") and every few a gated full attention.
//! Block: pre-norm; token mixer (linear attention, or attention whose `q_proj` also yields a
//! per-head sigmoid gate on the output, q/k RMSNorm, partial RoPE); dense gated SiLU MLP or a
//! top-k mixture with a sigmoid-gated shared expert. Norms outside the DeltaNet scale by
//! (1 + weight).
//! Qwen3-Next projects q/k/v/z and b/a interleaved per key head (`in_proj_qkvz`, `in_proj_ba`);
//! Qwen3.5 projects them apart (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`).

use anyhow::{bail, ensure, Context, Result};
use mlx_rs::{Array, Dtype};

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::{PagedKvCache, StateGeometry};
use crate::layers::attention::{Attention, OutputGate, Qkv};
use crate::layers::gated_delta::GatedDeltaNet;
use crate::layers::linear::Linear;
use crate::layers::moe::{check_expert_counts, sparse_moe, MoeOptions, Routing, SharedExpert};
use crate::layers::norm::RmsNorm;
use crate::models::llama::{attention_from, dense_mlp, embeddings, FeedForward, HeadTying};
use crate::models::{expect_activation, full_attention, kv_per_layer, CausalLm, Family, PartialRotary, RopeRules};
use crate::weights::{Bias, Weights};

const HYBRID: PartialRotary = PartialRotary::Accepted { default: 0.25 };

pub const QWEN3_NEXT: Family = Family {
    architectures: &["Qwen3NextForCausalLM"],
    gguf_architecture: None,
    validate,
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: HYBRID,
    load: |config, w| Ok(Box::new(Model::load(config, w, Projections::Interleaved)?)),
};

pub const QWEN3_5: Family = Family {
    architectures: &[
        "Qwen3_5ForCausalLM",
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration",
    ],
    gguf_architecture: None,
    validate,
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: HYBRID,
    load: |config, w| {
        // Vision-language checkpoints keep the text stack under `model.language_model` (HF) or
        // `language_model.model` (mlx-lm); transformers 5 stores experts fused.
        w.rename_prefix("model.language_model.", "model.");
        w.rename_prefix("language_model.model.", "model.");
        w.rename_prefix("language_model.lm_head.", "lm_head.");
        w.restack_fused_experts()?;
        Ok(Box::new(Model::load(config, w, Projections::Apart)?))
    },
};

fn validate(config: &ModelConfig) -> Result<()> {
    expect_activation(config, "silu")?;
    let geo = config.state_geometry(Dtype::Float32)?.context("config has no linear-attention dimensions (linear_num_value_heads, ...)")?;
    let (hk, hv) = (config.linear_num_key_heads.unwrap_or(0), config.linear_num_value_heads.unwrap_or(0));
    ensure!(hk > 0 && hv % hk == 0, "linear_num_value_heads {hv} is not a multiple of linear_num_key_heads {hk}");
    ensure!(geo.conv[0] >= 1, "linear_conv_kernel_dim must be at least 2");
    if config.num_experts.unwrap_or(0) > 0 {
        check_expert_counts(config)?;
    }
    Ok(())
}

/// How the checkpoint lays out the DeltaNet's input projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projections {
    /// `in_proj_qkvz` / `in_proj_ba`, grouped by key head.
    Interleaved,
    /// `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Apart,
}

enum Mixer {
    Attention(Attention),
    Linear(GatedDeltaNet),
}

struct Block {
    mixer: Mixer,
    mlp: FeedForward,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

pub struct Model {
    embed_tokens: Linear,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
}

/// Rows of `[groups * (sum of parts)]` reordered part-major: all groups' first part, then all
/// groups' second part, ...
fn part_major(groups: i32, parts: &[i32]) -> Array {
    let size: i32 = parts.iter().sum();
    let mut idx = Vec::with_capacity((groups * size) as usize);
    let mut at = 0;
    for &p in parts {
        for g in 0..groups {
            idx.extend(g * size + at..g * size + at + p);
        }
        at += p;
    }
    Array::from_slice(&idx, &[groups * size])
}

fn delta_net(config: &ModelConfig, w: &mut Weights, prefix: &str, layout: Projections, ssm_dtype: Dtype) -> Result<GatedDeltaNet> {
    let p = format!("{prefix}.linear_attn");
    let hk = config.linear_num_key_heads.context("linear_num_key_heads")? as i32;
    let hv = config.linear_num_value_heads.context("linear_num_value_heads")? as i32;
    let dk = config.linear_key_head_dim.context("linear_key_head_dim")? as i32;
    let dv = config.linear_value_head_dim.context("linear_value_head_dim")? as i32;
    let k = config.linear_conv_kernel_dim.unwrap_or(4) as i32;
    let r = hv / hk;
    let parts = match layout {
        Projections::Interleaved => {
            let qkvz = w.linear(&format!("{p}.in_proj_qkvz"), Bias::Absent)?;
            let ba = w.linear(&format!("{p}.in_proj_ba"), Bias::Absent)?;
            vec![qkvz.take_rows(&part_major(hk, &[dk, dk, r * dv, r * dv]))?, ba.take_rows(&part_major(hk, &[r, r]))?]
        }
        Projections::Apart => ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]
            .iter()
            .map(|n| w.linear(&format!("{p}.{n}"), Bias::Absent))
            .collect::<Result<_>>()?,
    };
    let refs: Vec<&Linear> = parts.iter().collect();
    let in_proj = match Linear::stack_rows(&refs)? {
        Some(one) => vec![one],
        None => parts,
    };
    let conv_dim = 2 * hk * dk + hv * dv;
    let conv = w.take(&format!("{p}.conv1d.weight"))?;
    ensure!(conv.size() as i32 == conv_dim * k, "{p}.conv1d.weight has shape {:?}, expected [{conv_dim}, 1, {k}]", conv.shape());
    let conv_weight = conv.reshape(&[conv_dim, k])?.transpose()?;
    let a_log = w.take_f32(&format!("{p}.A_log"))?;
    Ok(GatedDeltaNet {
        in_proj,
        conv_weight,
        dt_bias: w.take_f32(&format!("{p}.dt_bias"))?,
        neg_a: mlx_rs::ops::exp(&a_log)?.negative()?,
        norm: w.rms_norm(&format!("{p}.norm"), config.rms_norm_eps)?,
        out_proj: w.linear(&format!("{p}.out_proj"), Bias::Absent)?,
        num_k_heads: hk,
        num_v_heads: hv,
        head_k_dim: dk,
        head_v_dim: dv,
        conv_kernel: k,
        ssm_dtype,
    })
}

/// How the checkpoint stores the (1 + weight) norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NormGains {
    /// The bare weight (HF).
    PlusOne,
    /// The 1 added in (mlx-lm's converter).
    Baked,
}

impl NormGains {
    fn load(self, w: &mut Weights, name: &str, eps: f32) -> Result<RmsNorm> {
        match self {
            Self::PlusOne => w.rms_norm_plus_one(name, eps),
            Self::Baked => w.rms_norm(name, eps),
        }
    }
}

fn gated_attention(config: &ModelConfig, w: &mut Weights, prefix: &str, layer: usize, gains: NormGains) -> Result<Attention> {
    let p = format!("{prefix}.self_attn");
    let b = Bias::from(config.attention_bias);
    let q = w.linear(&format!("{p}.q_proj"), b)?;
    let expected = 2 * config.num_attention_heads * config.head_dim();
    if q.out_features() as usize != expected {
        bail!("{p}.q_proj has {} outputs, expected {expected} (queries and their gates)", q.out_features());
    }
    let k = w.linear(&format!("{p}.k_proj"), b)?;
    let v = w.linear(&format!("{p}.v_proj"), b)?;
    let o = w.linear(&format!("{p}.o_proj"), b)?;
    let eps = config.rms_norm_eps;
    let q_norm = gains.load(w, &format!("{p}.q_norm"), eps)?;
    let k_norm = gains.load(w, &format!("{p}.k_norm"), eps)?;
    let mut attn = attention_from(config, layer, Qkv::new(q, k, v)?, o, Some(q_norm), Some(k_norm))?;
    attn.output_gate = OutputGate::QueryHeadSigmoid;
    Ok(attn)
}

fn feed_forward(config: &ModelConfig, w: &mut Weights, prefix: &str, layer: usize) -> Result<FeedForward> {
    let step = config.decoder_sparse_step.unwrap_or(1).max(1);
    let sparse = config.num_experts.unwrap_or(0) > 0 && !config.mlp_only_layers.contains(&layer) && (layer + 1) % step == 0;
    if !sparse {
        return dense_mlp(config, w, prefix);
    }
    let opts = MoeOptions {
        expert_names: ["gate_proj", "up_proj", "down_proj"],
        routing: Routing::Softmax { norm_topk_prob: config.norm_topk_prob.unwrap_or(true) },
        shared: SharedExpert::Gated,
    };
    Ok(FeedForward::Sparse(sparse_moe(config, w, &format!("{prefix}.mlp"), opts)?))
}

impl Model {
    fn load(config: &ModelConfig, w: &mut Weights, layout: Projections) -> Result<Self> {
        let eps = config.rms_norm_eps;
        // mlx-lm's converter stores the convolution as `[C, K, 1]` and adds the 1 of the
        // (1 + weight) norms into the weights; HF checkpoints have `[C, 1, K]` and the bare gains.
        let first_linear = (0..config.num_hidden_layers).find(|&i| config.is_linear_attention(i));
        let mlx_layout = first_linear
            .and_then(|i| w.shape(&format!("model.layers.{i}.linear_attn.conv1d.weight")))
            .is_some_and(|s| s.len() == 3 && s[2] == 1);
        let gains = if mlx_layout { NormGains::Baked } else { NormGains::PlusOne };
        let norm = |w: &mut Weights, name: &str| gains.load(w, name, eps);
        let ssm_dtype = config.ssm_dtype(w.dtype)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mixer = if config.is_linear_attention(i) {
                Mixer::Linear(delta_net(config, w, &p, layout, ssm_dtype)?)
            } else {
                Mixer::Attention(gated_attention(config, w, &p, i, gains)?)
            };
            layers.push(Block {
                mixer,
                mlp: feed_forward(config, w, &p, i)?,
                input_layernorm: norm(w, &format!("{p}.input_layernorm"))?,
                post_attention_layernorm: norm(w, &format!("{p}.post_attention_layernorm"))?,
            });
        }
        let (embed_tokens, lm_head) = embeddings(config, w, HeadTying::AsConfigSays)?;
        let norm = norm(w, "model.norm")?;
        Ok(Self { embed_tokens, layers, norm, lm_head })
    }
}

impl CausalLm for Model {
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let mut h = self.embed_tokens.rows(&batch.token_ids)?;
        for (i, l) in self.layers.iter().enumerate() {
            let x = l.input_layernorm.forward(&h)?;
            let mixed = match &l.mixer {
                Mixer::Attention(a) => a.forward(&x, batch, cache, i)?,
                Mixer::Linear(d) => d.forward(&x, batch, cache, i)?,
            };
            h = h.add(mixed)?;
            h = h.add(l.mlp.forward(&l.post_attention_layernorm.forward(&h)?)?)?;
        }
        Ok(h)
    }

    fn final_norm(&self, hidden: &Array) -> Result<Array> {
        self.norm.forward(hidden)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(head.forward(&self.norm.forward(hidden)?)?.as_dtype(Dtype::Float32)?)
    }

    fn weights(&self) -> Vec<&Array> {
        let mut linears: Vec<&Linear> = vec![&self.embed_tokens];
        linears.extend(self.lm_head.as_ref());
        let mut v: Vec<&Array> = vec![&self.norm.weight];
        for l in &self.layers {
            match &l.mixer {
                Mixer::Attention(a) => {
                    linears.extend(a.linears());
                    v.extend(a.norms().map(|n| &n.weight));
                }
                Mixer::Linear(d) => {
                    linears.extend(d.linears());
                    v.extend(d.arrays());
                }
            }
            linears.extend(l.mlp.linears());
            v.push(&l.input_layernorm.weight);
            v.push(&l.post_attention_layernorm.weight);
        }
        v.extend(linears.into_iter().flat_map(Linear::arrays));
        v
    }

    fn state_geometry(&self) -> Option<StateGeometry> {
        self.layers.iter().find_map(|l| match &l.mixer {
            Mixer::Linear(d) => Some(d.geometry()),
            Mixer::Attention(_) => None,
        })
    }
}
