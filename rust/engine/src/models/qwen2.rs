//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): the Llama decoder with biases on the q, k and v
//! projections (none on o).

use anyhow::Result;

use crate::config::ModelConfig;
use crate::models::llama::{attention, dense_mlp, Model};
use crate::weights::Weights;

pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Model> {
    Model::load_with(config, w, |w, p, i| attention(config, w, p, i, true, false), |w, p, _| dense_mlp(config, w, p))
}
