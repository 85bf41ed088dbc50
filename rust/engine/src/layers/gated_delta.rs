//! Gated DeltaNet, the linear-attention layer of Qwen3-Next and Qwen3.5: a causal depthwise
//! convolution over the projected q/k/v, then the gated delta rule, a recurrence over a
//! `[key_dim, value_dim]` state per value head, read out by the queries; a gated RMSNorm and the
//! output projection. Each request carries its convolution window and its state from step to
//! step in the paged cache (`PagedKvCache::read_state` / `write_state`).
//!
//! Decode rows take one recurrent step together. A prefill chunk runs the chunked form: within
//! chunks of up to 64 tokens everything is matmuls (the unit-triangular system of the delta rule
//! is inverted by repeated squaring, exact because its strict part is nilpotent), and only the
//! chunks follow one another.

use anyhow::{ensure, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::batch::StepBatch;
use crate::kv_cache::{PagedKvCache, StateGeometry};
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;

/// Tokens per chunk of the chunked scan.
const CHUNK: i32 = 64;

pub struct GatedDeltaNet {
    /// The input projections, rows `[q, k, v, z, b, a]` (one matmul when they stack).
    pub in_proj: Vec<Linear>,
    /// `[K, conv_dim]`: the depthwise convolution, tap-major.
    pub conv_weight: Array,
    /// `[value heads]` float32: `dt_bias`, and `-exp(A_log)`.
    pub dt_bias: Array,
    pub neg_a: Array,
    /// RMSNorm over each head's output, gated by SiLU(z).
    pub norm: RmsNorm,
    pub out_proj: Linear,
    pub num_k_heads: i32,
    pub num_v_heads: i32,
    pub head_k_dim: i32,
    pub head_v_dim: i32,
    pub conv_kernel: i32,
    pub ssm_dtype: Dtype,
}

/// One sequence's (or decode row's) inputs to the delta rule, heads first: q, k `[H, N, Dk]`,
/// v `[H, N, Dv]`, g (log decay) and beta `[H, N]`, all float32.
struct Rule {
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
}

fn f32(v: f32) -> Array {
    Array::from_f32(v)
}

/// `x / sqrt(sum(x^2) + 1e-6)` over the last axis.
fn l2norm(x: &Array) -> Result<Array> {
    Ok(x.multiply(ops::rsqrt(x.square()?.sum_axis(-1, true)?.add(f32(1e-6))?)?)?)
}

impl GatedDeltaNet {
    pub fn geometry(&self) -> StateGeometry {
        let conv_dim = (2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim) as usize;
        StateGeometry {
            conv: [(self.conv_kernel - 1) as usize, conv_dim],
            ssm: [self.num_v_heads as usize, self.head_k_dim as usize, self.head_v_dim as usize],
            ssm_dtype: self.ssm_dtype,
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self.in_proj.iter().collect();
        v.push(&self.out_proj);
        v
    }

    pub fn arrays(&self) -> Vec<&Array> {
        vec![&self.conv_weight, &self.dt_bias, &self.neg_a, &self.norm.weight]
    }

    pub fn forward(&self, x: &Array, batch: &StepBatch, cache: &mut PagedKvCache, layer: usize) -> Result<Array> {
        let states = batch.states.as_ref().ok_or_else(|| anyhow::anyhow!("step has no linear-attention state plan"))?;
        let g = cache.layer_group[layer];
        let (Some(Some(read)), Some(Some(write))) = (states.read.get(g), states.write.get(g)) else {
            anyhow::bail!("KV-cache group {g} of linear-attention layer {layer} holds no states");
        };
        let geo = self.geometry();
        let t = x.shape()[0];
        let (hk, hv, dk, dv) = (self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim);
        let key_dim = hk * dk;
        let value_dim = hv * dv;
        let conv_dim = 2 * key_dim + value_dim;
        let proj = if self.in_proj.len() == 1 {
            self.in_proj[0].forward(x)?
        } else {
            let parts: Vec<Array> = self.in_proj.iter().map(|l| l.forward(x)).collect::<Result<_>>()?;
            ops::concatenate(&parts, -1)?
        };
        let p = ops::split_at_indices(&proj, &[conv_dim, conv_dim + value_dim, conv_dim + value_dim + hv], -1)?;
        let (mixed, z, b, a) = (&p[0], &p[1], &p[2], &p[3]);

        let (conv_state, ssm_state) = cache.read_state(layer, read, &geo)?;
        let mut outs = Vec::new();
        let mut new_conv = Vec::new();
        let mut new_ssm = Vec::new();
        let mut row = 0i32;
        let pick = |a: &Array, r: i32| -> Result<Array> { Ok(a.take_axis(&Array::from_slice(&[r], &[1]), 0)?) };
        if let (Some(tokens), Some(cont)) = (&states.decode_tokens, &states.decode_continues) {
            let r = tokens.shape()[0];
            let rows = Array::from_iter(0..r, &[r]);
            let keep = cont.gt(f32(0.5))?;
            let window = conv_state.take_axis(&rows, 0)?;
            let window = ops::select(&keep.reshape(&[r, 1, 1])?, &window, &ops::zeros_like(&window)?)?;
            let state = ssm_state.take_axis(&rows, 0)?.as_dtype(Dtype::Float32)?;
            let state = ops::select(&keep.reshape(&[r, 1, 1, 1])?, &state, &ops::zeros_like(&state)?)?;
            let xin = mixed.take_axis(tokens, 0)?.reshape(&[r, 1, conv_dim])?;
            let (conv_out, window) = self.conv(&window, &xin)?; // [r, 1, conv_dim]
            let rule = self.rule(&conv_out.reshape(&[r, conv_dim])?, &a.take_axis(tokens, 0)?, &b.take_axis(tokens, 0)?, true)?;
            let (o, s) = Self::recurrent_step(&rule, &state)?;
            outs.push(o); // [r, hv, dv]
            new_conv.push(window);
            new_ssm.push(s);
            row = r;
        }
        for pf in &states.prefills {
            let idx = Array::from_iter(pf.offset as i32..(pf.offset + pf.len) as i32, &[pf.len as i32]);
            let n = pf.len as i32;
            let (window, state) = if pf.continues {
                (pick(&conv_state, row)?, pick(&ssm_state, row)?.reshape(&[hv, dk, dv])?.as_dtype(Dtype::Float32)?)
            } else {
                (ops::zeros_dtype(&[1, self.conv_kernel - 1, conv_dim], mixed.dtype())?, ops::zeros::<f32>(&[hv, dk, dv])?)
            };
            let xin = mixed.take_axis(&idx, 0)?.reshape(&[1, n, conv_dim])?;
            let (conv_out, window) = self.conv(&window, &xin)?;
            let rule = self.rule(&conv_out.reshape(&[n, conv_dim])?, &a.take_axis(&idx, 0)?, &b.take_axis(&idx, 0)?, false)?;
            let (o, s) = Self::chunked(&rule, &state)?; // [n, hv, dv], [hv, dk, dv]
            outs.push(o);
            new_conv.push(window);
            new_ssm.push(s.expand_dims(0)?);
            row += 1;
        }
        let cat = |v: Vec<Array>| -> Result<Array> { Ok(if v.len() == 1 { v.into_iter().next().unwrap() } else { ops::concatenate(&v, 0)? }) };
        cache.write_state(layer, write, &cat(new_conv)?, &cat(new_ssm)?, &geo)?;
        let o = cat(outs)?.take_axis(&states.order, 0)?; // [T, hv, dv] float32
        let z = z.reshape(&[t, hv, dv])?;
        let normed = self.norm.forward(&o.as_dtype(x.dtype())?)?;
        let gated = normed.multiply(&ops::sigmoid(&z)?.multiply(&z)?)?;
        self.out_proj.forward(&gated.reshape(&[t, value_dim])?)
    }

    /// The causal depthwise convolution of `x` `[R, N, C]` after the window `[R, K-1, C]` of each
    /// row, with SiLU: `[R, N, C]`, and the new window (the last K-1 inputs).
    fn conv(&self, window: &Array, x: &Array) -> Result<(Array, Array)> {
        let k = self.conv_kernel;
        let n = x.shape()[1];
        let ext = ops::concatenate(&[window.as_dtype(x.dtype())?, x.clone()], 1)?;
        let mut acc: Option<Array> = None;
        for j in 0..k {
            let tap = ext.take_axis(&Array::from_iter(j..j + n, &[n]), 1)?.multiply(self.conv_weight.take_axis(&Array::from_slice(&[j], &[1]), 0)?)?;
            acc = Some(match acc {
                None => tap,
                Some(a) => a.add(tap)?,
            });
        }
        let y = acc.unwrap();
        let y = y.multiply(ops::sigmoid(&y)?)?;
        let window = ext.take_axis(&Array::from_iter(n..n + k - 1, &[k - 1]), 1)?;
        Ok((y, window))
    }

    /// The delta rule's inputs from the convolved q/k/v `[N, conv_dim]` and the a/b projections
    /// `[N, Hv]`: keys and queries L2-normed (queries also scaled by Dk^-0.5) and repeated to the
    /// value heads, decay `g = -exp(A_log) * softplus(a + dt_bias)`, `beta = sigmoid(b)`. Heads
    /// first unless `rows_first` (decode rows: `[R, H, D]`).
    fn rule(&self, qkv: &Array, a: &Array, b: &Array, rows_first: bool) -> Result<Rule> {
        let n = qkv.shape()[0];
        let (hk, hv, dk, dv) = (self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim);
        let qkv = qkv.as_dtype(Dtype::Float32)?;
        let p = ops::split_at_indices(&qkv, &[hk * dk, 2 * hk * dk], -1)?;
        let rep = hv / hk;
        let heads = |x: &Array| -> Result<Array> {
            // Value head h reads key head h / rep.
            let x = x.reshape(&[n, hk, 1, dk])?;
            Ok(ops::broadcast_to(&x, &[n, hk, rep, dk])?.reshape(&[n, hv, dk])?)
        };
        let q = l2norm(&heads(&p[0])?)?.multiply(f32((dk as f32).powf(-0.5)))?;
        let k = l2norm(&heads(&p[1])?)?;
        let v = p[2].reshape(&[n, hv, dv])?;
        let a = a.as_dtype(Dtype::Float32)?.add(&self.dt_bias)?;
        let softplus = ops::logaddexp(&a, f32(0.0))?;
        let g = softplus.multiply(&self.neg_a)?;
        let beta = ops::sigmoid(&b.as_dtype(Dtype::Float32)?)?;
        if rows_first {
            return Ok(Rule { q, k, v, g, beta });
        }
        let hf = |x: Array| -> Result<Array> { Ok(x.swap_axes(0, 1)?) };
        Ok(Rule { q: hf(q)?, k: hf(k)?, v: hf(v)?, g: hf(g)?, beta: hf(beta)? })
    }

    /// One token per row (`[R, H, D]` inputs) from states `[R, H, Dk, Dv]`: outputs `[R, H, Dv]`
    /// and the new states.
    fn recurrent_step(r: &Rule, state: &Array) -> Result<(Array, Array)> {
        let s = state.multiply(ops::exp(&r.g)?.expand_dims(-1)?.expand_dims(-1)?)?;
        let k_col = r.k.expand_dims(-1)?; // [R, H, Dk, 1]
        let kv_mem = s.multiply(&k_col)?.sum_axis(-2, false)?; // [R, H, Dv]
        let delta = r.v.subtract(&kv_mem)?.multiply(r.beta.expand_dims(-1)?)?;
        let s = s.add(k_col.multiply(delta.expand_dims(-2)?)?)?;
        let o = s.multiply(r.q.expand_dims(-1)?)?.sum_axis(-2, false)?;
        Ok((o, s))
    }

    /// The chunked scan of one sequence (`[H, N, D]` inputs) from state `[H, Dk, Dv]`: outputs
    /// `[N, H, Dv]` and the final state.
    fn chunked(r: &Rule, state: &Array) -> Result<(Array, Array)> {
        let sh = r.k.shape();
        let (h, n, dk) = (sh[0], sh[1], sh[2]);
        let dv = r.v.shape()[2];
        let c = CHUNK.min(n);
        let nc = (n + c - 1) / c;
        let pad = nc * c - n;
        let padded = |x: &Array| -> Result<Array> {
            if pad == 0 {
                return Ok(x.clone());
            }
            let mut shape = x.shape().to_vec();
            shape[1] = pad;
            Ok(ops::concatenate(&[x.clone(), ops::zeros::<f32>(&shape)?], 1)?)
        };
        // Padding: k = v = q = 0 and g = 0 leave the state as it was.
        let chunks = |x: &Array, d: i32| -> Result<Array> { Ok(padded(x)?.reshape(&[h, nc, c, d])?) };
        let (q, k, v) = (chunks(&r.q, dk)?, chunks(&r.k, dk)?, chunks(&r.v, dv)?);
        let beta = padded(&r.beta)?.reshape(&[h, nc, c, 1])?;
        let g = padded(&r.g)?.reshape(&[h, nc, c])?;
        let (kb, vb) = (k.multiply(&beta)?, v.multiply(&beta)?);
        let cum = ops::cumsum(&g, -1, None, None)?; // [h, nc, c]
        let lower = ops::tri::<bool>(c, None, None)?; // j <= i
        let diff = cum.expand_dims(-1)?.subtract(cum.expand_dims(-2)?)?;
        let zero = f32(0.0);
        let decay = ops::select(&lower, &ops::exp(&ops::select(&lower, &diff, &zero)?)?, &zero)?;
        let kt = k.swap_axes(-1, -2)?;
        // (I + tril(A, -1))^-1 = sum_i N^i with N = -tril(A, -1), N^c = 0: the product of
        // (I + N^(2^j)) over 2^j < c.
        let nil = ops::tril(&kb.matmul(&kt)?.multiply(&decay)?, -1)?.negative()?;
        let eye = ops::eye::<f32>(c, None, None)?;
        let mut inv = eye.add(&nil)?;
        let mut power = nil;
        let mut span = 2;
        while span < c {
            power = power.matmul(&power)?;
            inv = inv.matmul(&eye.add(&power)?)?;
            span *= 2;
        }
        let ecum = ops::exp(&cum)?.expand_dims(-1)?;
        let values = inv.matmul(&vb)?; // [h, nc, c, dv]
        let k_cumdecay = inv.matmul(&kb.multiply(&ecum)?)?; // [h, nc, c, dk]
        let intra = q.matmul(&kt)?.multiply(&decay)?; // [h, nc, c, c]
        let last = cum.take_axis(&Array::from_slice(&[c - 1], &[1]), -1)?; // [h, nc, 1]
        let qd = q.multiply(&ecum)?;
        let kd = k.multiply(ops::exp(&last.subtract(&cum)?)?.expand_dims(-1)?)?;
        let chunk_decay = ops::exp(&last)?.expand_dims(-1)?; // [h, nc, 1, 1]
        let mut s = state.clone();
        let mut outs = Vec::with_capacity(nc as usize);
        for i in 0..nc {
            let at = Array::from_slice(&[i], &[1]);
            let sel = |x: &Array| -> Result<Array> { Ok(x.take_axis(&at, 1)?.squeeze_axes(&[1])?) };
            let v_new = sel(&values)?.subtract(sel(&k_cumdecay)?.matmul(&s)?)?;
            outs.push(sel(&qd)?.matmul(&s)?.add(sel(&intra)?.matmul(&v_new)?)?);
            s = s.multiply(sel(&chunk_decay)?)?.add(sel(&kd)?.swap_axes(-1, -2)?.matmul(&v_new)?)?;
        }
        let o = if outs.len() == 1 { outs.pop().unwrap() } else { ops::concatenate(&outs, 1)? }; // [h, nc*c, dv]
        let o = o.take_axis(&Array::from_iter(0..n, &[n]), 1)?.swap_axes(0, 1)?;
        ensure!(o.shape() == [n, h, dv], "chunked scan produced {:?}", o.shape());
        Ok((o, s))
    }
}
