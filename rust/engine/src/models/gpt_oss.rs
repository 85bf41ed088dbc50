//! gpt-oss (`GptOssForCausalLM`): the Llama decoder with attention sinks (a learned logit per head
//! in each softmax's denominator), q/k/v/o biases by `attention_bias`, sliding-window and full
//! layers by `layer_types`, YaRN RoPE, and a mixture of experts in every layer: a router with a
//! bias whose top-k logits are softmaxed, experts with biases and a clamped SwiGLU
//! (`swiglu_alpha`, `swiglu_limit`).
//! Block: pre-norm; attention with RoPE and sinks (windowed on sliding layers); top-k mixture of
//! clamped-SwiGLU experts.
//!
//! Experts come in transformers' layout, `mlp.experts.gate_up_proj` `[experts, hidden, 2 * inter]`
//! (x times it; gate and up columns interleaved) with `gate_up_proj_bias`, `down_proj`
//! `[experts, inter, hidden]` with `down_proj_bias`, in OpenAI's MXFP4 layout as published
//! (`gate_up_proj_blocks` / `_scales`, rows `[experts, 2 * inter]` interleaved, `down_proj_blocks` /
//! `_scales`, config.json `quantization_config.quant_method` "mxfp4"), or in mlx-lm's,
//! `mlp.experts.{gate,up,down}_proj` stacked `[experts, out, in]` with `.bias` (quantized or not).

use anyhow::{ensure, Context, Result};
use mlx_rs::Array;

use crate::config::ModelConfig;
use crate::layers::linear::{Linear, Quantization};
use crate::layers::mlp::Activation;
use crate::layers::moe::{check_expert_counts, Routing, SparseMoe};
use crate::models::llama::{attention, AttnOptions, FeedForward, Model};
use crate::models::{kv_per_layer, RopeRules, windows_by_layer_types, Family, PartialRotary};
use crate::weights::{Bias, Weights};

pub const GPT_OSS: Family = Family {
    architectures: &["GptOssForCausalLM"],
    gguf_architecture: None,
    // The experts' activation is their own (`hidden_act` is not used).
    validate: check_expert_counts,
    layer_windows: windows_by_layer_types,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let opts = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: false };
    let act = Activation::ClampedSwiglu {
        alpha: config.swiglu_alpha.unwrap_or(1.702),
        limit: config.swiglu_limit.unwrap_or(7.0),
    };
    Model::load_with(
        config,
        w,
        |w, p, i| {
            let mut attn = attention(config, w, p, i, opts)?;
            let sinks = w.take(&format!("{p}.self_attn.sinks"))?;
            ensure!(sinks.shape() == [attn.num_heads], "{p}.self_attn.sinks has shape {:?}, expected [{}]", sinks.shape(), attn.num_heads);
            attn.sinks = Some(sinks);
            Ok(attn)
        },
        |w, p, _| Ok(FeedForward::Sparse(experts(config, w, &format!("{p}.mlp"), act)?)),
    )
}

/// The mixture at `prefix`: router `{prefix}.router`, experts in either layout (module docs).
fn experts(config: &ModelConfig, w: &mut Weights, prefix: &str, act: Activation) -> Result<SparseMoe> {
    let n = config.num_experts.context("num_local_experts")? as i32;
    let p = format!("{prefix}.experts");
    let [gate_proj, up_proj, down_proj] = if w.contains(&format!("{p}.gate_up_proj_blocks")) {
        let gate_up = w.mxfp4_experts(&format!("{p}.gate_up_proj"))?; // rows [E, 2 * inter]
        let gate_up_bias = w.take(&format!("{p}.gate_up_proj_bias"))?;
        let rows = gate_up.weight.shape()[1];
        let pick = |first: i32| -> Result<Linear> {
            let idx = Array::from_iter((first..rows).step_by(2), &[rows / 2]);
            let quant = match &gate_up.quant {
                None => None,
                Some(q) => Some(Quantization { scales: q.scales.take_axis(&idx, 1)?, ..q.clone() }),
            };
            Ok(Linear { weight: gate_up.weight.take_axis(&idx, 1)?, bias: Some(gate_up_bias.take_axis(&idx, 1)?), quant })
        };
        let mut down = w.mxfp4_experts(&format!("{p}.down_proj"))?;
        down.bias = Some(w.take(&format!("{p}.down_proj_bias"))?);
        [pick(0)?, pick(1)?, down]
    } else if w.contains(&format!("{p}.gate_up_proj")) {
        let gate_up = w.take(&format!("{p}.gate_up_proj"))?.swap_axes(1, 2)?; // [E, 2 * inter, hidden]
        let gate_up_bias = w.take(&format!("{p}.gate_up_proj_bias"))?;
        let rows = gate_up.shape()[1];
        let pick = |first: i32| -> Result<Linear> {
            let idx = Array::from_iter((first..rows).step_by(2), &[rows / 2]);
            let weight = gate_up.take_axis(&idx, 1)?;
            Ok(Linear { weight, bias: Some(gate_up_bias.take_axis(&idx, 1)?), quant: None })
        };
        let down = Linear {
            weight: w.take(&format!("{p}.down_proj"))?.swap_axes(1, 2)?.contiguous()?,
            bias: Some(w.take(&format!("{p}.down_proj_bias"))?),
            quant: None,
        };
        [pick(0)?, pick(1)?, down]
    } else {
        [
            w.linear(&format!("{p}.gate_proj"), Bias::Present)?,
            w.linear(&format!("{p}.up_proj"), Bias::Present)?,
            w.linear(&format!("{p}.down_proj"), Bias::Present)?,
        ]
    };
    for l in [&gate_proj, &up_proj, &down_proj] {
        ensure!(l.weight.ndim() == 3 && l.weight.shape()[0] == n, "{p}: expert weights of shape {:?}, expected {n} stacked", l.weight.shape());
    }
    mlx_rs::transforms::eval([&gate_proj, &up_proj, &down_proj].into_iter().flat_map(|l| l.arrays()))?;
    Ok(SparseMoe {
        gate: w.linear(&format!("{prefix}.router"), Bias::Present)?,
        gate_proj,
        up_proj,
        down_proj,
        top_k: config.num_experts_per_tok.context("num_experts_per_tok")? as i32,
        routing: Routing::TopKSoftmax,
        act,
        shared_experts: None,
        shared_expert_gate: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types_window_and_yarn_is_read() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["GptOssForCausalLM"],"hidden_size":64,"intermediate_size":64,
            "num_hidden_layers":3,"num_attention_heads":4,"head_dim":16,"vocab_size":100,
            "num_local_experts":4,"num_experts_per_tok":2,"sliding_window":8,
            "layer_types":["sliding_attention","full_attention","sliding_attention"],
            "rope_parameters":{"rope_type":"yarn","rope_theta":150000.0,"factor":32.0,"beta_fast":32.0,
            "beta_slow":1.0,"truncate":false,"original_max_position_embeddings":4096}}"#,
        )
        .unwrap();
        assert_eq!(c.layer_windows(), vec![Some(8), None, Some(8)]);
        let rs = c.rope_scaling.as_ref().unwrap();
        assert_eq!((rs.rope_type.as_deref(), rs.truncate, rs.beta_fast), (Some("yarn"), Some(false), Some(32.0)));
    }

    #[test]
    fn clamped_swiglu_clamps_gate_above_and_up_both_ways() {
        let (alpha, limit) = (1.702f32, 2.0f32);
        let gate = [-3.0f32, 0.5, 3.0, 1.0];
        let up = [-3.0f32, 1.0, 3.0, -1.5];
        let act = Activation::ClampedSwiglu { alpha, limit };
        let y = act.gated(&Array::from_slice(&gate, &[4]), &Array::from_slice(&up, &[4])).unwrap();
        y.eval().unwrap();
        for (i, v) in y.as_slice::<f32>().iter().enumerate() {
            let g = gate[i].min(limit);
            let u = up[i].clamp(-limit, limit);
            let want = (u + 1.0) * g / (1.0 + (-alpha * g).exp());
            assert!((v - want).abs() < 1e-6, "{i}: {v} vs {want}");
        }
    }
}
