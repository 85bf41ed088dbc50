//! The page-reading decode kernel on MLX's CUDA backend (`kernels/paged_decode.cu`, one CTA per
//! KV head and request, serving its GQA group; windows and soft caps inside): where it runs, its
//! launch shape, and the launch.

use anyhow::Result;
use mlx_rs::{Array, Dtype};

use crate::batch::Pages;
use crate::kv_cache::PagedKvCache;
use crate::mlx_ext::custom_kernel::{CudaKernel, Output, TemplateArg};

/// Whether `paged_decode` runs on this process's MLX for a cache of this shape.
pub fn available(head_dim: usize, dtype: Dtype) -> bool {
    crate::mlx_ext::device::backend() == "cuda"
        && matches!(mlx_rs::Device::default().get_type(), Ok(mlx_rs::DeviceType::Gpu))
        && head_dim % 32 == 0
        && head_dim <= 256
        && matches!(dtype, Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16)
}

thread_local! {
    static PAGED_DECODE: std::cell::OnceCell<Result<CudaKernel, String>> = const { std::cell::OnceCell::new() };
}

/// Warps per CTA and keys per warp per round for `gqa` query heads per KV head, `n` = head_dim / 32
/// values per lane, up to `max_len` keys: as many warps as the keys keep busy, within the
/// registers of one SM (the per-thread estimate errs high) and 32 KiB of partial outputs; fewer
/// keys in flight per warp when each lane already holds many values.
fn decode_launch(gqa: i32, n: i32, max_len: i32) -> (i32, i32) {
    let u = match gqa * n {
        0..=8 => 4,
        9..=32 => 2,
        _ => 1,
    };
    let registers = 2 * gqa * n + 2 * u * n + 2 * gqa * u + 40;
    let floor_pow2 = |x: i32| if x < 1 { 1 } else { 1 << (31 - x.leading_zeros()) };
    let want = ((max_len + 2 * u - 1) / (2 * u)).max(1) as u32;
    let cap = floor_pow2(65536 / (32 * registers)).min(floor_pow2(8192 / (gqa * n * 32))).min(16);
    ((want.next_power_of_two() as i32).min(cap), u)
}

/// Decode attention (one query per request) reading K/V from the pages in place: MLX's CUDA
/// custom kernel `kernels/paged_decode.cu`. `q` `[R, H, D]`; returns `[R, H, D]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn paged_decode(
    q: &Array,
    cache: &PagedKvCache,
    layer: usize,
    pages: &Pages,
    seq_lens: &Array,
    scale: f32,
    window: Option<usize>,
    cap: Option<f32>,
) -> Result<Array> {
    let (r, heads, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let kv_heads = cache.kv_heads(layer) as i32;
    let block_size = cache.block_size(layer) as i32;
    let (k_slots, v_slots) = cache.slots(layer)?;
    let q = q.as_dtype(cache.dtype)?;
    let table = pages.block_table.reshape(&[r, pages.max_pages])?;
    anyhow::ensure!(heads % kv_heads == 0, "{heads} query heads do not share {kv_heads} KV heads evenly");
    let (gqa, n) = (heads / kv_heads, d / 32);
    let max_len = pages.max_pages * block_size;
    let (warps, keys_per_round) = decode_launch(gqa, n, max_len);
    let window = match window {
        Some(w) => i32::try_from(w).unwrap_or(i32::MAX),
        None => 0,
    };
    let template = [
        ("T", TemplateArg::Dtype(cache.dtype)),
        ("D", TemplateArg::Int(d)),
        ("KV_HEADS", TemplateArg::Int(kv_heads)),
        ("GQA", TemplateArg::Int(gqa)),
        ("BLOCK", TemplateArg::Int(block_size)),
        ("WARPS", TemplateArg::Int(warps)),
        ("U", TemplateArg::Int(keys_per_round)),
        ("WINDOW", TemplateArg::Int(window)),
        ("SCALE_BITS", TemplateArg::Int(scale.to_bits() as i32)),
        ("CAP_BITS", TemplateArg::Int(cap.map_or(0, |c| c.to_bits() as i32))),
    ];
    PAGED_DECODE.with(|cell| {
        let kernel = cell
            .get_or_init(|| {
                CudaKernel::new(
                    "paged_decode",
                    &["q", "k_cache", "v_cache", "block_table", "seq_lens"],
                    &["out"],
                    include_str!("../kernels/paged_decode.cu"),
                    include_str!("../kernels/paged_decode.cuh"),
                )
                .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("paged decode kernel: {e}"))?;
        let inputs = [&q, &k_slots, &v_slots, &table, seq_lens];
        let out_shape = [r, heads, d];
        // SAFETY: one CTA per (KV head, request); it reads the rows of `q`, `table` and `seq_lens`
        // at its own indices, cache rows at the slots of its table's pages (vLLM's block ids, all
        // < num_blocks) below `seq_lens`, which the batch builder checked against the tables, and
        // writes the `GQA * D` outputs of its query heads.
        let mut o = unsafe {
            kernel.apply(
                &inputs,
                &[Output { shape: &out_shape, dtype: cache.dtype }],
                (kv_heads * warps * 32, r, 1),
                (warps * 32, 1, 1),
                &template,
            )?
        };
        Ok(o.remove(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlx_ext::device::{self, DeviceKind};
    use mlx_rs::random;
    use crate::kv_cache::KvShape;

    fn host(a: &Array) -> Vec<f32> {
        let a = a.as_dtype(Dtype::Float32).unwrap();
        a.eval().expect("evaluating");
        a.as_slice::<f32>().to_vec()
    }

    /// The kernel against attention computed on the host, in f64, from the same (rounded) inputs:
    /// shuffled block tables, lengths around page edges, GQA, sliding windows, soft-capping.
    #[test]
    #[ignore = "needs MLX's CUDA backend (run on the GPU with --ignored)"]
    fn paged_decode_matches_host_attention() {
        device::select(Some(DeviceKind::Gpu)).unwrap();
        // GPU streams belong to the thread that made them; the test runs on its own thread.
        let stream = mlx_rs::Stream::new_with_device(&mlx_rs::Device::gpu());
        mlx_rs::with_stream(&stream, paged_decode_cases);
    }

    fn paged_decode_cases() {
        let num_blocks = 160usize;
        let lens = [1usize, 7, 16, 17, 100, 250, 1030];
        // (dtype, head_dim, block size, query heads, KV heads, window, soft cap, tolerance)
        let cases = [
            (Dtype::Float32, 64usize, 16usize, 8i32, 2usize, None, None, 1e-4f64),
            (Dtype::Bfloat16, 64, 16, 32, 8, None, None, 2e-2),
            (Dtype::Float16, 128, 16, 8, 2, Some(40usize), None, 5e-3),
            (Dtype::Bfloat16, 256, 32, 8, 4, Some(64), Some(30.0f32), 2e-2),
            (Dtype::Float32, 96, 8, 8, 8, None, Some(5.0), 1e-4),
            (Dtype::Bfloat16, 128, 16, 16, 2, None, None, 2e-2),
        ];
        for (case, &(dtype, d, bs, heads, kv_heads, window, cap, tol)) in cases.iter().enumerate() {
            assert!(available(d, dtype), "kernel unavailable for case {case}");
            let nb = num_blocks.max(lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 1);
            let mut cache = PagedKvCache::new(vec![KvShape { kv_heads, head_dim: d }], nb, bs, dtype).unwrap();
            let shape = [(nb * bs) as i32, kv_heads as i32, d as i32];
            let key = |s: u64| random::key(s + 10 * case as u64).unwrap();
            cache.keys[0] = random::normal::<f32>(&shape, None, None, &key(1)).unwrap().as_dtype(dtype).unwrap();
            cache.values[0] = random::normal::<f32>(&shape, None, None, &key(2)).unwrap().as_dtype(dtype).unwrap();
            let r = lens.len();
            let q = random::normal::<f32>(&[r as i32, heads, d as i32], None, None, &key(3)).unwrap().as_dtype(dtype).unwrap();
            // Distinct blocks 1.. handed out in a scrambled order; tables padded with block 0.
            let mut free: Vec<i32> = (1..nb as i32).collect();
            let mut x = 12345u64 + case as u64;
            for i in (1..free.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                free.swap(i, (x >> 33) as usize % (i + 1));
            }
            let pages_max = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap();
            let mut tables = vec![vec![0i32; pages_max]; r];
            for (i, &len) in lens.iter().enumerate() {
                for p in 0..len.div_ceil(bs) {
                    tables[i][p] = free.pop().unwrap();
                }
            }
            let flat: Vec<i32> = tables.concat();
            let pages = Pages {
                max_pages: pages_max as i32,
                block_table: Array::from_slice(&flat, &[(r * pages_max) as i32]),
                mask: None,
            };
            let seq_lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let out = paged_decode(&q, &cache, 0, &pages, &Array::from_slice(&seq_lens, &[r as i32]), scale, window, cap)
                .unwrap();
            assert_eq!(out.shape(), &[r as i32, heads, d as i32]);
            let (o, qh, kh, vh) = (host(&out), host(&q), host(&cache.keys[0]), host(&cache.values[0]));
            let mut worst = 0f64;
            for (i, &len) in lens.iter().enumerate() {
                let first = window.map_or(0, |w| len.saturating_sub(w));
                for h in 0..heads as usize {
                    let kvh = h / (heads as usize / kv_heads);
                    let qrow = &qh[(i * heads as usize + h) * d..][..d];
                    let row = |j: usize| (tables[i][j / bs] as usize * bs + j % bs) * kv_heads + kvh;
                    let scores: Vec<f64> = (first..len)
                        .map(|j| {
                            let k = &kh[row(j) * d..][..d];
                            let s = scale as f64 * qrow.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
                            cap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let total: f64 = w.iter().sum();
                    for c in 0..d {
                        let want: f64 = (first..len).zip(&w).map(|(j, p)| p * vh[row(j) * d + c] as f64).sum::<f64>() / total;
                        let got = o[(i * heads as usize + h) * d + c] as f64;
                        worst = worst.max((got - want).abs());
                    }
                }
            }
            assert!(worst < tol, "case {case} ({dtype:?}, D={d}, window {window:?}, cap {cap:?}): max error {worst:.2e}");
            eprintln!(
                "case {case} ({dtype:?}, D={d}, block {bs}, heads {heads}/{kv_heads}, window {window:?}, cap {cap:?}): \
                 max error {worst:.2e}"
            );
        }
    }
}
