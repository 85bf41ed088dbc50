//! vllm-metal-rs engine: LLM execution on MLX. No Python here; `rust/python` wraps it for vLLM.
//!
//! config (HF config.json) -> weights (safetensors / GGUF) -> models (one file per family, shared
//! layers in nn) -> kv_cache (paged) + attention (over pages) -> sampler; `runner` ties them into
//! scheduler steps, `batch` builds a step's tensors once.

pub mod batch;
pub mod config;
pub mod dtype;
pub mod gguf;
pub mod kv_cache;
pub mod layers;
pub mod mlx_ext;
pub mod models;
pub mod paged_attention;
pub mod runner;
pub mod sampler;
pub mod weights;
