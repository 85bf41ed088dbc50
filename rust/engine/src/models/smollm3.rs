//! SmolLM3 (`SmolLM3ForCausalLM`): the Llama decoder in which some layers have no positional
//! encoding (NoPE): `no_rope_layers[i]` is 1 where layer i rotates queries and keys, 0 where it
//! does not; without the list, every `no_rope_layer_interval`-th layer (default 4) is NoPE.
//! Layers `layer_types` marks "sliding_attention" attend over the last `sliding_window` keys.
//! Block: pre-norm; attention with RoPE or none; gated SiLU MLP.

use anyhow::{ensure, Result};

use crate::config::ModelConfig;
use crate::models::llama::{attention, dense_mlp, AttnOptions, Model};
use crate::models::{kv_per_layer, RopeRules, expect_activation, windows_by_layer_types, Family, PartialRotary};
use crate::weights::Weights;

pub const SMOLLM3: Family = Family {
    architectures: &["SmolLM3ForCausalLM"],
    gguf_architecture: None,
    validate: |config| {
        expect_activation(config, "silu")?;
        if let Some(l) = &config.no_rope_layers {
            ensure!(
                l.len() == config.num_hidden_layers && l.iter().all(|&v| v <= 1),
                "no_rope_layers must give 0 or 1 for each of the {} layers, got {l:?}",
                config.num_hidden_layers
            );
        }
        ensure!(config.no_rope_layer_interval != Some(0), "no_rope_layer_interval must be at least 1");
        Ok(())
    },
    // transformers masks the layers `layer_types` marks sliding with `sliding_window` whatever
    // `use_sliding_window` says; its config marks them only when that is set, and only NoPE layers.
    layer_windows: windows_by_layer_types,
    kv_layers: kv_per_layer,
    rope: RopeRules::Shared,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(load(config, w)?)),
};

/// Whether layer `layer` rotates its queries and keys (transformers' rule for a config without
/// `no_rope_layers`: every `no_rope_layer_interval`-th layer has no RoPE).
pub fn uses_rope(config: &ModelConfig, layer: usize) -> bool {
    match &config.no_rope_layers {
        Some(l) => l[layer] == 1,
        None => (layer + 1) % config.no_rope_layer_interval.unwrap_or(4) != 0,
    }
}

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    let opts = AttnOptions { qkv_bias: config.attention_bias.into(), o_bias: config.attention_bias.into(), qk_norm: false };
    Model::load_with(
        config,
        w,
        |w, p, i| {
            let mut attn = attention(config, w, p, i, opts)?;
            if !uses_rope(config, i) {
                attn.rope = None;
            }
            Ok(attn)
        },
        |w, p, _| dense_mlp(config, w, p),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ModelConfig {
        let text = format!(
            r#"{{"architectures":["SmolLM3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":8,"num_attention_heads":4,"vocab_size":100{extra}}}"#
        );
        ModelConfig::from_json(&text).unwrap()
    }

    #[test]
    fn nope_layers_by_list_or_interval() {
        let rope = |c: &ModelConfig| (0..8).map(|i| uses_rope(c, i)).collect::<Vec<_>>();
        let (t, f) = (true, false);
        assert_eq!(rope(&config("")), vec![t, t, t, f, t, t, t, f]);
        assert_eq!(rope(&config(r#","no_rope_layer_interval":3"#)), vec![t, t, f, t, t, f, t, t]);
        let listed = config(r#","no_rope_layer_interval":3,"no_rope_layers":[0,1,1,1,1,1,1,0]"#);
        assert_eq!(rope(&listed), vec![f, t, t, t, t, t, t, f]);
        let text = r#"{"architectures":["SmolLM3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100,"no_rope_layers":[1]}"#;
        assert!(format!("{:#}", ModelConfig::from_json(text).unwrap_err()).contains("no_rope_layers"));
    }

    #[test]
    fn windows_follow_layer_types() {
        let types = r#","sliding_window":16,"layer_types":["full_attention","full_attention","full_attention",
            "sliding_attention","full_attention","full_attention","full_attention","sliding_attention"]"#;
        let w = config(types).layer_windows();
        assert_eq!(w, vec![None, None, None, Some(16), None, None, None, Some(16)]);
        assert_eq!(config(r#","sliding_window":16"#).layer_windows(), vec![None; 8]);
    }
}
