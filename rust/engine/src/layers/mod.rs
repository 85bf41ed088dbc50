//! Layers the model families share, as their HF checkpoints name them. Attention over the paged
//! KV cache is apart, in `paged_attention`; the layers here only call it.

pub mod attention;
pub mod gated_delta;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;

use anyhow::Result;
use mlx_rs::{ops, Array};

/// `cap * tanh(x / cap)` (Gemma 2 attention scores and final logits).
pub fn softcap(x: &Array, cap: f32) -> Result<Array> {
    Ok(ops::tanh(&x.divide(scalar(cap, x)?)?)?.multiply(scalar(cap, x)?)?)
}

/// A scalar in `like`'s dtype (an f32 scalar would promote half-precision arrays).
pub fn scalar(v: f32, like: &Array) -> Result<Array> {
    Ok(Array::from_f32(v).as_dtype(like.dtype())?)
}
