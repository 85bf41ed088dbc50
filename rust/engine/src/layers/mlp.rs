//! The gated MLP of a decoder block and its activations.

use anyhow::Result;
use mlx_rs::{error::Exception, ops, Array};

use crate::layers::linear::Linear;
use crate::mlx_ext::fuse::{fused, ArrayFn};

/// Activations of gated MLPs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// gpt-oss's experts: `(up + 1) * gate * sigmoid(alpha * gate)` with the gate clamped to at
    /// most `limit` and up to [-limit, limit].
    ClampedSwiglu { alpha: f32, limit: f32 },
    /// GELU, exact (erf; BERT's `gelu`).
    Gelu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" => Ok(Self::Silu),
            "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            other => anyhow::bail!("unsupported activation {other:?}: supported are silu, gelu_pytorch_tanh, gelu"),
        }
    }

    /// `act(gate) * up`, one kernel on GPUs.
    pub fn gated(self, gate: &Array, up: &Array) -> Result<Array> {
        let f: ArrayFn = match self {
            Self::Silu => |a| Activation::Silu.apply(&a[0])?.multiply(&a[1]),
            Self::GeluTanh => |a| Activation::GeluTanh.apply(&a[0])?.multiply(&a[1]),
            Self::ClampedSwiglu { alpha, limit } => {
                // alpha and limit travel as arguments: one compiled function for any values.
                let s = |v: f32| Array::from_f32(v).as_dtype(gate.dtype());
                let f: ArrayFn = |a| {
                    let (alpha, limit) = (&a[2], &a[3]);
                    let g = ops::minimum(&a[0], limit)?;
                    let u = ops::maximum(ops::minimum(&a[1], limit)?, limit.negative()?)?;
                    let glu = g.multiply(ops::sigmoid(g.multiply(alpha)?)?)?;
                    u.add(Array::from_f32(1.0).as_dtype(u.dtype())?)?.multiply(glu)
                };
                return fused(f, &[gate.clone(), up.clone(), s(alpha)?, s(limit)?]);
            }
            Self::Gelu => |a| Activation::Gelu.apply(&a[0])?.multiply(&a[1]),
        };
        fused(f, &[gate.clone(), up.clone()])
    }

    /// `act(x)`.
    pub fn forward(self, x: &Array) -> Result<Array> {
        Ok(self.apply(x)?)
    }

    fn apply(self, x: &Array) -> std::result::Result<Array, Exception> {
        Ok(match self {
            Self::ClampedSwiglu { .. } => unreachable!("gated only"),
            Self::Silu => x.multiply(ops::sigmoid(x)?)?,
            Self::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let c = (2.0f32 / std::f32::consts::PI).sqrt();
                let s = |v: f32| Array::from_f32(v).as_dtype(x.dtype());
                let inner = x.add(x.multiply(x)?.multiply(x)?.multiply(s(0.044715)?)?)?;
                let t = ops::tanh(&inner.multiply(s(c)?)?)?;
                x.multiply(s(0.5)?)?.multiply(t.add(s(1.0)?)?)?
            }
            Self::Gelu => {
                // 0.5 x (1 + erf(x / sqrt(2)))
                let s = |v: f32| Array::from_f32(v).as_dtype(x.dtype());
                let e = ops::erf(&x.multiply(s(std::f32::consts::FRAC_1_SQRT_2)?)?)?;
                x.multiply(s(0.5)?)?.multiply(e.add(s(1.0)?)?)?
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
