//! Layers shared by every model family: (quantized) linear / embedding, RMSNorm, RoPE.

use anyhow::{Context, Result};
use mlx_rs::{fast, ops, Array, Dtype};

/// MLX affine quantization of a weight matrix (`weight` packed into uint32 along the input dimension).
#[derive(Clone)]
pub struct Quantization {
    pub scales: Array,
    pub biases: Option<Array>,
    pub group_size: i32,
    pub bits: i32,
}

/// `y = x W^T (+ b)`; W is `[out, in]` dense, or packed with [`Quantization`].
/// Embeddings are the same struct: rows of W looked up by token id.
pub struct Linear {
    pub weight: Array,
    pub bias: Option<Array>,
    pub quant: Option<Quantization>,
}

impl Linear {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = match &self.quant {
            None => x.matmul(self.weight.t())?,
            Some(q) => ops::quantized_matmul(
                x,
                &self.weight,
                &q.scales,
                q.biases.as_ref(),
                true,
                q.group_size,
                q.bits,
            )?,
        };
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }

    /// Embedding lookup: rows `ids` of W, dequantized when W is quantized.
    pub fn rows(&self, ids: &Array) -> Result<Array> {
        match &self.quant {
            None => Ok(self.weight.take_axis(ids, 0)?),
            Some(q) => {
                let w = self.weight.take_axis(ids, 0)?;
                let s = q.scales.take_axis(ids, 0)?;
                let b = q.biases.as_ref().map(|b| b.take_axis(ids, 0)).transpose()?;
                Ok(ops::dequantize(&w, &s, b.as_ref(), q.group_size, q.bits)?
                    .as_dtype(q.scales.dtype())?)
            }
        }
    }

    /// Output features.
    pub fn out_features(&self) -> i32 {
        self.weight.shape()[0]
    }

    pub fn nbytes(&self) -> usize {
        let q = self.quant.as_ref().map_or(0, |q| {
            q.scales.nbytes() + q.biases.as_ref().map_or(0, |b| b.nbytes())
        });
        self.weight.nbytes() + self.bias.as_ref().map_or(0, |b| b.nbytes()) + q
    }

    /// The weights as plain arrays (for evaluation at load time).
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = vec![&self.weight];
        v.extend(self.bias.as_ref());
        if let Some(q) = &self.quant {
            v.push(&q.scales);
            v.extend(q.biases.as_ref());
        }
        v
    }
}

pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

/// Rotary position embedding applied at explicit per-token positions (tokens of a flattened batch
/// belong to different requests, so there is no single offset).
pub struct Rope {
    pub dims: i32,
    pub base: Option<f32>,
    pub scale: f32,
    /// Per-frequency periods (MLX's `freqs`), used instead of `base` by scaled variants.
    pub freqs: Option<Array>,
}

impl Rope {
    /// `rope_scaling` of a Llama-style config: none/default, linear, or llama3.
    pub fn from_config(
        head_dim: usize,
        theta: f32,
        scaling: Option<&crate::config::RopeScaling>,
    ) -> Result<Self> {
        let dims = head_dim as i32;
        let kind = scaling.and_then(|s| s.rope_type.as_deref()).unwrap_or("default");
        match (kind, scaling) {
            ("linear", Some(s)) => Ok(Self {
                dims,
                base: Some(theta),
                scale: 1.0 / s.factor.context("linear rope_scaling needs factor")?,
                freqs: None,
            }),
            ("llama3", Some(s)) => {
                let factor = s.factor.context("llama3 rope_scaling needs factor")?;
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let old_ctx = s
                    .original_max_position_embeddings
                    .context("llama3 rope_scaling needs original_max_position_embeddings")?
                    as f32;
                let low_wavelen = old_ctx / low;
                let high_wavelen = old_ctx / high;
                // Periods 2*pi/inv_freq, stretched by `factor` for long wavelengths and smoothly
                // interpolated in between (Llama 3.1's scheme).
                let periods: Vec<f32> = (0..dims / 2)
                    .map(|i| {
                        let inv_freq = 1.0 / theta.powf((2 * i) as f32 / dims as f32);
                        let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
                        let scaled = if wavelen < high_wavelen {
                            inv_freq
                        } else if wavelen > low_wavelen {
                            inv_freq / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                        };
                        1.0 / scaled
                    })
                    .collect();
                Ok(Self {
                    dims,
                    base: None,
                    scale: 1.0,
                    freqs: Some(Array::from_slice(&periods, &[dims / 2])),
                })
            }
            _ => Ok(Self { dims, base: Some(theta), scale: 1.0, freqs: None }),
        }
    }

    /// `x`: `[T, heads, head_dim]`, `positions`: `[T]` int32.
    pub fn forward(&self, x: &Array, positions: &Array) -> Result<Array> {
        let shape = x.shape().to_vec();
        // MLX rotates along axis -2 with one offset per leading index: one "sequence" per token.
        let x4 = x.reshape(&[shape[0], shape[1], 1, shape[2]])?;
        let y = fast::rope_dynamic(
            &x4,
            self.dims,
            false,
            self.base,
            self.scale,
            positions,
            self.freqs.as_ref(),
        )?;
        Ok(y.reshape(&shape)?)
    }
}

/// Size of a dtype in bytes.
pub fn dtype_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Float32 | Dtype::Int32 | Dtype::Uint32 => 4,
        Dtype::Float16 | Dtype::Bfloat16 | Dtype::Int16 | Dtype::Uint16 => 2,
        Dtype::Float64 | Dtype::Int64 | Dtype::Uint64 | Dtype::Complex64 => 8,
        _ => 1,
    }
}

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float32 => "float32",
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        _ => "other",
    }
}

pub fn parse_dtype(name: &str) -> Result<Dtype> {
    match name {
        "float32" | "float" | "fp32" => Ok(Dtype::Float32),
        "float16" | "half" | "fp16" => Ok(Dtype::Float16),
        "bfloat16" | "bf16" => Ok(Dtype::Bfloat16),
        other => anyhow::bail!("unsupported dtype {other:?}: supported are float32, float16, bfloat16"),
    }
}
