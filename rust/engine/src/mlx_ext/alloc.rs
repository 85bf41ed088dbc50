//! Zero-filled arrays without writing the zeros, where the backend allows.
//!
//! MLX's `zeros` writes every byte: seconds per GiB on a small CPU machine, for a KV cache whose
//! pages are mostly not used yet. On MLX's CPU allocator (Linux) the engine drops the buffer's
//! pages instead (mlx-sys `host_zeros.cpp`), and the kernel maps zero pages on first touch: the
//! cache costs nothing until written, and unwritten slots read as real zeros, so padded attention
//! reads (masked out, but multiplied by a zero weight) never meet NaN or Inf. GPU allocators
//! fill on the device at memory bandwidth and keep `zeros`.

use anyhow::{bail, ensure, Result};
use mlx_rs::{ops, transforms::eval, Array, Device, DeviceType, Dtype};

/// A materialized array of zeros on MLX's default device (the engine's, once selected).
pub fn zeros(shape: &[i32], dtype: Dtype) -> Result<Array> {
    ensure!(shape.iter().all(|&d| d >= 0), "negative dimension in {shape:?}");
    if matches!(Device::try_default()?.get_type()?, DeviceType::Cpu) {
        let mut raw = unsafe { mlx_sys::mlx_array_new() };
        let status = unsafe { mlx_sys::mlx_sys_host_zeros(&mut raw, shape.as_ptr(), shape.len() as i32, dtype as u32 as _) };
        match status {
            0 => return Ok(unsafe { Array::from_ptr(raw) }),
            1 => unsafe {
                mlx_sys::mlx_array_free(raw);
            },
            _ => {
                unsafe { mlx_sys::mlx_array_free(raw) };
                bail!("cannot map host memory for an array of {shape:?} {dtype:?}");
            }
        }
    }
    let a = ops::zeros_dtype(shape, dtype)?;
    eval([&a])?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::indexing::scatter_single;

    fn on_cpu() {
        Device::set_default(&Device::cpu());
    }

    #[test]
    fn host_zeros_read_as_zeros_and_take_writes_in_place() {
        on_cpu();
        for dtype in [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16] {
            // A freed buffer of the same size goes to MLX's cache and may come back here: its
            // NaNs must not show through.
            let nans = ops::full::<f32>(&[1024, 3, 2], Array::from_f32(f32::NAN)).unwrap().as_dtype(dtype).unwrap();
            eval([&nans]).unwrap();
            drop(nans);
            let a = zeros(&[1024, 3, 2], dtype).unwrap();
            assert_eq!((a.shape(), a.dtype()), (&[1024, 3, 2][..], dtype));
            assert_eq!(a.abs().unwrap().sum(None).unwrap().as_dtype(Dtype::Float32).unwrap().item_exact::<f32>(), 0.0);
            let upd = Array::from_slice(&[1.5f32; 12], &[2, 1, 3, 2]).as_dtype(dtype).unwrap();
            let slots = Array::from_slice(&[2i32, 700], &[2]);
            let b = scatter_single(&a, &slots, &upd, 0).unwrap();
            drop(a);
            let total = b.as_dtype(Dtype::Float32).unwrap().sum(None).unwrap().item_exact::<f32>();
            assert_eq!(total, 18.0);
            let row = b.take_axis(&Array::from_slice(&[700i32], &[1]), 0).unwrap();
            assert_eq!(row.as_dtype(Dtype::Float32).unwrap().sum(None).unwrap().item_exact::<f32>(), 9.0);
        }
    }

    /// A large cache is mapped, not written: allocating 4 GiB takes far less than writing it.
    #[test]
    fn large_host_zeros_cost_no_writes() {
        on_cpu();
        let shape = [1 << 20, 8, 128]; // 4 GiB of float32
        let t = std::time::Instant::now();
        let mut a = zeros(&shape, Dtype::Float32).unwrap();
        let alloc = t.elapsed();
        // Writes are scatters that donate the buffer: O(rows written), not O(cache).
        let upd = Array::from_slice(&vec![1.0f32; 4 * 8 * 128], &[4, 1, 8, 128]);
        let slots = Array::from_slice(&[5i32, 6, 1 << 19, (1 << 20) - 1], &[4]);
        let t = std::time::Instant::now();
        for _ in 0..4 {
            a = scatter_single(&a, &slots, &upd, 0).unwrap();
            eval([&a]).unwrap();
        }
        let writes = t.elapsed();
        assert!(alloc.as_secs_f64() < 0.2, "4 GiB of zeros took {alloc:?}");
        assert!(writes.as_secs_f64() < 0.2, "4 small writes into 4 GiB took {writes:?}");
    }
}
