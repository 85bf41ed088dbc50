//! Mixture-of-experts MLP: a router and stacked expert linears run with gathered matmuls.

use anyhow::{ensure, Context, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::config::ModelConfig;
use crate::layers::linear::Linear;
use crate::layers::mlp::{Activation, Mlp};
use crate::weights::{Bias, Weights};

/// Mixture of experts (Mixtral, Qwen3-MoE, GLM-4.5, gpt-oss): a router picks `top_k` experts per
/// token, each a gated MLP; experts are stacked `[experts, out, in]` and run with gathered matmuls,
/// no loop. GLM-4.5 adds a dense MLP every token runs (`shared_experts`); gpt-oss's router and
/// experts have biases and its experts their own activation.
pub struct SparseMoe {
    pub gate: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub top_k: i32,
    pub routing: Routing,
    /// The experts' gated activation.
    pub act: Activation,
    pub shared_experts: Option<Mlp>,
    /// Qwen3-Next / Qwen3.5: the shared expert's output is scaled by sigmoid of this `[1, hidden]`
    /// linear of the token.
    pub shared_expert_gate: Option<Linear>,
}

/// How the router's logits choose and weigh the experts.
pub enum Routing {
    /// Softmax over all experts, the top k, renormalised to sum to one with `norm_topk_prob`
    /// (Mixtral always; Qwen3-MoE by config).
    Softmax { norm_topk_prob: bool },
    /// Sigmoid scores (GLM-4.5).
    Sigmoid(SigmoidRouting),
    /// The top k logits, softmax over those alone (gpt-oss).
    TopKSoftmax,
}

/// GLM-4.5's routing: experts are chosen by sigmoid score plus `e_score_correction_bias`, among
/// the `topk_group` of `n_group` equal groups whose two best such scores sum highest; they are
/// weighed by their sigmoid score alone (renormalised with `norm_topk_prob`), times
/// `routed_scaling_factor`.
pub struct SigmoidRouting {
    /// `[experts]`, float32.
    pub e_score_correction_bias: Array,
    pub n_group: i32,
    pub topk_group: i32,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Indices `[T, k]` of the k largest entries along the last axis (in no particular order).
fn top_k_indices(x: &Array, k: i32) -> Result<Array> {
    let n = x.shape()[x.ndim() - 1];
    let last_k = Array::from_iter(n - k..n, &[k]);
    Ok(ops::argpartition_axis(x, n - k, -1)?.take_axis(&last_k, -1)?)
}

impl SigmoidRouting {
    /// `logits` `[T, E]` float32: the chosen experts `[T, k]` and their float32 weights.
    fn route(&self, logits: &Array, k: i32) -> Result<(Array, Array)> {
        let (t, e) = (logits.shape()[0], logits.shape()[1]);
        let scores = ops::sigmoid(logits)?;
        let mut choice = scores.add(&self.e_score_correction_bias)?;
        if self.n_group > 1 {
            let (g, per) = (self.n_group, e / self.n_group);
            let grouped = choice.reshape(&[t, g, per])?;
            // A group's score: the sum of its two best experts.
            let best2 = Array::from_iter(per - 2..per, &[2]);
            let group_scores = ops::sort_axis(&grouped, -1)?.take_axis(&best2, -1)?.sum_axis(-1, false)?;
            // Exactly topk_group groups: those ranked last topk_group in ascending order.
            let rank = ops::argsort_axis(&ops::argsort_axis(&group_scores, -1)?, -1)?;
            let keep = rank.ge(Array::from_int(g - self.topk_group))?.reshape(&[t, g, 1])?;
            let masked = ops::select(&keep, &grouped, Array::from_f32(f32::NEG_INFINITY))?;
            choice = masked.reshape(&[t, e])?;
        }
        let idx = top_k_indices(&choice, k)?;
        let mut w = scores.take_along_axis(&idx, -1)?;
        if self.norm_topk_prob {
            w = w.divide(w.sum_axis(-1, true)?.add(Array::from_f32(1e-20))?)?;
        }
        if self.routed_scaling_factor != 1.0 {
            w = w.multiply(Array::from_f32(self.routed_scaling_factor))?;
        }
        Ok((idx, w))
    }
}

impl SparseMoe {
    /// The experts of each token `[T, k]` and their weights `[T, k]` (float32).
    pub fn route(&self, x: &Array) -> Result<(Array, Array)> {
        // A dense router runs in its weight's dtype (GLM-4.5's is float32, as in transformers).
        let x = match &self.gate.quant {
            None if self.gate.weight.dtype() != x.dtype() => x.as_dtype(self.gate.weight.dtype())?,
            _ => x.clone(),
        };
        let logits = self.gate.forward(&x)?.as_dtype(Dtype::Float32)?;
        let k = self.top_k;
        match &self.routing {
            Routing::Softmax { norm_topk_prob } => {
                let probs = ops::softmax_axis(&logits, -1, None)?;
                let idx = top_k_indices(&probs, k)?;
                let mut w = probs.take_along_axis(&idx, -1)?;
                if *norm_topk_prob {
                    w = w.divide(w.sum_axis(-1, true)?)?;
                }
                Ok((idx, w))
            }
            Routing::Sigmoid(r) => r.route(&logits, k),
            Routing::TopKSoftmax => {
                let idx = top_k_indices(&logits, k)?;
                Ok((idx.clone(), ops::softmax_axis(&logits.take_along_axis(&idx, -1)?, -1, None)?))
            }
        }
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        let (idx, w) = self.route(x)?;
        let y = self.experts(x, &idx, &w)?;
        let Some(shared) = &self.shared_experts else { return Ok(y) };
        let mut s = shared.forward(x)?;
        if let Some(gate) = &self.shared_expert_gate {
            s = s.multiply(ops::sigmoid(&gate.forward(x)?)?)?;
        }
        Ok(y.add(s)?)
    }

    /// The routed experts alone: `x` `[T, hidden]` through the experts `idx` `[T, k]`, summed
    /// with weights `w` `[T, k]` (Gemma 4 routes from another input than the experts see).
    pub fn experts(&self, x: &Array, idx: &Array, w: &Array) -> Result<Array> {
        let t = x.shape()[0];
        let hidden = x.shape()[1];
        let k = self.top_k;
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
        let h = self.act.gated(&g, &u)?;
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

    /// The routing's own weight beyond the router (GLM-4.5's `e_score_correction_bias`).
    pub fn routing_bias(&self) -> Option<&Array> {
        match &self.routing {
            Routing::Sigmoid(r) => Some(&r.e_score_correction_bias),
            _ => None,
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.gate, &self.gate_proj, &self.up_proj, &self.down_proj];
        if let Some(shared) = &self.shared_experts {
            v.extend(shared.linears());
        }
        v.extend(self.shared_expert_gate.as_ref());
        v
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

/// The config's expert groups (GLM-4.5): `n_group` equal groups of at least two experts (a group
/// scores by its two best), `topk_group` of them kept, holding at least `num_experts_per_tok`.
pub fn check_expert_groups(config: &ModelConfig) -> Result<()> {
    let (e, k) = (config.num_experts.unwrap_or(0), config.num_experts_per_tok.unwrap_or(0));
    let (g, kg) = (config.n_group.unwrap_or(1), config.topk_group.unwrap_or(1));
    ensure!(g >= 1 && kg >= 1 && kg <= g, "topk_group {kg} must be between 1 and n_group {g}");
    ensure!(e % g == 0 && e / g >= 2, "{e} experts do not split into {g} groups of two or more");
    ensure!(kg * (e / g) >= k, "{kg} groups of {} experts cannot hold num_experts_per_tok {k}", e / g);
    Ok(())
}

/// How a family's checkpoint names its experts and routes to them.
pub struct MoeOptions {
    /// HF names of the expert projections `[gate, up, down]` under `{prefix}.experts.{e}`.
    pub expert_names: [&'static str; 3],
    pub routing: Routing,
    /// A gated SiLU MLP every token runs beside the routed experts.
    pub shared: SharedExpert,
}

/// The mixture's always-on expert, as the checkpoint names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedExpert {
    Absent,
    /// `{prefix}.shared_experts.{gate,up,down}_proj` (GLM-4.5).
    Plain,
    /// `{prefix}.shared_expert.{gate,up,down}_proj` scaled by sigmoid(`{prefix}.shared_expert_gate`)
    /// (Qwen3-Next, Qwen3.5-MoE).
    Gated,
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
    let shared_name = match opts.shared {
        SharedExpert::Absent => None,
        SharedExpert::Plain => Some("shared_experts"),
        SharedExpert::Gated => Some("shared_expert"),
    };
    let shared_experts = if let Some(name) = shared_name {
        let p = format!("{prefix}.{name}");
        Some(Mlp::new(
            w.linear(&format!("{p}.gate_proj"), Bias::Absent)?,
            w.linear(&format!("{p}.up_proj"), Bias::Absent)?,
            w.linear(&format!("{p}.down_proj"), Bias::Absent)?,
            Activation::Silu,
        )?)
    } else {
        None
    };
    Ok(SparseMoe {
        gate: w.linear(&format!("{prefix}.gate"), Bias::Absent)?,
        gate_proj,
        up_proj,
        down_proj,
        top_k: config.num_experts_per_tok.context("num_experts_per_tok")? as i32,
        routing: opts.routing,
        act: Activation::Silu,
        shared_experts,
        shared_expert_gate: match opts.shared {
            SharedExpert::Gated => Some(w.linear(&format!("{prefix}.shared_expert_gate"), Bias::Absent)?),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::Quantization;
    use crate::mlx_ext::quant::QuantMode;
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
            let Routing::Softmax { norm_topk_prob } = moe.routing else { unreachable!() };
            let norm: f32 = if norm_topk_prob { top.iter().map(|&i| probs[i]).sum() } else { 1.0 };
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
        Linear { weight: w, bias: None, quant: Some(Quantization { scales, biases: Some(biases), group_size: 32, bits: 4, mode: QuantMode::Affine, dtype: Dtype::Float32 }) }
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
                    routing: Routing::Softmax { norm_topk_prob: norm },
                    act: Activation::Silu,
                    shared_experts: None,
                    shared_expert_gate: None,
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
