//! MLX dtypes by name (config.json, options) and size.

use anyhow::Result;
use mlx_rs::Dtype;

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

/// The dtype the engine computes in on `device`: float32 on the CPU (MLX's CPU backend has a
/// fast BLAS matmul for float32 only), else the requested or checkpoint dtype (float16 without).
pub fn compute_dtype(device: crate::mlx_ext::device::DeviceKind, requested: Option<&str>, checkpoint: Option<&str>) -> Result<Dtype> {
    use crate::mlx_ext::device::DeviceKind;
    Ok(match device {
        DeviceKind::Cpu => {
            if let Some(d) = requested {
                if parse_dtype(d)? != Dtype::Float32 {
                    log::info!("dtype {d} requested; the CPU backend computes in float32");
                }
            }
            Dtype::Float32
        }
        DeviceKind::Gpu => match requested.or(checkpoint) {
            Some(d) => parse_dtype(d)?,
            None => Dtype::Float16,
        },
    })
}
