//! Model families. Each is one file with plain structs named after its HF config; the Llama
//! decoder (llama.rs) is the base that most families fill with their own attention or MLP.

pub mod gemma;
pub mod llama;
pub mod mixtral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use anyhow::{Context, Result};
use mlx_rs::Array;

use crate::attention::Attention;
use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::PagedKvCache;
use crate::nn::{Linear, RmsNorm, SparseMoe};
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

/// A mixture-of-experts MLP at `prefix`: router `{prefix}.gate`, experts stacked from
/// `{prefix}.experts.{e}.{name}` (HF) or read stacked from `{prefix}.switch_mlp.{gate,up,down}_proj`
/// (mlx-lm's layout). `[gate, up, down]` are the HF names of the expert projections.
pub fn sparse_moe(config: &ModelConfig, w: &mut Weights, prefix: &str, names: [&str; 3], norm_topk_prob: bool) -> Result<SparseMoe> {
    let n = config.num_experts.context("num_experts")?;
    let [gate, up, down] = names;
    let mut experts = |name: &str, mlx: &str| w.experts(&format!("{prefix}.experts"), n, name, &format!("{prefix}.switch_mlp.{mlx}"));
    let gate_proj = experts(gate, "gate_proj")?;
    let up_proj = experts(up, "up_proj")?;
    let down_proj = experts(down, "down_proj")?;
    Ok(SparseMoe {
        gate: w.linear(&format!("{prefix}.gate"), false)?,
        gate_proj,
        up_proj,
        down_proj,
        top_k: config.num_experts_per_tok.context("num_experts_per_tok")? as i32,
        norm_topk_prob,
    })
}
