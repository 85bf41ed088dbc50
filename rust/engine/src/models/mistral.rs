//! Mistral (`MistralForCausalLM`): the Llama decoder with a sliding window on every layer.
//! Block: pre-norm; attention with RoPE over the last `sliding_window` keys (full attention when
//! the window covers the context); gated SiLU MLP.

use crate::models::llama::Model;
use crate::models::{kv_per_layer, RopeRules, expect_activation, window_on_every_layer, Family, PartialRotary};

pub const MISTRAL: Family = Family {
    architectures: &["MistralForCausalLM"],
    gguf_architecture: Some("llama"),
    validate: |config| expect_activation(config, "silu"),
    layer_windows: window_on_every_layer,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(Model::load(config, w)?)),
};
