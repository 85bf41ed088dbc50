//! Model families, listed once in [`FAMILIES`]. Each is one file: its config rules, its layer
//! windows and its loader, with plain structs named after its HF checkpoint. The Llama decoder
//! (llama.rs) is the base that most families fill with their own attention or MLP.

pub mod bert;
pub mod gemma;
pub mod gemma4;
pub mod glm4_moe;
pub mod gpt_oss;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod phi3;
pub mod qwen2;
pub mod qwen2_vl;
pub mod qwen2_vl_vision;
pub mod qwen3;
pub mod qwen3_next;
pub mod smollm3;
pub mod xlm_roberta;

use anyhow::{bail, Result};
use mlx_rs::Array;

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::{KvShape, PagedKvCache, StateGeometry};
use crate::layers::attention::Attention;
use crate::multimodal::{ImageGrid, ImageLayout};
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::paged_attention::AttentionFeatures;
use crate::weights::Weights;

pub trait CausalLm: Send {
    /// Hidden states `[T, hidden]` of the step's flattened tokens; writes their K/V into `cache`.
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array>;
    /// float32 logits of some rows of `forward`'s output.
    fn logits(&self, hidden: &Array) -> Result<Array>;
    /// The final norm of some rows of `forward`'s output (the hidden states pooling models use).
    fn final_norm(&self, hidden: &Array) -> Result<Array>;
    /// Every weight array (materialised at load; their bytes are the weights' memory).
    fn weights(&self) -> Vec<&Array>;
    /// What its attention asks of the attention backend.
    fn attention_features(&self) -> AttentionFeatures {
        AttentionFeatures::default()
    }
    /// The recurrent state of its linear-attention layers, if it has any.
    fn state_geometry(&self) -> Option<StateGeometry> {
        None
    }
    /// How images sit in a prompt, for a model with a vision tower.
    fn image_layout(&self) -> Option<ImageLayout> {
        None
    }
    /// The vision tower's rows for `[patches, patch features]` pixel values of images with these
    /// grids, one row per placeholder token, in order.
    fn embed_images(&self, _pixel_values: &Array, _grids: &[ImageGrid]) -> Result<Array> {
        bail!("this model has no vision tower")
    }
}

/// A decoder's weight arrays: the embedding, the LM head unless tied, the final norm, then each
/// layer's attention (with its q/k norms and sinks), MLP linears and layer norms.
pub fn decoder_weights<'a>(
    embed_tokens: &'a Linear,
    lm_head: Option<&'a Linear>,
    norm: &'a RmsNorm,
    layers: impl IntoIterator<Item = (&'a Attention, Vec<&'a Linear>, Vec<&'a RmsNorm>)>,
) -> Vec<&'a Array> {
    let mut linears = vec![embed_tokens];
    linears.extend(lm_head);
    let mut norms = vec![norm];
    let mut sinks = Vec::new();
    for (attn, mlp, layer_norms) in layers {
        linears.extend(attn.linears());
        linears.extend(mlp);
        norms.extend(attn.norms());
        norms.extend(layer_norms);
        sinks.extend(attn.sinks.as_ref());
    }
    let mut v: Vec<&Array> = linears.into_iter().flat_map(Linear::arrays).collect();
    v.extend(norms.into_iter().map(|n| &n.weight));
    v.extend(sinks);
    v
}

/// A model family: the config architectures it runs and what differs between families.
pub struct Family {
    /// config.json `architectures[0]` values.
    pub architectures: &'static [&'static str],
    /// llama.cpp's architecture name of the GGUF files that load as this family.
    pub gguf_architecture: Option<&'static str>,
    /// The family's config rules, its activation first; the shared rules are in `config`.
    pub validate: fn(&ModelConfig) -> Result<()>,
    /// Attention window of each layer (None: full attention).
    pub layer_windows: fn(&ModelConfig) -> Vec<Option<usize>>,
    /// The layers that keep K/V in the cache, in the order the model indexes them.
    pub kv_layers: fn(&ModelConfig) -> Vec<KvLayer>,
    /// Which RoPE parameters the family takes.
    pub rope: RopeRules,
    /// Whether `partial_rotary_factor` < 1 runs (transformers honours it for this family).
    pub partial_rotary: PartialRotary,
    pub load: fn(&ModelConfig, &mut Weights) -> Result<Box<dyn CausalLm>>,
}

/// A layer that keeps its own K/V: their shape and the layer's attention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayer {
    pub shape: KvShape,
    pub window: Option<usize>,
}

/// Every layer keeps K/V of the config's `num_key_value_heads` x `head_dim`.
pub fn kv_per_layer(config: &ModelConfig) -> Vec<KvLayer> {
    let shape = KvShape { kv_heads: config.num_kv_heads(), head_dim: config.head_dim() };
    config.layer_windows().into_iter().map(|window| KvLayer { shape, window }).collect()
}

/// The RoPE parameters a family takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeRules {
    /// One RoPE (or one per layer type, Gemma 3's) with the scalings every family takes.
    Shared,
    /// As `Shared`, and longrope (Phi-3).
    SharedWithLongrope,
    /// The family reads `rope_parameters` per layer type itself (Gemma 4: each kind of layer its
    /// own RoPE type and partial rotation), and checks them at load.
    PerLayerType,
}

/// Partial rotary embeddings: RoPE on the first `head_dim * partial_rotary_factor` features of
/// each head, the rest passed through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PartialRotary {
    /// transformers rotates the whole head for this family: a factor below 1 is refused.
    Refused,
    /// Run as transformers does; `default` is the factor of a config that gives none.
    Accepted { default: f32 },
}

/// Every family the engine runs, in the order errors list their architectures.
pub static FAMILIES: &[Family] = &[
    llama::LLAMA,
    mistral::MISTRAL,
    qwen2::QWEN2,
    qwen3::QWEN3,
    gemma::GEMMA,
    phi3::PHI3,
    mixtral::MIXTRAL,
    qwen3::QWEN3_MOE,
    smollm3::SMOLLM3,
    glm4_moe::GLM4_MOE,
    gpt_oss::GPT_OSS,
    gemma4::GEMMA4,
    qwen3_next::QWEN3_NEXT,
    qwen3_next::QWEN3_5,
    qwen2_vl::QWEN2_VL,
];

/// The family of a config architecture.
pub fn family(architecture: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.architectures.contains(&architecture))
}

/// Every architecture the engine runs.
pub fn architectures() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().flat_map(|f| f.architectures.iter().copied())
}

pub fn load(config: &ModelConfig, weights: &mut Weights) -> Result<Box<dyn CausalLm>> {
    (config.family()?.load)(config, weights)
}

/// The activation check of a family whose MLP runs `expected`.
pub fn expect_activation(config: &ModelConfig, expected: &str) -> Result<()> {
    let act = config.activation();
    if act != expected {
        bail!("unsupported activation {act:?} for {}: supported is {expected}", config.architecture()?);
    }
    Ok(())
}

/// Every layer attends to all its keys (a `sliding_window` in the config is ignored).
pub fn full_attention(config: &ModelConfig) -> Vec<Option<usize>> {
    vec![None; config.num_hidden_layers]
}

/// The config's `sliding_window` on every layer, unless it covers the whole context.
pub fn window_on_every_layer(config: &ModelConfig) -> Vec<Option<usize>> {
    let max_pos = config.max_position_embeddings.unwrap_or(usize::MAX);
    vec![config.sliding_window.filter(|&w| w < max_pos); config.num_hidden_layers]
}

/// The config's `sliding_window` on the layers `layer_types` marks "sliding_attention".
pub fn windows_by_layer_types(config: &ModelConfig) -> Vec<Option<usize>> {
    (0..config.num_hidden_layers)
        .map(|i| {
            let sliding = config.layer_types.as_ref().and_then(|t| t.get(i)).is_some_and(|t| t == "sliding_attention");
            if sliding { config.sliding_window } else { None }
        })
        .collect()
}
