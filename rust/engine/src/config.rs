//! Model configuration, read from a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use mlx_rs::Dtype;

use crate::dtype::parse_dtype;
use crate::kv_cache::StateGeometry;
use serde::Deserialize;

use crate::models::{self, Family, KvLayer, PartialRotary, RopeRules};

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3 longrope: per-frequency divisors below / above the original context.
    pub short_factor: Option<Vec<f32>>,
    pub long_factor: Option<Vec<f32>>,
    pub attention_factor: Option<f32>,
    /// YaRN: rotations per wavelength bounding the blend of interpolated and original
    /// frequencies, whether those bounds are rounded outwards (default true), and the DeepSeek
    /// form of the attention factor.
    pub beta_fast: Option<f32>,
    pub beta_slow: Option<f32>,
    pub truncate: Option<bool>,
    pub mscale: Option<f32>,
    pub mscale_all_dim: Option<f32>,
    /// Qwen2-VL's M-RoPE (pre-5 configs, type "mrope"): frequencies per position row (t, h, w).
    pub mrope_section: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5 spelling of rope_theta + rope_scaling in one object.
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub max_position_embeddings: Option<usize>,
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: the window is off unless this is true.
    pub use_sliding_window: Option<bool>,
    /// Per layer "full_attention" / "sliding_attention" (transformers 5; Gemma, Qwen).
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 before transformers 5: every n-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3 before transformers 5: rope base of the local (sliding) layers.
    pub rope_local_base_freq: Option<f32>,
    pub hidden_act: Option<String>,
    /// Gemma's spelling of hidden_act.
    pub hidden_activation: Option<String>,
    /// Gemma: attention scale is query_pre_attn_scalar^-0.5 instead of head_dim^-0.5.
    pub query_pre_attn_scalar: Option<f32>,
    pub attn_logit_softcapping: Option<f32>,
    pub final_logit_softcapping: Option<f32>,
    /// Phi-3: context length the short rope factors were trained for.
    pub original_max_position_embeddings: Option<usize>,
    pub partial_rotary_factor: Option<f32>,
    /// SmolLM3: per layer 1 (RoPE) or 0 (no positional encoding); absent, every
    /// `no_rope_layer_interval`-th layer has none.
    pub no_rope_layers: Option<Vec<u8>>,
    pub no_rope_layer_interval: Option<usize>,
    /// MoE: experts (Mixtral `num_local_experts`, Qwen3-MoE `num_experts`, GLM-4.5
    /// `n_routed_experts`).
    #[serde(alias = "num_local_experts", alias = "n_routed_experts")]
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    /// Renormalise the top-k routing weights (absent: the family's default).
    pub norm_topk_prob: Option<bool>,
    /// GLM-4.5: sigmoid routing within the `topk_group` best of `n_group` expert groups, weights
    /// times `routed_scaling_factor`; a dense `shared_experts` MLP of `n_shared_experts` experts'
    /// width beside them; the first `first_k_dense_replace` layers dense; q/k norms by `use_qk_norm`.
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub routed_scaling_factor: Option<f32>,
    pub n_shared_experts: Option<usize>,
    pub first_k_dense_replace: Option<usize>,
    #[serde(default)]
    pub use_qk_norm: bool,
    pub decoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// gpt-oss: the clamped SwiGLU of its experts, `(up + 1) * gate * sigmoid(alpha * gate)` with
    /// gate <= limit and |up| <= limit.
    pub swiglu_alpha: Option<f32>,
    pub swiglu_limit: Option<f32>,
    /// Gated DeltaNet (Qwen3-Next, Qwen3.5): the linear-attention layers' causal convolution
    /// width, key/value head sizes and counts; `layer_types` marks them "linear_attention".
    pub linear_conv_kernel_dim: Option<usize>,
    pub linear_key_head_dim: Option<usize>,
    pub linear_value_head_dim: Option<usize>,
    pub linear_num_key_heads: Option<usize>,
    pub linear_num_value_heads: Option<usize>,
    /// Hybrid stacks without `layer_types`: every n-th layer is full attention.
    pub full_attention_interval: Option<usize>,
    /// Qwen3.5: dtype of the linear-attention ssm state (absent: the model dtype).
    pub mamba_ssm_dtype: Option<String>,
    /// Gemma 4: global layers' `head_dim` / `num_key_value_heads` (transformers 5.19 writes them
    /// per layer index in `per_layer_config`; earlier configs as `global_head_dim` and, with
    /// `attention_k_eq_v`, `num_global_key_value_heads`).
    pub per_layer_config: Option<serde_json::Value>,
    pub global_head_dim: Option<usize>,
    pub num_global_key_value_heads: Option<usize>,
    /// Gemma 4: global layers have no v_proj; V is the key projection (before k_norm and RoPE).
    #[serde(default)]
    pub attention_k_eq_v: bool,
    /// Gemma 4: the last n layers reuse the K/V of the last earlier layer of their kind.
    #[serde(default)]
    pub num_kv_shared_layers: usize,
    /// Gemma 4: per-layer input embeddings (width per layer, their vocabulary).
    pub hidden_size_per_layer_input: Option<usize>,
    pub vocab_size_per_layer_input: Option<usize>,
    /// Gemma 4: a mixture of `num_experts` experts (`top_k_experts` active, `moe_intermediate_size`
    /// wide) beside every layer's dense MLP.
    #[serde(default)]
    pub enable_moe_block: bool,
    pub top_k_experts: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    /// Gemma 4: the KV-shared layers' MLP is twice `intermediate_size` wide.
    #[serde(default)]
    pub use_double_wide_mlp: bool,
    /// Gemma 4: "all" makes every layer bidirectional (an encoder), "vision" only image tokens
    /// (Gemma 3 writes a boolean).
    pub use_bidirectional_attention: Option<serde_json::Value>,
    pub pad_token_id: Option<i64>,
    /// Multimodal checkpoints (`Gemma4ForConditionalGeneration`): the placeholder tokens of
    /// images, video and audio, and whether the towers are configured. The text stack is read
    /// from `text_config`, merged into these fields.
    pub image_token_id: Option<i64>,
    pub video_token_id: Option<i64>,
    pub audio_token_id: Option<i64>,
    pub vision_config: Option<serde_json::Value>,
    pub audio_config: Option<serde_json::Value>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    /// mlx-community quantized checkpoints (`{"group_size": 64, "bits": 4}`).
    pub quantization: Option<serde_json::Value>,
    /// Hugging Face quantization methods (AWQ, GPTQ, ...): none is run here.
    pub quantization_config: Option<serde_json::Value>,
}

/// A multimodal config (`text_config` beside vision / audio configs) as its text model's: the
/// text config's fields over the top level's (which keep the architecture, the placeholder token
/// ids and the towers' configs).
fn merge_text_config(mut value: serde_json::Value) -> serde_json::Value {
    let Some(obj) = value.as_object_mut() else { return value };
    if let Some(serde_json::Value::Object(text)) = obj.remove("text_config") {
        for (k, v) in text {
            if k != "architectures" {
                obj.insert(k, v);
            }
        }
    }
    value
}

fn default_eps() -> f32 {
    1e-6
}
fn default_theta() -> f32 {
    10000.0
}

/// The family of the config's architecture (its first `architectures` entry), if we run it.
fn check_architecture(architectures: &[String]) -> Result<&'static Family> {
    let arch = architectures.first().map(String::as_str).unwrap_or("");
    models::family(arch).ok_or_else(|| {
        anyhow!(
            "unsupported model architecture {architectures:?}: vllm-metal-rs runs {}",
            models::architectures().collect::<Vec<_>>().join(", ")
        )
    })
}


impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).context("parsing config.json")?;
        // The architecture first: another family's config lacks fields ours need, and "missing
        // field" would hide the real reason.
        let archs: Vec<String> = value
            .get("architectures")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        check_architecture(&archs)?;
        let value = merge_text_config(value);
        let mut config: Self = serde_json::from_value(value).context("parsing config.json")?;
        config.normalize_rope()?;
        config.accept_openai_mxfp4()?;
        config.validate()?;
        Ok(config)
    }

    /// gpt-oss as OpenAI publishes it: `quantization_config.quant_method` "mxfp4" says its experts
    /// are MXFP4 blocks (read by the family, `Weights::mxfp4_experts`), everything else plain.
    fn accept_openai_mxfp4(&mut self) -> Result<()> {
        let method = self.quantization_config.as_ref().and_then(|q| q.get("quant_method")).and_then(|m| m.as_str());
        if method == Some("mxfp4") && self.architecture()? == "GptOssForCausalLM" {
            self.quantization_config = None;
        }
        Ok(())
    }

    /// Fold transformers 5's `rope_parameters` into `rope_theta` / `rope_scaling` (and, for Gemma 3's
    /// per-layer-type parameters, `rope_local_base_freq`).
    fn normalize_rope(&mut self) -> Result<()> {
        if self.family()?.rope == RopeRules::PerLayerType {
            return Ok(());
        }
        let Some(params) = self.rope_parameters.take() else { return Ok(()) };
        let global = match (params.get("full_attention"), params.get("sliding_attention")) {
            (Some(full), local) => {
                if let Some(local) = local {
                    let kind = local.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default");
                    if kind != "default" {
                        bail!("unsupported rope_type {kind:?} for sliding-attention layers: supported is default");
                    }
                    self.rope_local_base_freq =
                        local.get("rope_theta").and_then(|t| t.as_f64()).map(|t| t as f32);
                }
                full.clone()
            }
            (None, _) => params.clone(),
        };
        if let Some(theta) = global.get("rope_theta").and_then(|t| t.as_f64()) {
            self.rope_theta = theta as f32;
        }
        if let Some(f) = global.get("partial_rotary_factor").and_then(|t| t.as_f64()) {
            self.partial_rotary_factor = Some(f as f32);
        }
        let kind = global.get("rope_type").or_else(|| global.get("type")).and_then(|t| t.as_str());
        if self.rope_scaling.is_none() && kind.is_some_and(|k| k != "default") {
            self.rope_scaling =
                Some(serde_json::from_value(global.clone()).context("parsing rope_parameters")?);
        }
        self.rope_parameters = Some(params);
        Ok(())
    }

    /// Attention window of each layer (None: full attention), by the family's rule. HF semantics:
    /// a query at position p sees keys at positions > p - window.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        match self.family() {
            Ok(family) => (family.layer_windows)(self),
            // Parsed configs always have a family; a hand-built one gets the plain rule.
            Err(_) => models::window_on_every_layer(self),
        }
    }

    /// The layers that keep K/V in the cache, by the family's rule, in the order the model
    /// indexes the cache.
    pub fn kv_layers(&self) -> Vec<KvLayer> {
        match self.family() {
            Ok(family) => (family.kv_layers)(self),
            Err(_) => models::kv_per_layer(self),
        }
    }

    /// The activation of the MLP (Gemma names it hidden_activation).
    pub fn activation(&self) -> &str {
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or("silu")
    }

    /// The one architecture this config asks for, if we run it.
    pub fn architecture(&self) -> Result<&str> {
        check_architecture(&self.architectures)?;
        Ok(&self.architectures[0])
    }

    /// The family that runs this config.
    pub fn family(&self) -> Result<&'static Family> {
        check_architecture(&self.architectures)
    }

    /// The rules every family shares, with the family's own (activation first) after the
    /// quantization checks.
    fn validate(&self) -> Result<()> {
        let family = self.family()?;
        if let Some(q) = &self.quantization_config {
            // mlx-lm writes its own `quantization` dict under both keys; that one is ours.
            let method = q.get("quant_method").and_then(|m| m.as_str());
            if method.is_some() || q.get("bits").is_none() {
                bail!(
                    "unsupported quantization method {:?}: vllm-metal-rs runs unquantized safetensors \
                     (f32/f16/bf16), MLX-quantized directories (config.json \"quantization\": \
                     {{\"group_size\", \"bits\"}}) and GGUF (Q4_0, Q4_1, Q8_0, F16, F32)",
                    method.unwrap_or("unknown")
                );
            }
        }
        if let Some(q) = self.quantization.as_ref().or(self.quantization_config.as_ref()) {
            let bits = q.get("bits").and_then(|b| b.as_i64());
            let group = q.get("group_size").and_then(|g| g.as_i64());
            if !matches!(bits, Some(2 | 3 | 4 | 5 | 6 | 8)) || !matches!(group, Some(32 | 64 | 128)) {
                bail!(
                    "unsupported MLX quantization {q}: supported are bits 2-6 or 8 with group_size 32, 64 or 128"
                );
            }
            // Per-layer entries may name their own mode (mlx-lm: MXFP4 experts, affine others).
            let layers = q.as_object().into_iter().flat_map(|o| o.values()).filter(|v| v.is_object());
            for mode in std::iter::once(q).chain(layers).filter_map(|v| v.get("mode").and_then(|m| m.as_str())) {
                if mode != "affine" && mode != "mxfp4" {
                    bail!("unsupported MLX quantization mode {mode:?}: supported are affine and mxfp4");
                }
            }
        }
        (family.validate)(self)?;
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        let factor = self.partial_rotary_factor();
        match family.partial_rotary {
            _ if factor == 1.0 => {}
            PartialRotary::Refused => bail!(
                "partial rotary embeddings (partial_rotary_factor {factor}) are not supported for {}",
                self.architecture()?
            ),
            PartialRotary::Accepted { .. } => {
                let dim = self.rotary_dim();
                if !(factor > 0.0 && factor < 1.0) || dim == 0 || dim % 2 != 0 {
                    bail!("partial_rotary_factor {factor} of head_dim {} gives no even rotary dimension", self.head_dim());
                }
            }
        }
        if let Some(rs) = &self.rope_scaling {
            match rs.rope_type.as_deref() {
                None | Some("default") | Some("linear") | Some("llama3") | Some("yarn") => {}
                Some("longrope") | Some("su") if family.rope == RopeRules::SharedWithLongrope => {}
                Some(other) => bail!(
                    "unsupported rope_scaling type {other:?}: supported are default, linear, llama3, \
                     yarn (and longrope for Phi-3)"
                ),
            }
        }
        Ok(())
    }

    /// Layer `layer` is a Gated DeltaNet layer (`layer_types` "linear_attention"; without
    /// `layer_types`, a hybrid config's layers other than every `full_attention_interval`-th).
    pub fn is_linear_attention(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(layer).is_some_and(|t| t == "linear_attention"),
            None => self.linear_num_value_heads.is_some() && (layer + 1) % self.full_attention_interval.unwrap_or(4).max(1) != 0,
        }
    }

    /// The recurrent state of the linear-attention layers, None without such layers.
    pub fn state_geometry(&self, ssm_dtype: Dtype) -> Result<Option<StateGeometry>> {
        if !(0..self.num_hidden_layers).any(|i| self.is_linear_attention(i)) {
            return Ok(None);
        }
        let need = |v: Option<usize>, name: &str| v.with_context(|| format!("linear-attention layers need {name}"));
        let (hk, hv) = (need(self.linear_num_key_heads, "linear_num_key_heads")?, need(self.linear_num_value_heads, "linear_num_value_heads")?);
        let (dk, dv) = (need(self.linear_key_head_dim, "linear_key_head_dim")?, need(self.linear_value_head_dim, "linear_value_head_dim")?);
        let k = self.linear_conv_kernel_dim.unwrap_or(4);
        ensure!(k >= 2, "linear_conv_kernel_dim {k} must be at least 2");
        Ok(Some(StateGeometry { conv: [k - 1, 2 * hk * dk + hv * dv], ssm: [hv, dk, dv], ssm_dtype }))
    }

    /// The ssm state's dtype: the config's `mamba_ssm_dtype`, else the model's (vLLM's rule).
    pub fn ssm_dtype(&self, model_dtype: Dtype) -> Result<Dtype> {
        match self.mamba_ssm_dtype.as_deref() {
            None | Some("auto") => Ok(model_dtype),
            Some(name) => parse_dtype(name).with_context(|| format!("mamba_ssm_dtype {name:?}")),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The fraction of each head RoPE rotates (the config's, else the family's default).
    pub fn partial_rotary_factor(&self) -> f32 {
        let default = match self.family().map(|f| f.partial_rotary) {
            Ok(PartialRotary::Accepted { default }) => default,
            _ => 1.0,
        };
        self.partial_rotary_factor.unwrap_or(default)
    }

    /// Features RoPE rotates, the first of each head (transformers: `int(head_dim * factor)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor() as f64) as usize
    }

    /// The checkpoint's declared floating-point dtype (config.json `torch_dtype` / `dtype`).
    pub fn checkpoint_dtype(&self) -> Option<&str> {
        self.torch_dtype.as_deref().or(self.dtype.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"vocab_size":100,"rms_norm_eps":1e-5}"#;

    #[test]
    fn parses_llama_defaults() {
        let c = ModelConfig::from_json(LLAMA).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.num_kv_heads(), 2);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = LLAMA.replace("\"rms_norm_eps\"", "\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":8.0,\"original_max_position_embeddings\":64},\"rms_norm_eps\"");
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        let rs = c.rope_scaling.unwrap();
        assert_eq!(rs.rope_type.as_deref(), Some("llama3"));
        assert_eq!(rs.factor, Some(8.0));
    }

    #[test]
    fn rejects_unknown_architecture() {
        // A real GPT-2 config: no hidden_size / intermediate_size; the architecture is the news.
        let text = r#"{"architectures":["GPT2LMHeadModel"],"n_embd":64,"n_layer":2,"vocab_size":100}"#;
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(format!("{err:#}").contains("unsupported model architecture"));
        assert!(format!("{err:#}").ends_with(
            "vllm-metal-rs runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, \
             Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM, SmolLM3ForCausalLM, Glm4MoeForCausalLM, GptOssForCausalLM, \
             Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Qwen3NextForCausalLM, Qwen3_5ForCausalLM, \
             Qwen3_5MoeForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration, \
             Qwen2VLForConditionalGeneration"
        ));
    }

    #[test]
    fn rejects_quantization_config() {
        let text = LLAMA.replace("\"vocab_size\"", "\"quantization_config\":{\"quant_method\":\"awq\"},\"vocab_size\"");
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(format!("{err:#}").contains("\"awq\""));
    }

    #[test]
    fn gemma3_legacy_and_hf5_layouts_give_the_same_layers() {
        let base = r#""architectures":["Gemma3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "vocab_size":100,"hidden_activation":"gelu_pytorch_tanh","sliding_window":8,
            "use_bidirectional_attention":false"#;
        let legacy = format!(
            r#"{{{base},"sliding_window_pattern":3,"rope_theta":1000000.0,"rope_local_base_freq":10000.0,
            "rope_scaling":{{"rope_type":"linear","factor":8.0}}}}"#
        );
        let hf5 = format!(
            r#"{{{base},"layer_types":["sliding_attention","sliding_attention","full_attention",
            "sliding_attention","sliding_attention","full_attention"],
            "rope_parameters":{{"sliding_attention":{{"rope_type":"default","rope_theta":10000.0}},
            "full_attention":{{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0}}}}}}"#
        );
        for text in [legacy, hf5] {
            let c = ModelConfig::from_json(&text).unwrap();
            let w = Some(8);
            assert_eq!(c.layer_windows(), vec![w, w, None, w, w, None]);
            assert_eq!(c.rope_theta, 1000000.0);
            assert_eq!(c.rope_local_base_freq, Some(10000.0));
            assert_eq!(c.rope_scaling.as_ref().unwrap().factor, Some(8.0));
        }
    }

    #[test]
    fn qwen_window_only_with_use_sliding_window() {
        let text = LLAMA.replace("LlamaForCausalLM", "Qwen2ForCausalLM")
            .replace("\"rms_norm_eps\"", "\"sliding_window\":32,\"use_sliding_window\":false,\"rms_norm_eps\"");
        assert_eq!(ModelConfig::from_json(&text).unwrap().layer_windows(), vec![None, None]);
        let err = ModelConfig::from_json(&text.replace("false", "true")).unwrap_err();
        assert!(format!("{err:#}").contains("use_sliding_window"));
        // Mistral's window applies to every layer.
        let text = LLAMA.replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace("\"rms_norm_eps\"", "\"sliding_window\":32,\"rms_norm_eps\"");
        assert_eq!(ModelConfig::from_json(&text).unwrap().layer_windows(), vec![Some(32), Some(32)]);
    }

    #[test]
    fn family_rules_refuse_with_their_messages() {
        let gelu = LLAMA.replace("\"vocab_size\"", "\"hidden_act\":\"gelu_pytorch_tanh\",\"vocab_size\"");
        let err = format!("{:#}", ModelConfig::from_json(&gelu).unwrap_err());
        assert!(err.contains("unsupported activation \"gelu_pytorch_tanh\" for LlamaForCausalLM: supported is silu"), "{err}");
        let moe = LLAMA.replace("LlamaForCausalLM", "MixtralForCausalLM")
            .replace("\"vocab_size\"", "\"num_local_experts\":2,\"num_experts_per_tok\":3,\"vocab_size\"");
        let err = format!("{:#}", ModelConfig::from_json(&moe).unwrap_err());
        assert!(err.contains("MixtralForCausalLM needs num_experts >= num_experts_per_tok >= 1, got 2 and 3"), "{err}");
        let longrope = r#""rope_scaling":{"rope_type":"longrope","short_factor":[1.0],"long_factor":[1.0]},"vocab_size""#;
        let err = format!("{:#}", ModelConfig::from_json(&LLAMA.replace("\"vocab_size\"", longrope)).unwrap_err());
        assert!(err.contains("unsupported rope_scaling type \"longrope\""), "{err}");
        let phi3 = LLAMA.replace("LlamaForCausalLM", "Phi3ForCausalLM").replace("\"vocab_size\"", longrope);
        ModelConfig::from_json(&phi3).unwrap();
        let partial = LLAMA.replace("\"vocab_size\"", "\"partial_rotary_factor\":0.5,\"vocab_size\"");
        let err = format!("{:#}", ModelConfig::from_json(&partial).unwrap_err());
        assert!(err.contains("partial rotary embeddings (partial_rotary_factor 0.5) are not supported for LlamaForCausalLM"), "{err}");
        let c = ModelConfig::from_json(&partial.replace("LlamaForCausalLM", "Phi3ForCausalLM")).unwrap();
        assert_eq!((c.head_dim(), c.rotary_dim()), (16, 8));
    }

    #[test]
    fn mlx_quantization_accepted_other_methods_refused() {
        let q = r#"{"group_size":64,"bits":4}"#;
        let both = LLAMA.replace("\"vocab_size\"", &format!("\"quantization\":{q},\"quantization_config\":{q},\"vocab_size\""));
        ModelConfig::from_json(&both).unwrap();
        let bad = LLAMA.replace("\"vocab_size\"", "\"quantization\":{\"group_size\":64,\"bits\":7},\"vocab_size\"");
        assert!(format!("{:#}", ModelConfig::from_json(&bad).unwrap_err()).contains("bits"));
        let mxfp4 = r#"{"group_size":64,"bits":8,"model.layers.0.mlp.up_proj":{"group_size":32,"bits":4,"mode":"mxfp4"}}"#;
        ModelConfig::from_json(&LLAMA.replace("\"vocab_size\"", &format!("\"quantization\":{mxfp4},\"vocab_size\""))).unwrap();
        let nvfp4 = mxfp4.replace("mxfp4", "nvfp4");
        let err = format!("{:#}", ModelConfig::from_json(&LLAMA.replace("\"vocab_size\"", &format!("\"quantization\":{nvfp4},\"vocab_size\""))).unwrap_err());
        assert!(err.contains("unsupported MLX quantization mode \"nvfp4\": supported are affine and mxfp4"), "{err}");
        let fp8 = LLAMA.replace("\"vocab_size\"", "\"quantization_config\":{\"quant_method\":\"fp8\"},\"vocab_size\"");
        assert!(format!("{:#}", ModelConfig::from_json(&fp8).unwrap_err()).contains("\"fp8\""));
    }
}
