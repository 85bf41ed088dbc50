//! Mixtral (`MixtralForCausalLM`): the Mistral decoder (sliding window when configured) with a
//! mixture of experts at `block_sparse_moe`: router `gate`, experts `w1` (gate), `w3` (up),
//! `w2` (down); the top-k routing weights are renormalised.
//! Block: pre-norm; attention with RoPE (windowed on every layer when configured); top-k mixture
//! of gated SiLU experts.

use anyhow::Result;

use crate::config::ModelConfig;
use crate::layers::moe::{check_expert_counts, sparse_moe, MoeOptions, Routing, SharedExpert};
use crate::models::llama::{attention, AttnOptions, FeedForward, Model};
use crate::models::{kv_per_layer, RopeRules, expect_activation, window_on_every_layer, Family, PartialRotary};
use crate::weights::Weights;

pub const MIXTRAL: Family = Family {
    architectures: &["MixtralForCausalLM"],
    gguf_architecture: None,
    validate: |config| {
        expect_activation(config, "silu")?;
        check_expert_counts(config)
    },
    layer_windows: window_on_every_layer,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    Model::load_with(
        config,
        w,
        |w, p, i| {
            let opts = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: false };
            attention(config, w, p, i, opts)
        },
        |w, p, _| -> Result<FeedForward> {
            let opts = MoeOptions {
                expert_names: ["w1", "w3", "w2"],
                routing: Routing::Softmax { norm_topk_prob: true },
                shared: SharedExpert::Absent,
            };
            let moe = sparse_moe(config, w, &format!("{p}.block_sparse_moe"), opts)?;
            Ok(FeedForward::Sparse(moe))
        },
    )
}
