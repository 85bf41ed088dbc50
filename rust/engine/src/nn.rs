//! Layers shared by every model family: (quantized) linear / embedding, gathered expert linears,
//! RMSNorm, gated MLP, RoPE (default, linear, llama3, longrope), soft-capping.

use anyhow::{Context, Result};
use mlx_rs::{error::Exception, fast, ops, Array, Dtype};

use crate::mlx_ext::fuse::{fused, ArrayFn};

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

    /// `forward` of a stacked linear, split along the features at `at` (the parts' boundaries).
    pub fn forward_split(&self, x: &Array, at: &[i32]) -> Result<Vec<Array>> {
        Ok(ops::split_at_indices(&self.forward(x)?, at, -1)?)
    }

    /// Expert linears stacked in one `[experts, out, in]` weight: `x` `[T, 1, 1, in]` times the
    /// experts `idx` `[T, k]` chose, `[T, k, 1, out]`. One gather_mm / gather_qmm for the whole batch.
    pub fn forward_experts(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array> {
        Ok(match &self.quant {
            None => ops::gather_mm(x, self.weight.swap_axes(-1, -2)?, None, idx, sorted)?,
            Some(q) => ops::gather_qmm(
                x,
                &self.weight,
                &q.scales,
                q.biases.as_ref(),
                None,
                idx,
                true,
                q.group_size,
                q.bits,
                sorted,
            )?,
        })
    }

    /// The linears as one, rows in order (one matmul instead of several on the same input);
    /// `None` when they cannot share one weight (different dtypes or quantizations, a bias on
    /// some only). Evaluated here, so the parts' memory is released as soon as they are dropped.
    pub fn stack_rows(parts: &[&Linear]) -> Result<Option<Linear>> {
        let first = parts.first().context("stack_rows of no linears")?;
        let same = parts.iter().all(|l| {
            l.weight.dtype() == first.weight.dtype()
                && l.weight.ndim() == 2
                && l.bias.is_some() == first.bias.is_some()
                && match (&l.quant, &first.quant) {
                    (None, None) => true,
                    (Some(p), Some(q)) => p.group_size == q.group_size && p.bits == q.bits && p.biases.is_some() == q.biases.is_some(),
                    _ => false,
                }
        });
        if !same {
            return Ok(None);
        }
        let cat = |f: &dyn Fn(&Linear) -> Option<Array>| -> Result<Option<Array>> {
            let v: Option<Vec<Array>> = parts.iter().map(|l| f(l)).collect();
            Ok(match v {
                Some(v) => Some(ops::concatenate(&v, 0)?),
                None => None,
            })
        };
        let linear = Linear {
            weight: cat(&|l| Some(l.weight.clone()))?.unwrap(),
            bias: cat(&|l| l.bias.clone())?,
            quant: match &first.quant {
                None => None,
                Some(q) => Some(Quantization {
                    scales: cat(&|l| l.quant.as_ref().map(|q| q.scales.clone()))?.unwrap(),
                    biases: cat(&|l| l.quant.as_ref().and_then(|q| q.biases.clone()))?,
                    group_size: q.group_size,
                    bits: q.bits,
                }),
            },
        };
        mlx_rs::transforms::eval(linear.arrays())?;
        Ok(Some(linear))
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
        self.weight.shape()[self.weight.ndim() - 2]
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

/// Activations of gated MLPs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" => Ok(Self::Silu),
            "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => anyhow::bail!("unsupported activation {other:?}: supported are silu, gelu_pytorch_tanh"),
        }
    }

    /// `act(gate) * up`, one kernel on GPUs.
    pub fn gated(self, gate: &Array, up: &Array) -> Result<Array> {
        let f: ArrayFn = match self {
            Self::Silu => |a| Activation::Silu.apply(&a[0])?.multiply(&a[1]),
            Self::GeluTanh => |a| Activation::GeluTanh.apply(&a[0])?.multiply(&a[1]),
        };
        fused(f, &[gate.clone(), up.clone()])
    }

    pub fn forward(self, x: &Array) -> Result<Array> {
        Ok(self.apply(x)?)
    }

    fn apply(self, x: &Array) -> std::result::Result<Array, Exception> {
        Ok(match self {
            Self::Silu => x.multiply(ops::sigmoid(x)?)?,
            Self::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let c = (2.0f32 / std::f32::consts::PI).sqrt();
                let s = |v: f32| Array::from_f32(v).as_dtype(x.dtype());
                let inner = x.add(x.multiply(x)?.multiply(x)?.multiply(s(0.044715)?)?)?;
                let t = ops::tanh(&inner.multiply(s(c)?)?)?;
                x.multiply(s(0.5)?)?.multiply(t.add(s(1.0)?)?)?
            }
        })
    }
}

/// `down(act(gate(x)) * up(x))`, gate and up as one matmul when they can be stacked.
pub struct Mlp {
    pub gate_up: GateUp,
    pub down_proj: Linear,
    pub act: Activation,
}

/// The gate and up projections: `[gate; up]` stacked into one weight (one matmul per layer
/// instead of two), or apart when their quantizations differ.
pub enum GateUp {
    Stacked { linear: Linear, intermediate: i32 },
    Apart { gate_proj: Linear, up_proj: Linear },
}

impl Mlp {
    pub fn new(gate_proj: Linear, up_proj: Linear, down_proj: Linear, act: Activation) -> Result<Self> {
        let gate_up = match Linear::stack_rows(&[&gate_proj, &up_proj])? {
            Some(linear) => GateUp::Stacked { linear, intermediate: gate_proj.out_features() },
            None => GateUp::Apart { gate_proj, up_proj },
        };
        Ok(Self { gate_up, down_proj, act })
    }

    /// From a checkpoint's stacked `gate_up_proj` (Phi-3), `[gate; up]`.
    pub fn stacked(linear: Linear, down_proj: Linear, act: Activation) -> Self {
        let intermediate = linear.out_features() / 2;
        Self { gate_up: GateUp::Stacked { linear, intermediate }, down_proj, act }
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        let (gate, up) = match &self.gate_up {
            GateUp::Stacked { linear, intermediate } => {
                let mut p = linear.forward_split(x, &[*intermediate])?.into_iter();
                (p.next().unwrap(), p.next().unwrap())
            }
            GateUp::Apart { gate_proj, up_proj } => (gate_proj.forward(x)?, up_proj.forward(x)?),
        };
        self.down_proj.forward(&self.act.gated(&gate, &up)?)
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match &self.gate_up {
            GateUp::Stacked { linear, .. } => vec![linear, &self.down_proj],
            GateUp::Apart { gate_proj, up_proj } => vec![gate_proj, up_proj, &self.down_proj],
        }
    }
}

/// Mixture of experts (Mixtral, Qwen3-MoE): a router picks `top_k` experts per token, each a gated
/// MLP; experts are stacked `[experts, out, in]` and run with gathered matmuls, no loop.
pub struct SparseMoe {
    pub gate: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub top_k: i32,
    /// Renormalise the top-k probabilities to sum to one (Mixtral always; Qwen3-MoE by config).
    pub norm_topk_prob: bool,
}

impl SparseMoe {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let t = x.shape()[0];
        let hidden = x.shape()[1];
        let k = self.top_k;
        let probs = ops::softmax_axis(&self.gate.forward(x)?.as_dtype(Dtype::Float32)?, -1, None)?;
        // Top-k experts per token: the last k of an ascending partition (order within k is irrelevant).
        let e = probs.shape()[1];
        let last_k = Array::from_iter(e - k..e, &[k]);
        let idx = ops::argpartition_axis(&probs, e - k, -1)?.take_axis(&last_k, -1)?;
        let mut w = probs.take_along_axis(&idx, -1)?;
        if self.norm_topk_prob {
            w = w.divide(w.sum_axis(-1, true)?)?;
        }
        let w = w.as_dtype(x.dtype())?;
        let xe = x.reshape(&[t, 1, 1, hidden])?;
        // Sorting the (token, expert) pairs by expert lets gather_mm read each expert once; worth
        // it only when there are many pairs (prefill).
        let sorted = t * k >= 64;
        let (xe, idx_run, order) = if sorted {
            let flat = idx.flatten(None, None)?;
            let order = ops::argsort_axis(&flat, 0)?;
            let tok = order.floor_divide(Array::from_int(k))?;
            let xs = xe.reshape(&[t, hidden])?.take_axis(&tok, 0)?.reshape(&[t * k, 1, 1, hidden])?;
            (xs, flat.take_axis(&order, 0)?.reshape(&[t * k, 1])?, Some(order))
        } else {
            (xe, idx.clone(), None)
        };
        let g = self.gate_proj.forward_experts(&xe, &idx_run, sorted)?;
        let u = self.up_proj.forward_experts(&xe, &idx_run, sorted)?;
        let h = Activation::Silu.gated(&g, &u)?;
        let y = self.down_proj.forward_experts(&h, &idx_run, sorted)?; // [N, kk, 1, hidden]
        let y = match order {
            Some(order) => {
                let inv = ops::argsort_axis(&order, 0)?;
                y.reshape(&[t * k, hidden])?.take_axis(&inv, 0)?.reshape(&[t, k, hidden])?
            }
            None => y.reshape(&[t, k, hidden])?,
        };
        Ok(y.multiply(w.expand_dims(-1)?)?.sum_axis(1, false)?)
    }

    pub fn linears(&self) -> [&Linear; 4] {
        [&self.gate, &self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

/// `cap * tanh(x / cap)` (Gemma 2 attention scores and final logits).
pub fn softcap(x: &Array, cap: f32) -> Result<Array> {
    Ok(ops::tanh(&x.divide(scalar(cap, x)?)?)?.multiply(scalar(cap, x)?)?)
}

/// A scalar in `like`'s dtype (an f32 scalar would promote half-precision arrays).
pub fn scalar(v: f32, like: &Array) -> Result<Array> {
    Ok(Array::from_f32(v).as_dtype(like.dtype())?)
}

/// Rotary position embedding applied at explicit per-token positions (tokens of a flattened batch
/// belong to different requests, so there is no single offset).
pub struct Rope {
    pub dims: i32,
    pub base: Option<f32>,
    pub scale: f32,
    /// Per-frequency periods (MLX's `freqs`), used instead of `base` by scaled variants.
    pub freqs: Option<Array>,
    /// Longrope: periods for requests longer than the original context.
    pub long: Option<LongRope>,
    /// Longrope's attention factor (scales cos and sin, i.e. the rotated vector).
    pub mscale: f32,
}

pub struct LongRope {
    pub freqs: Array,
    pub original_max_position_embeddings: i32,
}

impl Rope {
    /// `rope_scaling` of a config: none/default, linear, llama3, or longrope (`max_pos` is the
    /// config's max_position_embeddings, longrope's default factor is max_pos / original).
    pub fn from_config(
        head_dim: usize,
        theta: f32,
        scaling: Option<&crate::config::RopeScaling>,
        max_pos: Option<usize>,
        original_max_pos: Option<usize>,
    ) -> Result<Self> {
        let dims = head_dim as i32;
        let plain = |base: Option<f32>, scale: f32, freqs: Option<Array>| Self {
            dims,
            base,
            scale,
            freqs,
            long: None,
            mscale: 1.0,
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
            _ => Ok(plain(Some(theta), 1.0, None)),
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
            y = y.multiply(scalar(self.mscale, &y)?)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    fn randn(shape: &[i32], seed: u64, scale: f32) -> Array {
        random::normal::<f32>(shape, None, scale, &random::key(seed).unwrap()).unwrap()
    }

    fn host(a: &Array) -> Vec<f32> {
        let a = a.as_dtype(Dtype::Float32).unwrap();
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    /// y = x W^T for one expert's row-major `[out, in]` slice.
    fn matvec(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
        let inp = x.len();
        (0..out).map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum()).collect()
    }

    /// The mixture computed token by token on the host: softmax router, top-k, (renormalised)
    /// weights, SiLU-gated experts.
    fn reference(x: &[f32], t: usize, h: usize, moe: &SparseMoe, e: usize, inter: usize) -> Vec<f32> {
        let dense = |l: &Linear| match &l.quant {
            None => host(&l.weight),
            Some(q) => host(&ops::dequantize(&l.weight, &q.scales, q.biases.as_ref(), q.group_size, q.bits).unwrap()),
        };
        let (g, gp, up, down) = (dense(&moe.gate), dense(&moe.gate_proj), dense(&moe.up_proj), dense(&moe.down_proj));
        let mut y = vec![0f32; t * h];
        for tok in 0..t {
            let xt = &x[tok * h..(tok + 1) * h];
            let logits = matvec(&g, xt, e);
            let m = logits.iter().cloned().fold(f32::MIN, f32::max);
            let ex: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f32 = ex.iter().sum();
            let probs: Vec<f32> = ex.iter().map(|v| v / s).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|a, b| probs[*b].partial_cmp(&probs[*a]).unwrap());
            let top = &order[..moe.top_k as usize];
            let norm: f32 = if moe.norm_topk_prob { top.iter().map(|&i| probs[i]).sum() } else { 1.0 };
            for &ex_i in top {
                let wsz = inter * h;
                let a = matvec(&gp[ex_i * wsz..(ex_i + 1) * wsz], xt, inter);
                let b = matvec(&up[ex_i * wsz..(ex_i + 1) * wsz], xt, inter);
                let act: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect();
                let o = matvec(&down[ex_i * wsz..(ex_i + 1) * wsz], &act, h);
                for j in 0..h {
                    y[tok * h + j] += probs[ex_i] / norm * o[j];
                }
            }
        }
        y
    }

    fn linear(weight: Array, quantize: bool) -> Linear {
        if !quantize {
            return Linear { weight, bias: None, quant: None };
        }
        let (w, scales, biases) = ops::quantize(&weight, 32, 4).unwrap();
        Linear { weight: w, bias: None, quant: Some(Quantization { scales, biases: Some(biases), group_size: 32, bits: 4 }) }
    }

    #[test]
    fn sparse_moe_matches_token_by_token_reference() {
        let (h, inter, e, k) = (64, 32, 8, 3);
        for quantize in [false, true] {
            for (norm, t) in [(true, 5), (false, 40)] {
                // t * k = 120 >= 64 takes the sorted (prefill) path; 15 the unsorted one.
                let moe = SparseMoe {
                    gate: linear(randn(&[e, h], 1, 0.5), quantize),
                    gate_proj: linear(randn(&[e, inter, h], 2, 0.2), quantize),
                    up_proj: linear(randn(&[e, inter, h], 3, 0.2), quantize),
                    down_proj: linear(randn(&[e, h, inter], 4, 0.2), quantize),
                    top_k: k,
                    norm_topk_prob: norm,
                };
                let x = randn(&[t, h], 5, 1.0);
                let ours = host(&moe.forward(&x).unwrap());
                let want = reference(&host(&x), t as usize, h as usize, &moe, e as usize, inter as usize);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = ours.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                assert!(err < 1e-5, "quantized={quantize} t={t}: rel err {err}");
            }
        }
    }
}
