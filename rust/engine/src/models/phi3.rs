//! Phi-3 (`Phi3ForCausalLM`): the Llama decoder with fused projections — `qkv_proj` (q, k, v rows
//! in that order) and `gate_up_proj` (gate rows, then up rows), which the shared layers take as
//! they are, and longrope scaling (short / long factors, attention factor) in the RoPE.
//! Block: pre-norm; attention with RoPE (longrope allowed; windowed on every layer when
//! configured); gated SiLU MLP.

use anyhow::{ensure, Result};

use crate::config::ModelConfig;
use crate::layers::attention::Qkv;
use crate::layers::mlp::{Activation, Mlp};
use crate::models::llama::{attention_from, FeedForward, Model};
use crate::models::{kv_per_layer, RopeRules, expect_activation, window_on_every_layer, Family, PartialRotary};
use crate::weights::{Bias, Weights};

pub const PHI3: Family = Family {
    architectures: &["Phi3ForCausalLM"],
    gguf_architecture: None,
    validate: |config| expect_activation(config, "silu"),
    layer_windows: window_on_every_layer,
    kv_layers: kv_per_layer,
    rope: RopeRules::SharedWithLongrope,
    partial_rotary: PartialRotary::Accepted { default: 1.0 },
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let d = config.head_dim() as i32;
    let q = config.num_attention_heads as i32 * d;
    let kv = config.num_kv_heads() as i32 * d;
    let inter = config.intermediate_size as i32;
    Model::load_with(
        config,
        w,
        |w, p, i| {
            let qkv = w.linear(&format!("{p}.self_attn.qkv_proj"), Bias::Absent)?;
            ensure!(qkv.out_features() == q + 2 * kv, "{p}.self_attn.qkv_proj has {} rows, expected {}", qkv.out_features(), q + 2 * kv);
            let o_proj = w.linear(&format!("{p}.self_attn.o_proj"), Bias::Absent)?;
            attention_from(config, i, Qkv::Stacked { linear: qkv, q, kv }, o_proj, None, None)
        },
        |w, p, _| {
            let gate_up = w.linear(&format!("{p}.mlp.gate_up_proj"), Bias::Absent)?;
            ensure!(gate_up.out_features() == 2 * inter, "{p}.mlp.gate_up_proj has {} rows, expected {}", gate_up.out_features(), 2 * inter);
            let down_proj = w.linear(&format!("{p}.mlp.down_proj"), Bias::Absent)?;
            Ok(FeedForward::Dense(Mlp::stacked(gate_up, down_proj, Activation::from_name(config.activation())?)))
        },
    )
}
