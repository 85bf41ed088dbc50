//! Model configuration, read from a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Architectures this engine executes (the `architectures` entry of config.json).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
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
    pub hidden_act: Option<String>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    /// mlx-community quantized checkpoints (`{"group_size": 64, "bits": 4}`).
    pub quantization: Option<serde_json::Value>,
    /// Hugging Face quantization methods (AWQ, GPTQ, ...): none is run here.
    pub quantization_config: Option<serde_json::Value>,
}

fn default_eps() -> f32 {
    1e-6
}
fn default_theta() -> f32 {
    10000.0
}

fn check_architecture(architectures: &[String]) -> Result<&str> {
    let arch = architectures.first().map(String::as_str).unwrap_or("");
    if !SUPPORTED_ARCHITECTURES.contains(&arch) {
        bail!(
            "unsupported model architecture {architectures:?}: vllm-metal-rs runs {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        );
    }
    Ok(arch)
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
        let mut config: Self = serde_json::from_value(value).context("parsing config.json")?;
        config.normalize_rope()?;
        config.validate()?;
        Ok(config)
    }

    /// Fold transformers 5's `rope_parameters` into `rope_theta` / `rope_scaling`.
    fn normalize_rope(&mut self) -> Result<()> {
        let Some(params) = self.rope_parameters.take() else { return Ok(()) };
        if let Some(theta) = params.get("rope_theta").and_then(|t| t.as_f64()) {
            self.rope_theta = theta as f32;
        }
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(|t| t.as_str());
        if self.rope_scaling.is_none() && kind.is_some_and(|k| k != "default") {
            self.rope_scaling =
                Some(serde_json::from_value(params.clone()).context("parsing rope_parameters")?);
        }
        self.rope_parameters = Some(params);
        Ok(())
    }

    /// The one architecture this config asks for, if we run it.
    pub fn architecture(&self) -> Result<&str> {
        check_architecture(&self.architectures)
    }

    fn validate(&self) -> Result<()> {
        self.architecture()?;
        if let Some(q) = &self.quantization_config {
            let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown");
            bail!(
                "unsupported quantization method {method:?}: vllm-metal-rs runs unquantized \
                 safetensors (f32/f16/bf16) and GGUF (Q4_0, Q4_1, Q8_0, F16, F32)"
            );
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("unsupported hidden_act {act:?}: Llama-family models here use silu");
            }
        }
        if let Some(window) = self.sliding_window {
            let max_pos = self.max_position_embeddings.unwrap_or(usize::MAX);
            if window < max_pos {
                bail!(
                    "sliding-window attention (sliding_window={window}) is not supported yet; \
                     only Mistral checkpoints without a sliding window run"
                );
            }
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        if let Some(rs) = &self.rope_scaling {
            match rs.rope_type.as_deref() {
                None | Some("default") | Some("linear") | Some("llama3") => {}
                Some(other) => bail!(
                    "unsupported rope_scaling type {other:?}: supported are default, linear, llama3"
                ),
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
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
    }

    #[test]
    fn rejects_quantization_config() {
        let text = LLAMA.replace("\"vocab_size\"", "\"quantization_config\":{\"quant_method\":\"awq\"},\"vocab_size\"");
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(format!("{err:#}").contains("\"awq\""));
    }
}
