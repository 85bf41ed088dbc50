//! RMSNorm, on MLX's fused kernel. Gemma's (1 + w) gain gets its 1 at load
//! (`Weights::rms_norm_plus_one`), so one struct serves both.

use anyhow::Result;
use mlx_rs::{fast, Array};

pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}
