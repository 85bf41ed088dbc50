//! Gemma 4 text (`Gemma4ForCausalLM`, and the text stack of `Gemma4ForConditionalGeneration`,
//! read from `text_config` and `model.language_model.*`). Against Gemma 3:
//! - plain RMSNorm gains (w, not 1 + w); per-head q/k norms with gains, a v norm without; the
//!   attention scale is 1 (the q norm sets it);
//! - local (sliding) and global layers differ in shape: global layers have their own head size
//!   and KV heads (`per_layer_config`, or `global_head_dim` / `num_global_key_value_heads`), and
//!   with `attention_k_eq_v` no v_proj (V is the key projection, v-normed, without RoPE);
//! - RoPE per layer type (`rope_parameters`): "default" on local layers, "proportional" on global
//!   ones (a quarter of the frequencies turn);
//! - the last `num_kv_shared_layers` layers compute no K/V: they attend over the cache of the last
//!   earlier layer of their type (and with `use_double_wide_mlp` have a twice wider MLP);
//! - per-layer inputs (`hidden_size_per_layer_input`): a second token embedding of
//!   `num_layers * P` features plus a projection of the embedded input, one P-slice per layer,
//!   gated into the residual stream after the MLP;
//! - `enable_moe_block`: a mixture of experts beside the dense MLP, routed from the MLP's input
//!   residual (norm, per-feature scale, softmax top-k renormalised, per-expert scale);
//! - each layer's output times a learned `layer_scalar`; final logits soft-capped.
//! Block: sandwich norms; attention; MLP (+ experts); per-layer input gate; layer scalar.
//!
//! Refused: `use_bidirectional_attention: "all"` (an encoder), RoPE types other than default and
//! proportional. Images, video and audio of multimodal checkpoints are not run: their placeholder
//! tokens embed as padding, as transformers does for a text-only input.

use anyhow::{bail, ensure, Context, Result};
use mlx_rs::{fast, Array, Dtype};

use crate::batch::StepBatch;
use crate::config::ModelConfig;
use crate::kv_cache::{KvShape, PagedKvCache};
use crate::layers::attention::Qkv;
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, Mlp};
use crate::layers::moe::{Routing, SparseMoe};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::layers::{scalar, softcap};
use crate::models::{expect_activation, CausalLm, Family, KvLayer, PartialRotary, RopeRules};
use crate::paged_attention::{paged_attention, Scores};
use crate::weights::{Bias, Weights};

pub const GEMMA4: Family = Family {
    architectures: &["Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"],
    gguf_architecture: None,
    validate,
    layer_windows: |config| {
        let sliding = sliding_layers(config);
        sliding.into_iter().map(|s| if s { config.sliding_window } else { None }).collect()
    },
    kv_layers,
    rope: RopeRules::PerLayerType,
    partial_rotary: PartialRotary::Refused,
    load: |config, w| Ok(Box::new(Model::load(config, w)?)),
};

/// transformers' defaults for fields a Gemma 4 config may leave out.
const DEFAULT_GLOBAL_HEAD_DIM: usize = 512;
const DEFAULT_PER_LAYER_INPUT: usize = 256;
const DEFAULT_PER_LAYER_VOCAB: usize = 262_144;
const DEFAULT_SLIDING_WINDOW: usize = 512;

fn validate(config: &ModelConfig) -> Result<()> {
    expect_activation(config, "gelu_pytorch_tanh")?;
    if config.use_bidirectional_attention.as_ref().and_then(|v| v.as_str()) == Some("all") {
        bail!("Gemma 4 with use_bidirectional_attention \"all\" is an encoder: only causal (or \"vision\") attention runs");
    }
    let n = config.num_hidden_layers;
    ensure!(config.num_kv_shared_layers < n, "num_kv_shared_layers {} leaves no layer computing K/V", config.num_kv_shared_layers);
    for i in 0..n {
        let s = layer_shape(config, i)?;
        ensure!(
            s.kv_heads > 0 && config.num_attention_heads % s.kv_heads == 0,
            "layer {i}: {} attention heads do not share {} KV heads evenly",
            config.num_attention_heads,
            s.kv_heads
        );
        kv_source(config, i)?;
        rope_of(config, i)?;
    }
    if config.hidden_size_per_layer_input.unwrap_or(DEFAULT_PER_LAYER_INPUT) > 0 {
        let v = config.vocab_size_per_layer_input.unwrap_or(DEFAULT_PER_LAYER_VOCAB);
        ensure!(v >= config.vocab_size, "vocab_size_per_layer_input {v} < vocab_size {}: tokens beyond it have no per-layer input", config.vocab_size);
    }
    if config.enable_moe_block {
        let (e, k) = (config.num_experts.unwrap_or(0), config.top_k_experts.unwrap_or(0));
        ensure!(e >= k && k >= 1, "Gemma 4's MoE block needs num_experts >= top_k_experts >= 1, got {e} and {k}");
    }
    Ok(())
}

/// Which layers are local: `layer_types` (or transformers' default, every 6th global), the last
/// layer always global (transformers forces it).
fn sliding_layers(config: &ModelConfig) -> Vec<bool> {
    let n = config.num_hidden_layers;
    (0..n)
        .map(|i| {
            let sliding = match &config.layer_types {
                Some(t) => t.get(i).is_some_and(|t| t == "sliding_attention"),
                None => (i + 1) % 6 != 0,
            };
            sliding && i + 1 != n
        })
        .collect()
}

fn window(config: &ModelConfig) -> usize {
    config.sliding_window.unwrap_or(DEFAULT_SLIDING_WINDOW)
}

/// The head size and KV heads of layer `i`.
fn layer_shape(config: &ModelConfig, i: usize) -> Result<KvShape> {
    let base = KvShape { kv_heads: config.num_kv_heads(), head_dim: config.head_dim() };
    if let Some(per_layer) = &config.per_layer_config {
        let map = per_layer.as_object().context("per_layer_config is not an object of layer indices")?;
        let Some(entry) = map.get(&i.to_string()) else { return Ok(base) };
        let get = |k: &str| entry.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        for key in entry.as_object().into_iter().flat_map(|o| o.keys()) {
            ensure!(matches!(key.as_str(), "head_dim" | "num_key_value_heads"), "per_layer_config[{i}].{key} is not supported");
        }
        return Ok(KvShape {
            kv_heads: get("num_key_value_heads").unwrap_or(base.kv_heads),
            head_dim: get("head_dim").unwrap_or(base.head_dim),
        });
    }
    if sliding_layers(config)[i] {
        return Ok(base);
    }
    let kv_heads = match config.num_global_key_value_heads {
        Some(h) if config.attention_k_eq_v => h,
        _ => base.kv_heads,
    };
    Ok(KvShape { kv_heads, head_dim: config.global_head_dim.unwrap_or(DEFAULT_GLOBAL_HEAD_DIM) })
}

fn first_kv_shared(config: &ModelConfig) -> usize {
    config.num_hidden_layers - config.num_kv_shared_layers
}

/// The layer whose K/V layer `i` attends over: itself, or for a KV-shared layer the last earlier
/// layer of its type. Cache layers are the layers before the first KV-shared one, in order.
fn kv_source(config: &ModelConfig, i: usize) -> Result<usize> {
    let first = first_kv_shared(config);
    if i < first {
        return Ok(i);
    }
    let sliding = sliding_layers(config);
    (0..first)
        .rev()
        .find(|&j| sliding[j] == sliding[i])
        .with_context(|| format!("KV-shared layer {i} has no earlier layer of its type to share K/V with"))
}

fn kv_layers(config: &ModelConfig) -> Vec<KvLayer> {
    let sliding = sliding_layers(config);
    (0..first_kv_shared(config))
        .map(|i| KvLayer {
            // Validated at parse: a config reaching here has its shapes.
            shape: layer_shape(config, i).unwrap_or(KvShape { kv_heads: config.num_kv_heads(), head_dim: config.head_dim() }),
            window: sliding[i].then(|| window(config)),
        })
        .collect()
}

/// RoPE of layer `i`, by its type's `rope_parameters` (transformers' defaults without them).
fn rope_of(config: &ModelConfig, i: usize) -> Result<Rope> {
    let sliding = sliding_layers(config)[i];
    let kind = if sliding { "sliding_attention" } else { "full_attention" };
    let head_dim = layer_shape(config, i)?.head_dim;
    let params = config.rope_parameters.as_ref().and_then(|p| p.get(kind));
    let get = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64()).map(|v| v as f32);
    let default_type = if sliding { "default" } else { "proportional" };
    let rope_type = params.and_then(|p| p.get("rope_type")).and_then(|t| t.as_str()).unwrap_or(default_type);
    let theta = get("rope_theta").unwrap_or(if sliding { 10_000.0 } else { 1_000_000.0 });
    match rope_type {
        // transformers' Gemma 4 default RoPE turns the whole head (a partial factor is ignored).
        "default" => Rope::from_config(head_dim, theta, None, None, None),
        "proportional" => {
            let partial = get("partial_rotary_factor").unwrap_or(if params.is_some() { 1.0 } else { 0.25 });
            Ok(Rope::proportional(head_dim, theta, partial, get("factor").unwrap_or(1.0)))
        }
        other => bail!("unsupported rope_type {other:?} for Gemma 4 {kind} layers: supported are default and proportional"),
    }
}

/// Where a layer's K and V come from.
enum KvProjection {
    /// q, k, v projections (k, v absent from the stack of a KV-shared layer).
    Qkv(Qkv),
    /// `attention_k_eq_v` global layers: `[q; k]` stacked when possible; V is the key projection.
    KeyIsValue(Qkv),
    /// A KV-shared layer: queries only.
    Shared(Linear),
}

struct SelfAttention {
    proj: KvProjection,
    o_proj: Linear,
    q_norm: RmsNorm,
    /// None on KV-shared layers.
    k_norm: Option<RmsNorm>,
    eps: f32,
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    rope: Rope,
    window: Option<usize>,
    /// The cache layer it writes (its own) or reads (a KV-shared layer's source).
    cache_layer: usize,
}

impl SelfAttention {
    fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let t = x.shape()[0];
        let heads = |a: &Array, n: i32| a.reshape(&[t, n, self.head_dim]);
        let (q, kv) = match &self.proj {
            KvProjection::Qkv(p) => {
                let [q, k, v] = p.forward(x)?;
                (q, Some((k, v)))
            }
            KvProjection::KeyIsValue(p) => {
                let [q, k, _] = p.forward(x)?;
                (q, Some((k.clone(), k)))
            }
            KvProjection::Shared(q_proj) => (q_proj.forward(x)?, None),
        };
        let q = self.q_norm.forward(&heads(&q, self.num_heads)?)?;
        let q = self.rope.forward(&q, &batch.positions, &batch.seq_ends)?;
        if let (Some((k, v)), Some(k_norm)) = (kv, &self.k_norm) {
            let k = k_norm.forward(&heads(&k, self.num_kv_heads)?)?;
            let k = self.rope.forward(&k, &batch.positions, &batch.seq_ends)?;
            let v = fast::rms_norm(heads(&v, self.num_kv_heads)?, None, self.eps)?;
            let g = cache.layer_group[self.cache_layer];
            let slots = batch.slots.get(g).with_context(|| format!("batch has no block tables of KV group {g}"))?;
            cache.write(self.cache_layer, &k, &v, slots)?;
        }
        let scores = Scores { scale: 1.0, window: self.window, softcap: None, sinks: None };
        let o = paged_attention(&q, cache, self.cache_layer, batch, scores)?;
        self.o_proj.forward(&o)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.proj {
            KvProjection::Qkv(p) | KvProjection::KeyIsValue(p) => p.linears(),
            KvProjection::Shared(q) => vec![q],
        };
        v.push(&self.o_proj);
        v
    }
}

/// Qkv's stack over q and k alone (v is k): `Qkv::new` with an empty v.
fn q_and_k(q_proj: Linear, k_proj: Linear) -> Result<Qkv> {
    Ok(match Linear::stack_rows(&[&q_proj, &k_proj])? {
        Some(linear) => Qkv::Stacked { linear, q: q_proj.out_features(), kv: k_proj.out_features() },
        None => {
            let v = Linear { weight: k_proj.weight.clone(), bias: k_proj.bias.clone(), quant: k_proj.quant.clone() };
            Qkv::Apart([q_proj, k_proj, v])
        }
    })
}

/// The experts beside a layer's dense MLP and their router.
struct MoeBlock {
    /// `router.norm` (no gain) times `router.scale * hidden^-0.5`, folded into one gain.
    router_norm: RmsNorm,
    /// `[experts]`: each expert's weight multiplier.
    per_expert_scale: Array,
    experts: SparseMoe,
    pre_feedforward_layernorm_2: RmsNorm,
    post_feedforward_layernorm_1: RmsNorm,
    post_feedforward_layernorm_2: RmsNorm,
}

impl MoeBlock {
    /// `mlp_out`: the dense MLP's output; `residual`: its input before the norm.
    fn forward(&self, mlp_out: &Array, residual: &Array) -> Result<Array> {
        let (idx, w) = self.experts.route(&self.router_norm.forward(residual)?)?;
        let w = w.multiply(self.per_expert_scale.take_axis(&idx, 0)?)?;
        let e = self.experts.experts(&self.pre_feedforward_layernorm_2.forward(residual)?, &idx, &w)?;
        Ok(self.post_feedforward_layernorm_1.forward(mlp_out)?.add(self.post_feedforward_layernorm_2.forward(&e)?)?)
    }
}

/// A layer's slice of the per-layer inputs gated into the residual stream.
struct PerLayerInput {
    per_layer_input_gate: Linear,
    per_layer_projection: Linear,
    post_per_layer_input_norm: RmsNorm,
}

struct Block {
    self_attn: SelfAttention,
    mlp: Mlp,
    moe: Option<MoeBlock>,
    per_layer: Option<PerLayerInput>,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    layer_scalar: Array,
}

impl Block {
    /// `per_layer_input`: `[T, P]`, this layer's slice.
    fn forward(&self, x: &Array, per_layer_input: Option<&Array>, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let a = self.self_attn.forward(&self.input_layernorm.forward(x)?, batch, cache)?;
        let h = x.add(self.post_attention_layernorm.forward(&a)?)?;
        let mut m = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        if let Some(moe) = &self.moe {
            m = moe.forward(&m, &h)?;
        }
        let mut h = h.add(self.post_feedforward_layernorm.forward(&m)?)?;
        if let (Some(p), Some(input)) = (&self.per_layer, per_layer_input) {
            let g = self.mlp.act.forward(&p.per_layer_input_gate.forward(&h)?)?.multiply(input)?;
            h = h.add(p.post_per_layer_input_norm.forward(&p.per_layer_projection.forward(&g)?)?)?;
        }
        Ok(h.multiply(&self.layer_scalar)?)
    }
}

/// The model-wide half of the per-layer inputs: `[T, num_layers * P]` from the token ids and the
/// embedded input.
struct PerLayerEmbeddings {
    embed_tokens_per_layer: Linear,
    per_layer_model_projection: Linear,
    per_layer_projection_norm: RmsNorm,
    width: i32,
}

pub struct Model {
    embed_tokens: Linear,
    per_layer: Option<PerLayerEmbeddings>,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    hidden_size: usize,
    final_logit_softcapping: Option<f32>,
    /// Multimodal checkpoints: image / video / audio placeholder ids, embedded as `pad`.
    placeholders: Vec<i32>,
    pad: i32,
}

/// `x * v` with `v` a float32 scalar, computed in float32 and rounded back (a Python float times
/// a tensor in transformers).
fn times(x: &Array, v: f32) -> Result<Array> {
    Ok(x.multiply(Array::from_f32(v))?.as_dtype(x.dtype())?)
}

impl Model {
    pub fn load(config: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let multimodal = config.architecture()? == "Gemma4ForConditionalGeneration";
        if multimodal {
            // The towers' weights stay unused (reported as leftovers).
            w.rename_prefix("model.language_model.", "model.");
        }
        let eps = config.rms_norm_eps;
        let bias = Bias::from(config.attention_bias);
        let act = Activation::from_name(config.activation())?;
        let sliding = sliding_layers(config);
        let first_shared = first_kv_shared(config);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let shape = layer_shape(config, i)?;
            let q_proj = w.linear(&format!("{a}.q_proj"), bias)?;
            let (proj, k_norm) = if i >= first_shared {
                (KvProjection::Shared(q_proj), None)
            } else {
                let k_proj = w.linear(&format!("{a}.k_proj"), bias)?;
                let proj = if config.attention_k_eq_v && !sliding[i] {
                    KvProjection::KeyIsValue(q_and_k(q_proj, k_proj)?)
                } else {
                    KvProjection::Qkv(Qkv::new(q_proj, k_proj, w.linear(&format!("{a}.v_proj"), bias)?)?)
                };
                (proj, Some(w.rms_norm(&format!("{a}.k_norm"), eps)?))
            };
            let self_attn = SelfAttention {
                proj,
                o_proj: w.linear(&format!("{a}.o_proj"), bias)?,
                q_norm: w.rms_norm(&format!("{a}.q_norm"), eps)?,
                k_norm,
                eps,
                num_heads: config.num_attention_heads as i32,
                num_kv_heads: shape.kv_heads as i32,
                head_dim: shape.head_dim as i32,
                rope: rope_of(config, i)?,
                window: sliding[i].then(|| window(config)),
                cache_layer: kv_source(config, i)?,
            };
            let norm = |w: &mut Weights, name: &str| w.rms_norm(&format!("{p}.{name}"), eps);
            let mlp = Mlp::new(
                w.linear(&format!("{p}.mlp.gate_proj"), Bias::Absent)?,
                w.linear(&format!("{p}.mlp.up_proj"), Bias::Absent)?,
                w.linear(&format!("{p}.mlp.down_proj"), Bias::Absent)?,
                act,
            )?;
            let moe = if config.enable_moe_block { Some(moe_block(config, w, &p, act)?) } else { None };
            let per_layer = if config.hidden_size_per_layer_input.unwrap_or(DEFAULT_PER_LAYER_INPUT) > 0 {
                Some(PerLayerInput {
                    per_layer_input_gate: w.linear(&format!("{p}.per_layer_input_gate"), Bias::Absent)?,
                    per_layer_projection: w.linear(&format!("{p}.per_layer_projection"), Bias::Absent)?,
                    post_per_layer_input_norm: norm(w, "post_per_layer_input_norm")?,
                })
            } else {
                None
            };
            layers.push(Block {
                self_attn,
                mlp,
                moe,
                per_layer,
                input_layernorm: norm(w, "input_layernorm")?,
                post_attention_layernorm: norm(w, "post_attention_layernorm")?,
                pre_feedforward_layernorm: norm(w, "pre_feedforward_layernorm")?,
                post_feedforward_layernorm: norm(w, "post_feedforward_layernorm")?,
                layer_scalar: w.take(&format!("{p}.layer_scalar"))?,
            });
        }
        let per_layer = match config.hidden_size_per_layer_input.unwrap_or(DEFAULT_PER_LAYER_INPUT) {
            0 => None,
            width => Some(PerLayerEmbeddings {
                embed_tokens_per_layer: w.linear("model.embed_tokens_per_layer", Bias::Absent)?,
                per_layer_model_projection: w.linear("model.per_layer_model_projection", Bias::Absent)?,
                per_layer_projection_norm: w.rms_norm("model.per_layer_projection_norm", eps)?,
                width: width as i32,
            }),
        };
        let embed_tokens = w.linear("model.embed_tokens", Bias::Absent)?;
        ensure!(
            embed_tokens.out_features() as usize == config.vocab_size,
            "embedding has {} rows but config.json says vocab_size {}",
            embed_tokens.out_features(),
            config.vocab_size
        );
        let lm_head = if w.contains("lm_head.weight") { Some(w.linear("lm_head", Bias::Absent)?) } else { None };
        let placeholders = if multimodal {
            [config.image_token_id, config.video_token_id, config.audio_token_id].into_iter().flatten().map(|t| t as i32).collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            embed_tokens,
            per_layer,
            layers,
            norm: w.rms_norm("model.norm", eps)?,
            lm_head,
            hidden_size: config.hidden_size,
            final_logit_softcapping: config.final_logit_softcapping,
            placeholders,
            pad: config.pad_token_id.unwrap_or(0) as i32,
        })
    }
}

fn moe_block(config: &ModelConfig, w: &mut Weights, p: &str, act: Activation) -> Result<MoeBlock> {
    let n = config.num_experts.context("num_experts")? as i32;
    let inter = config.moe_intermediate_size.context("moe_intermediate_size")? as i32;
    let gate_up = w.take(&format!("{p}.experts.gate_up_proj"))?; // [E, 2 * inter, hidden]
    ensure!(gate_up.ndim() == 3 && gate_up.shape()[..2] == [n, 2 * inter], "{p}.experts.gate_up_proj has shape {:?}", gate_up.shape());
    let half = |from: i32| -> Result<Linear> {
        let idx = Array::from_iter(from..from + inter, &[inter]);
        Ok(Linear { weight: gate_up.take_axis(&idx, 1)?, bias: None, quant: None })
    };
    let (gate_proj, up_proj) = (half(0)?, half(inter)?);
    let down_proj = Linear { weight: w.take(&format!("{p}.experts.down_proj"))?, bias: None, quant: None };
    mlx_rs::transforms::eval([&gate_proj, &up_proj, &down_proj].into_iter().flat_map(|l| l.arrays()))?;
    let hidden = config.hidden_size as f32;
    let scale = w.take(&format!("{p}.router.scale"))?;
    let router_norm = RmsNorm { weight: times(&scale, hidden.powf(-0.5))?, eps: config.rms_norm_eps };
    let norm = |w: &mut Weights, name: &str| w.rms_norm(&format!("{p}.{name}"), config.rms_norm_eps);
    Ok(MoeBlock {
        router_norm,
        per_expert_scale: w.take_f32(&format!("{p}.router.per_expert_scale"))?,
        experts: SparseMoe {
            gate: w.linear(&format!("{p}.router.proj"), Bias::Absent)?,
            gate_proj,
            up_proj,
            down_proj,
            top_k: config.top_k_experts.context("top_k_experts")? as i32,
            routing: Routing::Softmax { norm_topk_prob: true },
            act,
            shared_experts: None,
            shared_expert_gate: None,
        },
        pre_feedforward_layernorm_2: norm(w, "pre_feedforward_layernorm_2")?,
        post_feedforward_layernorm_1: norm(w, "post_feedforward_layernorm_1")?,
        post_feedforward_layernorm_2: norm(w, "post_feedforward_layernorm_2")?,
    })
}

impl CausalLm for Model {
    fn forward(&self, batch: &StepBatch, cache: &mut PagedKvCache) -> Result<Array> {
        let mut ids = batch.token_ids.clone();
        for &t in &self.placeholders {
            ids = mlx_rs::ops::select(&ids.eq(Array::from_int(t))?, Array::from_int(self.pad), &ids)?;
        }
        let h = self.embed_tokens.rows(&ids)?;
        // The normalizer is rounded to the activation dtype, as in the reference implementation.
        let mut h = h.multiply(scalar((self.hidden_size as f32).sqrt(), &h)?)?;
        let t = h.shape()[0];
        let n = self.layers.len() as i32;
        let per_layer = match &self.per_layer {
            None => None,
            Some(p) => {
                let tokens = p.embed_tokens_per_layer.rows(&ids)?;
                let tokens = tokens.multiply(scalar((p.width as f32).sqrt(), &tokens)?)?.reshape(&[t, n, p.width])?;
                let proj = times(&p.per_layer_model_projection.forward(&h)?, (self.hidden_size as f32).powf(-0.5))?;
                let proj = p.per_layer_projection_norm.forward(&proj.reshape(&[t, n, p.width])?)?;
                Some(times(&proj.add(&tokens)?, 0.5f32.sqrt())?)
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let input = per_layer.as_ref().map(|p| p.take_axis(&Array::from_int(i as i32), 1)).transpose()?;
            h = layer.forward(&h, input.as_ref(), batch, cache)?;
        }
        Ok(h)
    }

    fn final_norm(&self, hidden: &Array) -> Result<Array> {
        self.norm.forward(hidden)
    }

    fn logits(&self, hidden: &Array) -> Result<Array> {
        let x = self.norm.forward(hidden)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let logits = head.forward(&x)?.as_dtype(Dtype::Float32)?;
        match self.final_logit_softcapping {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    fn weights(&self) -> Vec<&Array> {
        let mut linears = vec![&self.embed_tokens];
        linears.extend(self.lm_head.as_ref());
        let mut norms = vec![&self.norm];
        let mut others = Vec::new();
        if let Some(p) = &self.per_layer {
            linears.extend([&p.embed_tokens_per_layer, &p.per_layer_model_projection]);
            norms.push(&p.per_layer_projection_norm);
        }
        for l in &self.layers {
            linears.extend(l.self_attn.linears());
            linears.extend(l.mlp.linears());
            norms.extend([&l.self_attn.q_norm, &l.input_layernorm, &l.post_attention_layernorm]);
            norms.extend([&l.pre_feedforward_layernorm, &l.post_feedforward_layernorm]);
            norms.extend(l.self_attn.k_norm.as_ref());
            if let Some(m) = &l.moe {
                linears.extend(m.experts.linears());
                norms.extend([&m.router_norm, &m.pre_feedforward_layernorm_2, &m.post_feedforward_layernorm_1, &m.post_feedforward_layernorm_2]);
                others.push(&m.per_expert_scale);
            }
            if let Some(p) = &l.per_layer {
                linears.extend([&p.per_layer_input_gate, &p.per_layer_projection]);
                norms.push(&p.post_per_layer_input_norm);
            }
            others.push(&l.layer_scalar);
        }
        let mut v: Vec<&Array> = linears.into_iter().flat_map(Linear::arrays).collect();
        v.extend(norms.into_iter().map(|n| &n.weight));
        v.extend(others);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 6 layers (local x2, global, local x2, global), the last two sharing K/V.
    fn config(extra: &str) -> Result<ModelConfig> {
        let types = r#","layer_types":["sliding_attention","sliding_attention","full_attention","sliding_attention","sliding_attention","full_attention"]"#;
        let extra = if extra.contains("layer_types") { extra.to_string() } else { format!("{types}{extra}") };
        ModelConfig::from_json(&format!(
            r#"{{"architectures":["Gemma4ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "vocab_size":100,"hidden_activation":"gelu_pytorch_tanh","sliding_window":8,
            "num_kv_shared_layers":2{extra}}}"#
        ))
    }

    #[test]
    fn global_layers_take_their_shape_from_either_layout() {
        // transformers < 5.19: global_head_dim, and num_global_key_value_heads with k_eq_v only.
        let legacy = config(r#","global_head_dim":32,"num_global_key_value_heads":1,"attention_k_eq_v":true"#).unwrap();
        let per_layer = config(
            r#","per_layer_config":{"2":{"head_dim":32,"num_key_value_heads":1},"5":{"head_dim":32,"num_key_value_heads":1}}"#,
        )
        .unwrap();
        let (local, global) = (KvShape { kv_heads: 2, head_dim: 16 }, KvShape { kv_heads: 1, head_dim: 32 });
        for c in [&legacy, &per_layer] {
            let want = vec![
                KvLayer { shape: local, window: Some(8) },
                KvLayer { shape: local, window: Some(8) },
                KvLayer { shape: global, window: None },
                KvLayer { shape: local, window: Some(8) },
            ];
            assert_eq!(c.kv_layers(), want);
            // Layer 4 (local) reads layer 3's K/V, layer 5 (global) layer 2's.
            assert_eq!((0..6).map(|i| kv_source(c, i).unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 3, 2]);
        }
        // Without k_eq_v the global layers keep num_key_value_heads.
        let c = config(r#","global_head_dim":32,"num_global_key_value_heads":1"#).unwrap();
        assert_eq!(c.kv_layers()[2].shape, KvShape { kv_heads: 2, head_dim: 32 });
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        for (extra, what) in [
            (r#","use_bidirectional_attention":"all""#, "is an encoder"),
            (r#","rope_parameters":{"full_attention":{"rope_type":"yarn","factor":2.0}}"#, "unsupported rope_type \"yarn\""),
            (r#","layer_types":["full_attention","full_attention","full_attention","full_attention","sliding_attention","full_attention"]"#, "KV-shared layer 4 has no earlier layer"),
            (r#","vocab_size_per_layer_input":50"#, "vocab_size_per_layer_input 50 < vocab_size 100"),
            (r#","enable_moe_block":true,"num_experts":2,"top_k_experts":3"#, "num_experts >= top_k_experts"),
        ] {
            let err = format!("{:#}", config(extra).unwrap_err());
            assert!(err.contains(what), "{extra}: {err}");
        }
    }

    #[test]
    fn multimodal_config_runs_its_text_config() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["Gemma4ForConditionalGeneration"],"image_token_id":90,"vision_config":{"hidden_size":8},
            "text_config":{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":16,"vocab_size":100,"hidden_activation":"gelu_pytorch_tanh",
            "layer_types":["sliding_attention","full_attention"],"sliding_window":8}}"#,
        )
        .unwrap();
        assert_eq!((c.hidden_size, c.image_token_id, c.layer_windows()), (64, Some(90), vec![Some(8), None]));
    }
}
