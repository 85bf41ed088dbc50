//! Mixtral (`MixtralForCausalLM`): the Mistral decoder (sliding window when configured) with a
//! mixture of experts at `block_sparse_moe`: router `gate`, experts `w1` (gate), `w3` (up),
//! `w2` (down); the top-k routing weights are renormalised.

use anyhow::Result;

use crate::config::ModelConfig;
use crate::models::llama::{attention, FeedForward, Model};
use crate::layers::moe::sparse_moe;
use crate::weights::Weights;

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    Model::load_with(
        config,
        w,
        |w, p, i| attention(config, w, p, i, config.attention_bias, false),
        |w, p, _| -> Result<FeedForward> {
            let moe = sparse_moe(config, w, &format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"], true)?;
            Ok(FeedForward::Sparse(moe))
        },
    )
}
