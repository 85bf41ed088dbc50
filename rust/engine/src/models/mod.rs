//! Model families. Each is one file with plain structs named after its HF config; the Llama
//! decoder (llama.rs) is the base that most families fill with their own attention or MLP.

pub mod gemma;
pub mod llama;
pub mod mixtral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use anyhow::Result;
use mlx_rs::Array;

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::layers::attention::Attention;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::weights::Weights;

pub trait CausalLm: Send {
    /// Hidden states `[T, hidden]` of the step's flattened tokens; writes their K/V into `cache`.
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array>;
    /// float32 logits of some rows of `forward`'s output.
    fn logits(&self, hidden: &Array) -> Result<Array>;
    fn parameters(&self) -> Vec<&Linear>;
    fn norms(&self) -> Vec<&RmsNorm>;
}

/// A decoder's linears: the embedding, the LM head unless tied, then each layer's attention and
/// MLP linears (the layers given as `(attention, mlp linears)`).
pub fn decoder_linears<'a>(
    embed_tokens: &'a Linear,
    lm_head: Option<&'a Linear>,
    layers: impl IntoIterator<Item = (&'a Attention, Vec<&'a Linear>)>,
) -> Vec<&'a Linear> {
    let mut v = vec![embed_tokens];
    v.extend(lm_head);
    for (attn, mlp) in layers {
        v.extend(attn.linears());
        v.extend(mlp);
    }
    v
}

pub fn load(config: &ModelConfig, weights: &mut Weights) -> Result<Box<dyn CausalLm>> {
    Ok(match config.architecture()? {
        "LlamaForCausalLM" | "MistralForCausalLM" => Box::new(llama::Model::load(config, weights)?),
        "Qwen2ForCausalLM" => Box::new(qwen2::load(config, weights)?),
        "Qwen3ForCausalLM" => Box::new(qwen3::load(config, weights)?),
        "Qwen3MoeForCausalLM" => Box::new(qwen3::load_moe(config, weights)?),
        "MixtralForCausalLM" => Box::new(mixtral::load(config, weights)?),
        "Phi3ForCausalLM" => Box::new(phi3::load(config, weights)?),
        "Gemma2ForCausalLM" | "Gemma3ForCausalLM" => Box::new(gemma::Model::load(config, weights)?),
        other => unreachable!("architecture {other} passed validation without a model"),
    })
}
