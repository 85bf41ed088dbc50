//! MLX's quantized ops in a mode other than affine (mlx-rs passes "affine" always): MXFP4, 4-bit
//! E2M1 values with one power-of-two scale (uint8, E8M0) per 32 and no biases, as mlx-lm writes
//! gpt-oss's experts. Affine quantization stays on mlx-rs.

use std::ffi::CStr;

use anyhow::Result;
use mlx_rs::{Array, Dtype, Stream};

/// How a quantized weight encodes its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// `scale * q + bias` per group (float scales and biases).
    Affine,
    /// MXFP4: E2M1 values times a power-of-two scale (uint8) per group of 32; no biases.
    Mxfp4,
}

impl QuantMode {
    fn name(self) -> &'static CStr {
        match self {
            Self::Affine => c"affine",
            Self::Mxfp4 => c"mxfp4",
        }
    }
}

fn int(v: i32) -> mlx_sys::mlx_optional_int {
    mlx_sys::mlx_optional_int { value: v, has_value: true }
}

fn none() -> mlx_sys::mlx_array {
    unsafe { mlx_sys::mlx_array_new() }
}

/// The array an mlx-c op wrote into `res`, or an error naming the op.
unsafe fn result(status: i32, res: mlx_sys::mlx_array, what: &str, mode: QuantMode) -> Result<Array> {
    if status != 0 {
        mlx_sys::mlx_array_free(res);
        anyhow::bail!("MLX {what} failed (quantization mode {mode:?})");
    }
    Ok(Array::from_ptr(res))
}

/// `x W^T` (`transpose`) of a packed `w`.
pub fn quantized_matmul(x: &Array, w: &Array, scales: &Array, biases: Option<&Array>, group_size: i32, bits: i32, mode: QuantMode) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let b = biases.map_or_else(none, |b| b.as_ptr());
        let status = mlx_sys::mlx_quantized_matmul(
            &mut res, x.as_ptr(), w.as_ptr(), scales.as_ptr(), b, true, int(group_size), int(bits), mode.name().as_ptr(), stream.as_ptr(),
        );
        if biases.is_none() {
            mlx_sys::mlx_array_free(b);
        }
        result(status, res, "quantized_matmul", mode)
    }
}

/// `x` times the experts `rhs_indices` picks of a stacked packed `w` (transposed).
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: Option<&Array>,
    rhs_indices: &Array,
    group_size: i32,
    bits: i32,
    mode: QuantMode,
    sorted: bool,
) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let (b, lhs) = (biases.map_or_else(none, |b| b.as_ptr()), none());
        let status = mlx_sys::mlx_gather_qmm(
            &mut res,
            x.as_ptr(),
            w.as_ptr(),
            scales.as_ptr(),
            b,
            lhs,
            rhs_indices.as_ptr(),
            true,
            int(group_size),
            int(bits),
            mode.name().as_ptr(),
            sorted,
            stream.as_ptr(),
        );
        mlx_sys::mlx_array_free(lhs);
        if biases.is_none() {
            mlx_sys::mlx_array_free(b);
        }
        result(status, res, "gather_qmm", mode)
    }
}

/// The weight of a packed `w`, in `dtype`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize(w: &Array, scales: &Array, biases: Option<&Array>, group_size: i32, bits: i32, mode: QuantMode, dtype: Dtype) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let (b, global_scale) = (biases.map_or_else(none, |b| b.as_ptr()), none());
        let dtype = mlx_sys::mlx_optional_dtype { value: dtype.into(), has_value: true };
        let status = mlx_sys::mlx_dequantize(
            &mut res, w.as_ptr(), scales.as_ptr(), b, int(group_size), int(bits), mode.name().as_ptr(), global_scale, dtype, stream.as_ptr(),
        );
        mlx_sys::mlx_array_free(global_scale);
        if biases.is_none() {
            mlx_sys::mlx_array_free(b);
        }
        result(status, res, "dequantize", mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// E2M1 magnitudes of the low three bits of an MXFP4 code (the fourth is the sign).
    const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

    /// `[rows, cols]` random codes packed 8 to a uint32 (first in the low bits), one scale exponent
    /// per 32, and the values they mean, decoded on the host.
    fn mxfp4(rows: usize, cols: usize, seed: u32) -> (Array, Array, Vec<f32>) {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(12345);
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let codes: Vec<u32> = (0..rows * cols).map(|_| next() % 16).collect();
        let exps: Vec<u8> = (0..rows * cols / 32).map(|_| 122 + (next() % 8) as u8).collect();
        let words: Vec<u32> =
            codes.chunks(8).map(|c| c.iter().enumerate().fold(0, |w, (t, &v)| w | (v << (4 * t)))).collect();
        let values = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let sign = if c & 8 != 0 { -1.0 } else { 1.0 };
                sign * E2M1[(c & 7) as usize] * 2f32.powi(exps[i / 32] as i32 - 127)
            })
            .collect();
        let w = Array::from_slice(&words, &[rows as i32, (cols / 8) as i32]);
        let s = Array::from_slice(&exps, &[rows as i32, (cols / 32) as i32]);
        (w, s, values)
    }

    fn host(a: &Array) -> Vec<f32> {
        let a = a.as_dtype(Dtype::Float32).unwrap();
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn mxfp4_dequantize_matmul_and_gathered_experts_agree_with_the_codes() {
        let (rows, cols) = (8, 64);
        let (w, s, values) = mxfp4(rows, cols, 1);
        let deq = dequantize(&w, &s, None, 32, 4, QuantMode::Mxfp4, Dtype::Float32).unwrap();
        assert_eq!(host(&deq), values);

        let x = mlx_rs::random::normal::<f32>(&[3, cols as i32], None, None, &mlx_rs::random::key(2).unwrap()).unwrap();
        let ours = quantized_matmul(&x, &w, &s, None, 32, 4, QuantMode::Mxfp4).unwrap();
        let want = x.matmul(deq.t()).unwrap();
        assert!(max_diff(&host(&ours), &host(&want)) < 1e-4);

        // Two experts stacked; each of 3 tokens picks both, in some order.
        let (w2, s2, _) = mxfp4(rows, cols, 3);
        let stacked = |a: &Array, b: &Array| mlx_rs::ops::stack(&[a, b], 0).unwrap();
        let (ws, ss) = (stacked(&w, &w2), stacked(&s, &s2));
        let deq2 = dequantize(&w2, &s2, None, 32, 4, QuantMode::Mxfp4, Dtype::Float32).unwrap();
        let idx = Array::from_slice(&[0u32, 1, 1, 0, 0, 1], &[3, 2]);
        let xe = x.reshape(&[3, 1, 1, cols as i32]).unwrap();
        let y = gather_qmm(&xe, &ws, &ss, None, &idx, 32, 4, QuantMode::Mxfp4, false).unwrap();
        let y = host(&y.reshape(&[3, 2, rows as i32]).unwrap());
        let per = [host(&x.matmul(deq.t()).unwrap()), host(&x.matmul(deq2.t()).unwrap())];
        for (t, pick) in [[0, 1], [1, 0], [0, 1]].iter().enumerate() {
            for (j, &e) in pick.iter().enumerate() {
                let got = &y[(t * 2 + j) * rows..(t * 2 + j + 1) * rows];
                assert!(max_diff(got, &per[e][t * rows..(t + 1) * rows]) < 1e-4, "token {t} expert {e}");
            }
        }
    }
}
