//! Qwen3 (`Qwen3ForCausalLM`): the Llama decoder with a per-head RMSNorm of queries and keys
//! (`q_norm`, `k_norm` over head_dim) before RoPE; q/k/v biases only with `attention_bias`.
//! Qwen3-MoE (`Qwen3MoeForCausalLM`) has the same attention and a mixture of experts in the
//! layers `decoder_sparse_step` picks, except `mlp_only_layers`.
//! Block: pre-norm; attention with q/k RMSNorm before RoPE; gated SiLU MLP (Qwen3-MoE: or a
//! top-k mixture of gated SiLU experts).

use anyhow::Result;

use crate::config::ModelConfig;
use crate::layers::moe::{check_expert_counts, sparse_moe, MoeOptions, Routing, SharedExpert};
use crate::models::llama::{attention, dense_mlp, AttnOptions, FeedForward, Model};
use crate::models::{kv_per_layer, RopeRules, full_attention, qwen2, Family, PartialRotary};
use crate::weights::Weights;

pub const QWEN3: Family = Family {
    architectures: &["Qwen3ForCausalLM"],
    gguf_architecture: None,
    validate: qwen2::validate,
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

pub const QWEN3_MOE: Family = Family {
    architectures: &["Qwen3MoeForCausalLM"],
    gguf_architecture: None,
    validate: |config| {
        qwen2::validate(config)?;
        check_expert_counts(config)
    },
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(load_moe(config, w)?)),
};

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let attn = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: true };
    Model::load_with(config, w, |w, p, i| attention(config, w, p, i, attn), |w, p, _| dense_mlp(config, w, p))
}

pub fn load_moe(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let attn = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: true };
    let step = config.decoder_sparse_step.unwrap_or(1).max(1);
    Model::load_with(
        config,
        w,
        |w, p, i| attention(config, w, p, i, attn),
        |w, p, i| -> Result<FeedForward> {
            if config.mlp_only_layers.contains(&i) || (i + 1) % step != 0 {
                return dense_mlp(config, w, p);
            }
            // Experts at mlp.experts.{e}.{gate,up,down}_proj, router at mlp.gate.
            let opts = MoeOptions {
                expert_names: ["gate_proj", "up_proj", "down_proj"],
                routing: Routing::Softmax { norm_topk_prob: config.norm_topk_prob.unwrap_or(false) },
                shared: SharedExpert::Absent,
            };
            Ok(FeedForward::Sparse(sparse_moe(config, w, &format!("{p}.mlp"), opts)?))
        },
    )
}
