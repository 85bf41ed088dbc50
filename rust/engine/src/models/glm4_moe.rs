//! GLM-4.5 / GLM-4.6 (`Glm4MoeForCausalLM`): the Llama decoder with partial rotary embeddings
//! (RoPE on the first `partial_rotary_factor` of each head, 0.5 when the config gives none), q/k/v
//! biases by `attention_bias` but none on o, per-head q/k RMSNorm by `use_qk_norm`, and from layer
//! `first_k_dense_replace` on a mixture of experts with sigmoid grouped top-k routing (see
//! [`SigmoidRouting`]) plus shared experts.
//! Block: pre-norm; attention with partial RoPE; gated SiLU MLP, or routed experts + shared experts.

use anyhow::{ensure, Result};
use mlx_rs::Dtype;

use crate::config::ModelConfig;
use crate::layers::moe::{check_expert_counts, check_expert_groups, sparse_moe, MoeOptions, Routing, SharedExpert, SigmoidRouting};
use crate::models::llama::{attention, dense_mlp, AttnOptions, FeedForward, Model};
use crate::models::{kv_per_layer, RopeRules, expect_activation, full_attention, Family, PartialRotary};
use crate::weights::{Bias, Weights};

pub const GLM4_MOE: Family = Family {
    architectures: &["Glm4MoeForCausalLM"],
    gguf_architecture: None,
    validate: |config| {
        expect_activation(config, "silu")?;
        check_expert_counts(config)?;
        check_expert_groups(config)?;
        // The shared experts are one MLP of n_shared_experts experts' width (read from the weights).
        ensure!(config.n_shared_experts.unwrap_or(1) >= 1, "Glm4MoeForCausalLM needs n_shared_experts >= 1");
        Ok(())
    },
    layer_windows: full_attention,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Accepted { default: 0.5 },
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let attn = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: Bias::Absent, qk_norm: config.use_qk_norm };
    let dense_layers = config.first_k_dense_replace.unwrap_or(1);
    Model::load_with(
        config,
        w,
        |w, p, i| attention(config, w, p, i, attn),
        |w, p, i| -> Result<FeedForward> {
            if i < dense_layers {
                return dense_mlp(config, w, p);
            }
            let prefix = format!("{p}.mlp");
            let routing = Routing::Sigmoid(SigmoidRouting {
                e_score_correction_bias: w.take_f32(&format!("{prefix}.gate.e_score_correction_bias"))?,
                n_group: config.n_group.unwrap_or(1) as i32,
                topk_group: config.topk_group.unwrap_or(1) as i32,
                norm_topk_prob: config.norm_topk_prob.unwrap_or(true),
                routed_scaling_factor: config.routed_scaling_factor.unwrap_or(1.0),
            });
            let opts = MoeOptions { expert_names: ["gate_proj", "up_proj", "down_proj"], routing, shared: SharedExpert::Plain };
            let mut moe = sparse_moe(config, w, &prefix, opts)?;
            // transformers routes in float32 whatever the model's dtype: near-ties between sigmoid
            // scores pick the same experts.
            if moe.gate.quant.is_none() {
                moe.gate.weight = moe.gate.weight.as_dtype(Dtype::Float32)?;
            }
            Ok(FeedForward::Sparse(moe))
        },
    )
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;

    /// 8 experts, `k` active.
    fn config(k: usize, extra: &str) -> anyhow::Result<ModelConfig> {
        ModelConfig::from_json(&format!(
            r#"{{"architectures":["Glm4MoeForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"head_dim":32,"vocab_size":100,
            "n_routed_experts":8,"num_experts_per_tok":{k}{extra}}}"#
        ))
    }

    #[test]
    fn half_the_head_rotates_unless_the_config_says_otherwise() {
        assert_eq!(config(2, "").unwrap().rotary_dim(), 16);
        assert_eq!(config(2, r#","partial_rotary_factor":0.25"#).unwrap().rotary_dim(), 8);
        let hf5 = r#","rope_parameters":{"rope_type":"default","rope_theta":10000.0,"partial_rotary_factor":1.0}"#;
        assert_eq!(config(2, hf5).unwrap().rotary_dim(), 32);
    }

    #[test]
    fn expert_groups_must_split_the_experts() {
        config(3, r#","n_group":4,"topk_group":2"#).unwrap();
        for (k, extra, what) in [
            (2, r#","n_group":3,"topk_group":1"#, "groups of two"),
            (1, r#","n_group":8,"topk_group":1"#, "groups of two"),
            (2, r#","n_group":2,"topk_group":3"#, "topk_group 3 must be"),
            (3, r#","n_group":4,"topk_group":1"#, "cannot hold num_experts_per_tok 3"),
        ] {
            let err = format!("{:#}", config(k, extra).unwrap_err());
            assert!(err.contains(what), "{extra}: {err}");
        }
    }
}
