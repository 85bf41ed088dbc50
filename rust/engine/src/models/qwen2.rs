//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): the Llama decoder with biases on the q, k and v
//! projections (none on o).
//! Block: pre-norm; attention with q/k/v biases and RoPE; gated SiLU MLP.

use anyhow::{bail, Result};

use crate::config::ModelConfig;
use crate::models::llama::{attention, dense_mlp, AttnOptions, Model};
use crate::models::{kv_per_layer, RopeRules, expect_activation, full_attention, Family, PartialRotary};
use crate::weights::{Bias, Weights};

pub const QWEN2: Family = Family {
    architectures: &["Qwen2ForCausalLM"],
    gguf_architecture: Some("qwen2"),
    validate,
    // The window is off unless use_sliding_window, which `validate` refuses.
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

/// The rules of the Qwen families: SiLU, and Qwen's sliding window refused (not implemented).
pub fn validate(config: &ModelConfig) -> Result<()> {
    expect_activation(config, "silu")?;
    if config.use_sliding_window == Some(true) {
        bail!("Qwen sliding-window attention (use_sliding_window=true) is not supported");
    }
    Ok(())
}

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let attn = AttnOptions { qkv_bias: Bias::Present, o_bias: config.attention_bias.into(), qk_norm: false };
    Model::load_with(config, w, |w, p, i| attention(config, w, p, i, attn), |w, p, _| dense_mlp(config, w, p))
}
