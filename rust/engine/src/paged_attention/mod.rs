//! Attention over the paged KV cache: the attention layer every family shares, and the attention
//! of a flattened batch over the pages.
//!
//! Portable version, on MLX's fused SDPA. A group whose requests all have the same length gathers
//! exactly their cached tokens and needs no mask (causal aligned to the end, or none for decode),
//! which lets MLX pick its fused decode kernels; other groups (and sliding-window or soft-capped
//! layers) gather whole pages into a padded `[R, H, P * bs, D]` buffer with a position mask.
//! Either copies the touched history once per layer and step; it is the reference that
//! page-reading kernels must match.

use anyhow::Result;
use mlx_rs::{fast, fast::ScaledDotProductAttentionMask, ops, Array, Dtype};

use crate::batch::{Pages, StepBatch};
use crate::mlx_ext::custom_kernel::{CudaKernel, Output, TemplateArg};
use crate::kv_cache::PagedKvCache;
use crate::layers::softcap;

/// `q`: `[T, heads, head_dim]` (K/V of this step already written to the cache).
/// `window`: the layer's sliding window (keys at positions > query position - window only).
/// Returns `[T, heads * head_dim]`.
pub fn paged_attention(
    q: &Array,
    cache: &PagedKvCache,
    layer: usize,
    batch: &StepBatch,
    scale: f32,
    window: Option<usize>,
    cap: Option<f32>,
) -> Result<Array> {
    let windowed = window.is_some();
    let heads = q.shape()[1];
    let head_dim = q.shape()[2];
    let kv_heads = cache.kv_heads as i32;
    let bs = cache.block_size as i32;
    let (k_blocks, v_blocks) = cache.blocks(layer)?;
    let kv_group = cache.layer_group[layer];
    let mut outs = Vec::with_capacity(batch.groups.len());
    for g in &batch.groups {
        let group = g.pages.get(kv_group).ok_or_else(|| anyhow::anyhow!("batch has no block tables of KV group {kv_group}"))?;
        let qg = if batch.identity { q.clone() } else { q.take_axis(&g.q_index, 0)? };
        if g.in_place {
            // Every page from position 0 (such groups have no window pages): the kernel itself
            // starts at the window.
            let o = paged_decode(&qg, cache, layer, &group.full, &g.seq_lens, scale, window, cap)?;
            outs.push(o.reshape(&[g.num_seqs, heads * head_dim])?);
            continue;
        }
        let pages = match (windowed, &group.window) {
            (true, Some(p)) => p,
            (true, None) => anyhow::bail!("sliding-window layer but the batch has no window pages"),
            (false, _) => &group.full,
        };
        let (r, qn, kn) = (g.num_seqs, g.max_q, pages.max_pages * bs);
        let qg = qg.reshape(&[r, qn, heads, head_dim])?.transpose_axes(&[0, 2, 1, 3])?;
        let o = match (&group.exact, windowed, cap) {
            // Requests of one length: exactly their tokens, no mask array (MLX's fused kernels).
            (Some(exact), false, None) => {
                let storage = cache.layer_storage[layer];
                let gather = |flat: &Array| -> Result<Array> {
                    Ok(flat
                        .take_axis(&exact.slots, 0)?
                        .reshape(&[r, exact.len, kv_heads, head_dim])?
                        .transpose_axes(&[0, 2, 1, 3])?)
                };
                let (k, v) = (gather(&cache.keys[storage])?, gather(&cache.values[storage])?);
                let mask = (qn > 1).then_some(ScaledDotProductAttentionMask::Causal);
                fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, None)?
            }
            _ => {
                let gather = |blocks: &Array| -> Result<Array> {
                    Ok(blocks
                        .take_axis(&pages.block_table, 0)?
                        .reshape(&[r, kn, kv_heads, head_dim])?
                        .transpose_axes(&[0, 2, 1, 3])?)
                };
                let k = gather(&k_blocks)?;
                let v = gather(&v_blocks)?;
                let mask =
                    pages.mask.as_ref().ok_or_else(|| anyhow::anyhow!("decode group built for the page-reading kernel"))?;
                match cap {
                    None => fast::scaled_dot_product_attention(&qg, &k, &v, scale, mask, None)?,
                    Some(cap) => softcapped_attention(&qg, &k, &v, scale, mask, cap)?,
                }
            }
        };
        outs.push(o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[r * qn, heads * head_dim])?);
    }
    if batch.identity {
        return Ok(outs.pop().unwrap());
    }
    let all = if outs.len() == 1 { outs.pop().unwrap() } else { ops::concatenate(&outs, 0)? };
    Ok(all.take_axis(&batch.out_index, 0)?)
}

/// Whether `paged_decode` runs on this process's MLX for a cache of this shape.
pub fn decode_kernel_available(head_dim: usize, dtype: Dtype) -> bool {
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
fn paged_decode(
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
    let kv_heads = cache.kv_heads as i32;
    let storage = cache.layer_storage[layer];
    let q = q.as_dtype(cache.dtype)?;
    let table = pages.block_table.reshape(&[r, pages.max_pages])?;
    anyhow::ensure!(heads % kv_heads == 0, "{heads} query heads do not share {kv_heads} KV heads evenly");
    let (gqa, n) = (heads / kv_heads, d / 32);
    let max_len = pages.max_pages * cache.block_size as i32;
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
        ("BLOCK", TemplateArg::Int(cache.block_size as i32)),
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
        let inputs = [&q, &cache.keys[storage], &cache.values[storage], &table, seq_lens];
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

/// Attention with `cap * tanh(scores / cap)` before the mask (SDPA has no soft-capping).
/// `q` `[R, H, Q, D]`, `k`/`v` `[R, KVH, K, D]`, `mask` `[R, 1, Q, K]` bool.
fn softcapped_attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: &Array, cap: f32) -> Result<Array> {
    let (r, h, qn, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let kvh = k.shape()[1];
    // Query heads grouped by their KV head: [R, KVH, H/KVH * Q, D].
    let qg = q.reshape(&[r, kvh, (h / kvh) * qn, d])?;
    let scores = qg
        .multiply(Array::from_f32(scale).as_dtype(q.dtype())?)?
        .matmul(k.swap_axes(-1, -2)?)?
        .as_dtype(Dtype::Float32)?;
    let scores = softcap(&scores, cap)?.reshape(&[r, kvh, h / kvh, qn, -1])?;
    let mask = mask.reshape(&[r, 1, 1, qn, -1])?;
    let scores = ops::select(&mask, &scores, Array::from_f32(f32::NEG_INFINITY))?;
    let p = ops::softmax_axis(&scores, -1, None)?.as_dtype(v.dtype())?;
    let o = p.reshape(&[r, kvh, (h / kvh) * qn, -1])?.matmul(v)?;
    Ok(o.reshape(&[r, h, qn, d])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlx_ext::device::{self, DeviceKind};
    use mlx_rs::random;

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
            assert!(decode_kernel_available(d, dtype), "kernel unavailable for case {case}");
            let nb = num_blocks.max(lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 1);
            let mut cache = PagedKvCache::new(1, nb, bs, kv_heads, d, dtype).unwrap();
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
