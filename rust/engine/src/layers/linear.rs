//! Linear layers: dense or MLX-quantized `x W^T (+ b)`, several stacked into one matmul, expert
//! linears stacked `[experts, out, in]` for gathered matmuls, and embedding rows.

use anyhow::{Context, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::mlx_ext::quant::{self, QuantMode};

/// MLX quantization of a weight matrix (`weight` packed into uint32 along the input dimension):
/// affine (float scales and biases) or MXFP4 (uint8 power-of-two scales, no biases).
#[derive(Clone)]
pub struct Quantization {
    pub scales: Array,
    pub biases: Option<Array>,
    pub group_size: i32,
    pub bits: i32,
    pub mode: QuantMode,
    /// The compute dtype the weight dequantizes to (affine scales and biases are in it already).
    pub dtype: Dtype,
}

impl Quantization {
    /// The weight of packed `w` with these scales and biases (or those of some rows of it).
    pub fn dequantize(&self, w: &Array, scales: &Array, biases: Option<&Array>) -> Result<Array> {
        Ok(match self.mode {
            QuantMode::Affine => ops::dequantize(w, scales, biases, self.group_size, self.bits)?.as_dtype(self.dtype)?,
            mode => quant::dequantize(w, scales, biases, self.group_size, self.bits, mode, self.dtype)?,
        })
    }
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
            Some(q) if q.mode != QuantMode::Affine => {
                quant::quantized_matmul(x, &self.weight, &q.scales, q.biases.as_ref(), q.group_size, q.bits, q.mode)?
            }
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

    /// Expert linears stacked in one `[experts, out, in]` weight (biases `[experts, out]`): `x`
    /// `[T, 1, 1, in]` times the experts `idx` `[T, k]` chose, `[T, k, 1, out]`. One gather_mm /
    /// gather_qmm for the whole batch.
    pub fn forward_experts(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array> {
        let y = match &self.quant {
            None => ops::gather_mm(x, self.weight.swap_axes(-1, -2)?, None, idx, sorted)?,
            Some(q) if q.mode != QuantMode::Affine => {
                quant::gather_qmm(x, &self.weight, &q.scales, q.biases.as_ref(), idx, q.group_size, q.bits, q.mode, sorted)?
            }
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
        };
        Ok(match &self.bias {
            Some(b) => y.add(b.take_axis(idx, 0)?.expand_dims(-2)?)?,
            None => y,
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
                    (Some(p), Some(q)) => {
                        p.group_size == q.group_size && p.bits == q.bits && p.mode == q.mode && p.biases.is_some() == q.biases.is_some()
                    }
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
                    mode: q.mode,
                    dtype: q.dtype,
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
                q.dequantize(&w, &s, b.as_ref())
            }
        }
    }

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
    /// The linear producing only the outputs `rows` (`[n]` indices), in that order.
    pub fn take_rows(&self, rows: &Array) -> Result<Linear> {
        let quant = match &self.quant {
            None => None,
            Some(q) => Some(Quantization {
                scales: q.scales.take_axis(rows, 0)?,
                biases: q.biases.as_ref().map(|b| b.take_axis(rows, 0)).transpose()?,
                ..q.clone()
            }),
        };
        Ok(Linear {
            weight: self.weight.take_axis(rows, 0)?,
            bias: self.bias.as_ref().map(|b| b.take_axis(rows, 0)).transpose()?,
            quant,
        })
    }

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
