//! vllm-metal-rs engine: LLM execution on MLX. No Python here; `rust/python` wraps it for vLLM.
//!
//! config (HF config.json) -> weights (safetensors / GGUF) -> models (one file per family, listed
//! in `models::FAMILIES`, built from `layers`) -> kv_cache (paged) + paged_attention (gather + SDPA,
//! or the CUDA page-reading kernel) -> sampler; `runner` ties them into scheduler steps, `batch`
//! builds a step's tensors once. `mlx_ext` holds what mlx-rs does not wrap (the only direct C
//! calls); `dtype` names MLX dtypes.

pub mod batch;
pub mod config;
pub mod dtype;
pub mod encoder;
pub mod gguf;
pub mod kv_cache;
pub mod layers;
pub mod mlx_ext;
pub mod models;
pub mod multimodal;
pub mod paged_attention;
pub mod runner;
pub mod sampler;
pub mod weights;
