//! Model families. Each is one file with plain structs named after its HF config.

pub mod llama;

use anyhow::Result;
use mlx_rs::Array;

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::nn::{Linear, RmsNorm};
use crate::weights::Weights;

pub trait CausalLm: Send {
    /// Hidden states `[T, hidden]` of the step's flattened tokens; writes their K/V into `cache`.
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array>;
    /// float32 logits of some rows of `forward`'s output.
    fn logits(&self, hidden: &Array) -> Result<Array>;
    fn parameters(&self) -> Vec<&Linear>;
    fn norms(&self) -> Vec<&RmsNorm>;
}

pub fn load(config: &ModelConfig, weights: &mut Weights) -> Result<Box<dyn CausalLm>> {
    match config.architecture()? {
        "LlamaForCausalLM" | "MistralForCausalLM" => Ok(Box::new(llama::Model::load(config, weights)?)),
        other => unreachable!("architecture {other} passed validation without a model"),
    }
}
