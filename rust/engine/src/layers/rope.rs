//! Rotary position embedding at per-token positions, with the scalings of HF configs: default,
//! linear, llama3 (Llama 3.1's smooth stretch of long wavelengths), longrope (Phi-3's
//! per-frequency factors, switched by request length) and yarn (gpt-oss, Qwen's long contexts).

use anyhow::{Context, Result};
use mlx_rs::{fast, ops, Array};

use crate::config::RopeScaling;
use crate::layers::scalar;

/// Rotary position embedding applied at explicit per-token positions (tokens of a flattened batch
/// belong to different requests, so there is no single offset).
pub struct Rope {
    /// Features rotated: the first `dims` of each head.
    pub dims: i32,
    pub base: Option<f32>,
    pub scale: f32,
    /// Per-frequency periods (MLX's `freqs`), used instead of `base` by scaled variants.
    pub freqs: Option<Array>,
    /// Longrope: periods for requests longer than the original context.
    pub long: Option<LongRope>,
    /// Longrope's attention factor (scales cos and sin, i.e. the rotated features).
    pub mscale: f32,
    /// M-RoPE (Qwen2-VL): frequencies read the step's `[3, T]` positions (t, h, w) by section
    /// instead of one position per token; the fields above are then unused.
    pub sections: Option<SectionedRope>,
}

pub struct LongRope {
    pub freqs: Array,
    pub original_max_position_embeddings: i32,
}

impl Rope {
    /// `rope_scaling` of a config: none/default, linear, llama3, or longrope (`max_pos` is the
    /// config's max_position_embeddings, longrope's default factor is max_pos / original).
    /// `rotary_dim`: the features rotated, the first of each head (partial rotary embeddings:
    /// fewer than head_dim; MLX passes the rest through); frequencies are spread over them.
    pub fn from_config(
        rotary_dim: usize,
        theta: f32,
        scaling: Option<&RopeScaling>,
        max_pos: Option<usize>,
        original_max_pos: Option<usize>,
    ) -> Result<Self> {
        let dims = rotary_dim as i32;
        let plain = |base: Option<f32>, scale: f32, freqs: Option<Array>| Self {
            dims,
            base,
            scale,
            freqs,
            long: None,
            mscale: 1.0,
            sections: None,
        };
        let kind = scaling.and_then(|s| s.rope_type.as_deref()).unwrap_or("default");
        match (kind, scaling) {
            ("linear", Some(s)) => {
                Ok(plain(Some(theta), 1.0 / s.factor.context("linear rope_scaling needs factor")?, None))
            }
            ("longrope" | "su", Some(s)) => {
                let orig = s
                    .original_max_position_embeddings
                    .or(original_max_pos)
                    .context("longrope needs original_max_position_embeddings")?;
                let periods = |factors: &Option<Vec<f32>>, what: &str| -> Result<Array> {
                    let f = factors.as_ref().with_context(|| format!("longrope needs {what}"))?;
                    anyhow::ensure!(
                        f.len() == (dims / 2) as usize,
                        "longrope {what} has {} entries, head_dim/2 is {}",
                        f.len(),
                        dims / 2
                    );
                    let p: Vec<f32> = (0..dims / 2)
                        .map(|i| f[i as usize] * theta.powf((2 * i) as f32 / dims as f32))
                        .collect();
                    Ok(Array::from_slice(&p, &[dims / 2]))
                };
                let factor = s.factor.unwrap_or_else(|| {
                    max_pos.map_or(1.0, |m| m as f32 / orig as f32)
                });
                let mscale = s.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (orig as f32).ln()).sqrt()
                });
                Ok(Self {
                    dims,
                    base: None,
                    scale: 1.0,
                    freqs: Some(periods(&s.short_factor, "short_factor")?),
                    long: Some(LongRope {
                        freqs: periods(&s.long_factor, "long_factor")?,
                        original_max_position_embeddings: orig as i32,
                    }),
                    mscale,
                    sections: None,
                })
            }
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
                Ok(plain(None, 1.0, Some(Array::from_slice(&periods, &[dims / 2]))))
            }
            ("yarn", Some(s)) => {
                let orig = s
                    .original_max_position_embeddings
                    .or(original_max_pos)
                    .context("yarn rope_scaling needs original_max_position_embeddings")? as f64;
                let factor = match s.factor {
                    Some(f) => f as f64,
                    None => max_pos.context("yarn rope_scaling needs factor or max_position_embeddings")? as f64 / orig,
                };
                let periods = yarn_periods(dims, theta as f64, factor, orig, s);
                // The attention factor scales cos and sin.
                let m = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let mscale = match (s.attention_factor, s.mscale, s.mscale_all_dim) {
                    (Some(a), _, _) => a as f64,
                    (None, Some(ms), Some(all)) if ms != 0.0 && all != 0.0 => m(factor, ms as f64) / m(factor, all as f64),
                    _ => m(factor, 1.0),
                };
                Ok(Self { mscale: mscale as f32, ..plain(None, 1.0, Some(Array::from_slice(&periods, &[dims / 2]))) })
            }
            _ => Ok(plain(Some(theta), 1.0, None)),
        }
    }

    /// transformers' "proportional" RoPE (Gemma 4's global layers): the whole head rotates in
    /// halves as usual, but only the first `partial_rotary_factor * head_dim / 2` frequencies turn
    /// (base^(-2i / head_dim), divided by `factor`); the other pairs have frequency 0, i.e. pass
    /// through. Unlike partial rotation, the turning pairs are (i, i + head_dim / 2).
    pub fn proportional(head_dim: usize, theta: f32, partial_rotary_factor: f32, factor: f32) -> Self {
        let angles = (partial_rotary_factor as f64 * head_dim as f64 / 2.0).floor() as usize;
        let periods: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                if i < angles {
                    factor * theta.powf((2 * i) as f32 / head_dim as f32)
                } else {
                    f32::INFINITY
                }
            })
            .collect();
        let half = (head_dim / 2) as i32;
        Self {
            dims: head_dim as i32,
            base: None,
            scale: 1.0,
            freqs: Some(Array::from_slice(&periods, &[half])),
            long: None,
            mscale: 1.0,
            sections: None,
        }
    }

    /// Rotate `x` `[T, heads, head_dim]` at the step's positions: its M-RoPE table when the rope
    /// has sections (a step without one, all text, has t = h = w = the position), else `forward`.
    pub fn at(&self, x: &Array, batch: &crate::batch::StepBatch) -> Result<Array> {
        match &self.sections {
            None => self.forward(x, &batch.positions, &batch.seq_ends),
            Some(s) => match &batch.mrope_positions {
                Some(p) => s.forward(x, p),
                None => s.forward(x, &ops::broadcast_to(batch.positions.reshape(&[1, -1])?, &[3, batch.num_tokens as i32])?),
            },
        }
    }

    /// `x`: `[T, heads, head_dim]`, `positions`: `[T]` int32, `seq_ends`: `[T]` int32, the length
    /// of each token's request up to the end of this step's chunk (longrope picks its factors by it,
    /// as transformers does by the length of the sequence in the forward).
    pub fn forward(&self, x: &Array, positions: &Array, seq_ends: &Array) -> Result<Array> {
        let shape = x.shape().to_vec();
        // MLX rotates along axis -2 with one offset per leading index: one "sequence" per token.
        let x4 = x.reshape(&[shape[0], shape[1], 1, shape[2]])?;
        let rope = |freqs: Option<&Array>| {
            fast::rope_dynamic(&x4, self.dims, false, self.base, self.scale, positions, freqs)
        };
        let mut y = rope(self.freqs.as_ref())?;
        if let Some(long) = &self.long {
            let is_long = seq_ends
                .gt(Array::from_int(long.original_max_position_embeddings))?
                .reshape(&[shape[0], 1, 1, 1])?;
            y = ops::select(&is_long, &rope(Some(&long.freqs))?, &y)?;
        }
        if self.mscale != 1.0 {
            // The factor scales cos and sin: the rotated features only, not those passed through.
            let d = shape[2];
            let scale = if self.dims == d {
                scalar(self.mscale, &y)?
            } else {
                let per: Vec<f32> = (0..d).map(|i| if i < self.dims { self.mscale } else { 1.0 }).collect();
                Array::from_slice(&per, &[d]).as_dtype(y.dtype())?
            };
            y = y.multiply(scale)?;
        }
        Ok(y.reshape(&shape)?)
    }
}

/// A rotary embedding whose frequencies read different rows of a position table: Qwen2-VL's
/// M-RoPE (text: rows t, h, w, each over its `mrope_section` of the frequencies) and its vision
/// tower's 2D RoPE (rows h, w). Halves rotate as transformers' `rotate_half` does: features
/// `i` and `i + dims / 2` turn together by frequency `i`.
pub struct SectionedRope {
    /// `[dims / 2]` float32 inverse frequencies.
    inv_freq: Array,
    /// `[dims / 2]` int32: the position row each frequency reads.
    rows: Array,
    pub dims: i32,
}

impl SectionedRope {
    /// `inv_freq[i]` turns by the positions of row `rows[i]`.
    pub fn new(inv_freq: &[f32], rows: &[i32]) -> Result<Self> {
        anyhow::ensure!(inv_freq.len() == rows.len(), "{} frequencies but {} position rows", inv_freq.len(), rows.len());
        let half = inv_freq.len() as i32;
        Ok(Self { inv_freq: Array::from_slice(inv_freq, &[half]), rows: Array::from_slice(rows, &[half]), dims: 2 * half })
    }

    /// transformers' M-RoPE of a text stack: `head_dim / 2` default frequencies of `theta`,
    /// consecutive runs of `sections[j]` of them read row j (t, h, w).
    pub fn mrope(head_dim: usize, theta: f32, sections: &[usize]) -> Result<Self> {
        let half = head_dim / 2;
        anyhow::ensure!(
            sections.iter().sum::<usize>() == half,
            "mrope_section {sections:?} does not cover head_dim / 2 = {half} frequencies"
        );
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let rows: Vec<i32> = sections.iter().enumerate().flat_map(|(j, &n)| std::iter::repeat_n(j as i32, n)).collect();
        Self::new(&inv_freq, &rows)
    }

    /// `x`: `[T, heads, dims]`; `positions`: `[rows, T]` int32. Computed in `x`'s dtype with cos
    /// and sin cast to it, as transformers does.
    pub fn forward(&self, x: &Array, positions: &Array) -> Result<Array> {
        let t = x.shape()[0];
        let half = self.dims / 2;
        anyhow::ensure!(x.shape()[2] == self.dims, "rotary dims {} but heads of {}", self.dims, x.shape()[2]);
        let pos = positions.take_axis(&self.rows, 0)?.transpose()?.as_dtype(mlx_rs::Dtype::Float32)?;
        let angles = pos.multiply(&self.inv_freq)?.reshape(&[t, 1, half])?;
        let (cos, sin) = (ops::cos(&angles)?.as_dtype(x.dtype())?, ops::sin(&angles)?.as_dtype(x.dtype())?);
        let parts = ops::split_equal(x, 2, -1)?;
        let (x1, x2) = (&parts[0], &parts[1]);
        let y1 = x1.multiply(&cos)?.subtract(x2.multiply(&sin)?)?;
        let y2 = x2.multiply(&cos)?.add(x1.multiply(&sin)?)?;
        Ok(ops::concatenate(&[y1, y2], -1)?)
    }
}

/// YaRN's periods: each frequency blends the original (extrapolated) one and the one interpolated
/// by `factor`, by a ramp between the dimensions that turn `beta_fast` and `beta_slow` times
/// over the original context (bounds rounded outwards unless `truncate` is false).
fn yarn_periods(dims: i32, theta: f64, factor: f64, orig: f64, s: &RopeScaling) -> Vec<f32> {
    let d = dims as f64;
    let beta_fast = s.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0) as f64;
    let beta_slow = s.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0) as f64;
    let dim_of = |rotations: f64| d * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (dim_of(beta_fast), dim_of(beta_slow));
    if s.truncate.unwrap_or(true) {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..dims / 2)
        .map(|i| {
            let pos_freq = (theta as f32).powf((2 * i) as f32 / dims as f32);
            let (extrapolated, interpolated) = (1.0 / pos_freq, 1.0 / (factor as f32 * pos_freq));
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
            let keep = 1.0 - ramp;
            1.0 / (interpolated * (1.0 - keep) + extrapolated * keep)
        })
        .collect()
}
