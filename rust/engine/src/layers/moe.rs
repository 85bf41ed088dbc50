//! Mixture-of-experts MLP: a router and stacked expert linears run with gathered matmuls.

use anyhow::{Context, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::config::ModelConfig;
use crate::layers::linear::Linear;
use crate::layers::mlp::Activation;
use crate::weights::{Bias, Weights};

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

/// The config's expert counts make a mixture: `num_experts >= num_experts_per_tok >= 1`.
pub fn check_expert_counts(config: &ModelConfig) -> Result<()> {
    let (e, k) = (config.num_experts.unwrap_or(0), config.num_experts_per_tok.unwrap_or(0));
    if e == 0 || k == 0 || k > e {
        anyhow::bail!("{} needs num_experts >= num_experts_per_tok >= 1, got {e} and {k}", config.architecture()?);
    }
    Ok(())
}

/// How a family's checkpoint names its experts and weighs them.
#[derive(Debug, Clone, Copy)]
pub struct MoeOptions {
    /// HF names of the expert projections `[gate, up, down]` under `{prefix}.experts.{e}`.
    pub expert_names: [&'static str; 3],
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
}

/// A mixture-of-experts MLP at `prefix`: router `{prefix}.gate`, experts stacked from
/// `{prefix}.experts.{e}.{name}` (HF) or read stacked from `{prefix}.switch_mlp.{gate,up,down}_proj`
/// (mlx-lm's layout).
pub fn sparse_moe(config: &ModelConfig, w: &mut Weights, prefix: &str, opts: MoeOptions) -> Result<SparseMoe> {
    let n = config.num_experts.context("num_experts")?;
    let [gate, up, down] = opts.expert_names;
    let mut experts = |name: &str, mlx: &str| w.experts(&format!("{prefix}.experts"), n, name, &format!("{prefix}.switch_mlp.{mlx}"));
    let gate_proj = experts(gate, "gate_proj")?;
    let up_proj = experts(up, "up_proj")?;
    let down_proj = experts(down, "down_proj")?;
    Ok(SparseMoe {
        gate: w.linear(&format!("{prefix}.gate"), Bias::Absent)?,
        gate_proj,
        up_proj,
        down_proj,
        top_k: config.num_experts_per_tok.context("num_experts_per_tok")? as i32,
        norm_topk_prob: opts.norm_topk_prob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::Quantization;
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
