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

/// LayerNorm with gain and bias (encoders).
pub struct LayerNorm {
    pub weight: Array,
    pub bias: Array,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}
