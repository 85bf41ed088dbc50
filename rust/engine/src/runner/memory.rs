//! The engine's memory facts: KV bytes per block, the activation peak of a forward, and the
//! KV-cache budget vLLM is given (all decided here; the worker only asks).
//!
//! The activation peak of the largest step is not measured on a forward of that size (47 s for
//! 2,048 tokens of SmolLM2 on two CPU cores) but bounded from two small measurements: a forward
//! of a few tokens, whose peak grows at most linearly with the tokens outside attention, and the
//! attention of one layer alone at two sizes, whose scores may grow with the square of the tokens
//! (MLX's CPU attention materializes them; fused GPU kernels do not, and the measurements show
//! it).

use anyhow::{bail, ensure, Context, Result};
use mlx_rs::{ops, transforms::eval, Array};

use super::ModelRunner;
use crate::batch::SeqChunk;
use crate::kv_cache::PagedKvCache;
use crate::mlx_ext::device::{self, DeviceKind};
use crate::paged_attention::{paged_attention, Scores};

const GIB: f64 = (1u64 << 30) as f64;

/// Tokens of the forward whose peak is scaled up to the largest step.
const PROFILE_TOKENS: usize = 64;
/// Queries of the attention measurement on the CPU, where attention over N tokens costs O(N²)
/// to run; GPUs measure at the full size.
const CPU_ATTENTION_TOKENS: usize = 1024;

/// Headroom over the measurements: MLX's allocations differ a little from run to run of the
/// same forward (a few KiB on tiny models, well under 5% on real ones).
const PEAK_HEADROOM: f64 = 1.05;
const PEAK_SLACK: usize = 1 << 20;

/// The scores' share counts twice: MLX's CPU stream runs ahead of the host thread that releases
/// buffers, so under load one more score buffer can be alive than in a quiet measurement (seen:
/// 1.7x the usual peak of a tiny model's 2,048-token forward on a loaded machine).
const SCORES_ALIVE: f64 = 2.0;

/// How the activation peak of a step was bounded (for the log and the tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationPeak {
    /// Upper bound of the bytes a forward of `num_tokens` allocates beyond the weights.
    pub bytes: usize,
    pub num_tokens: usize,
    /// Peak of the measured forward and its tokens.
    pub forward_bytes: usize,
    pub forward_tokens: usize,
    /// Peak of one layer's attention alone at its larger measurement, and its queries (0, 0: not
    /// needed, the forward was measured at full size).
    pub attention_bytes: usize,
    pub attention_tokens: usize,
}

/// What vLLM's configuration asks of the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct KvBudgetRequest {
    /// Share of device memory the engine may use (weights, activations and KV cache).
    pub memory_fraction: f64,
    /// Tokens of the largest step (the activation peak is bounded at this size).
    pub max_num_batched_tokens: usize,
    /// One sequence of this length must fit; None: vLLM fits the length to the cache itself.
    pub max_model_len: Option<usize>,
}

impl ModelRunner {
    pub fn kv_bytes_per_block(&self) -> usize {
        let shapes: Vec<_> = self.kv_layers().iter().map(|l| l.shape).collect();
        PagedKvCache::bytes_per_block(&shapes, self.block_size, self.dtype)
    }

    /// An upper bound of `profile_peak_memory(num_tokens)` from a forward of `n` <=
    /// `PROFILE_TOKENS` tokens and one layer's attention measured at `m` and `m / 2` queries:
    /// `forward * N / n + alpha N + SCORES_ALIVE gamma N²` (plus `PEAK_HEADROOM`, `PEAK_SLACK`). Outside
    /// attention every buffer of a forward grows at most linearly with the tokens (a fixed part
    /// scaled up only overestimates); attention adds its scores, at most quadratic.
    pub fn activation_peak(&mut self, num_tokens: usize) -> Result<ActivationPeak> {
        ensure!(num_tokens > 0, "profile needs at least one token");
        let n = num_tokens.min(PROFILE_TOKENS);
        let forward = self.profile_peak_memory(n)?;
        let mut raw = forward as f64;
        let mut peak = ActivationPeak {
            bytes: 0,
            num_tokens,
            forward_bytes: forward,
            forward_tokens: n,
            attention_bytes: 0,
            attention_tokens: 0,
        };
        if n < num_tokens {
            let m = match self.device {
                DeviceKind::Cpu => num_tokens.min(CPU_ATTENTION_TOKENS),
                DeviceKind::Gpu => num_tokens,
            };
            // A(q) = alpha q + gamma q² through the measurements at m and m / 2: the scores'
            // quadratic share apart from the linear rest (inputs, outputs, gathered K/V), so
            // that only the scores are scaled quadratically.
            let attention = self.attention_peak(m)?;
            let h = (m / 2).max(1);
            let (mf, hf, big) = (m as f64, h as f64, num_tokens as f64);
            let per_query = |a: usize, q: f64| a as f64 / q;
            let gamma = if h < m {
                ((per_query(attention, mf) - per_query(self.attention_peak(h)?, hf)) / (mf - hf)).max(0.0)
            } else {
                0.0
            };
            let alpha = (per_query(attention, mf) - gamma * mf).max(0.0);
            raw = forward as f64 * big / n as f64 + alpha * big + SCORES_ALIVE * gamma * big * big;
            peak.attention_bytes = attention;
            peak.attention_tokens = m;
        }
        peak.bytes = (raw * PEAK_HEADROOM).ceil() as usize + PEAK_SLACK;
        Ok(peak)
    }

    /// Peak bytes of one layer's attention (each kind of layer the model has: full, windowed)
    /// over `num_tokens` queries of one request, beyond its inputs.
    fn attention_peak(&mut self, num_tokens: usize) -> Result<usize> {
        let saved = self.cache.take();
        // One group of attention pages for the batch below, whatever the cache was planned as.
        let saved_groups = std::mem::take(&mut self.kv_groups);
        let result = (|| -> Result<usize> {
            // The layer kind with the largest rows (Gemma 4's global layers) bounds the others.
            let shape = self.kv_layers().iter().map(|l| l.shape).max_by_key(|s| s.row_elements()).context("the model keeps no K/V")?;
            let (heads, head_dim) = (self.config.num_attention_heads as i32, shape.head_dim);
            let blocks = num_tokens.div_ceil(self.block_size);
            let cache = PagedKvCache::new(vec![shape], blocks, self.block_size, self.dtype)?;
            let tokens = vec![0i32; num_tokens];
            let block_ids = [(0..blocks as i32).collect::<Vec<i32>>()];
            let batch = self.build_batch(&[SeqChunk { start: 0, tokens: &tokens, block_ids: &block_ids, images: None }])?;
            let q = ops::zeros_dtype(&[num_tokens as i32, heads, head_dim as i32], self.dtype)?;
            let sinks = self.model.attention_features().sinks.then(|| ops::zeros_dtype(&[heads], self.dtype)).transpose()?;
            eval([&q].into_iter().chain(sinks.as_ref()))?;
            let mut windows = self.config.layer_windows();
            windows.sort();
            windows.dedup();
            let mut peak = 0;
            for window in windows {
                mlx_rs::memory::clear_cache()?;
                mlx_rs::memory::reset_peak_memory()?;
                let base = mlx_rs::memory::active_memory()?;
                let scores = Scores {
                    scale: (head_dim as f32).powf(-0.5),
                    window,
                    softcap: self.config.attn_logit_softcapping,
                    sinks: sinks.as_ref(),
                };
                let o = paged_attention(&q, &cache, 0, &batch, scores)?;
                eval([&o])?;
                peak = peak.max(mlx_rs::memory::peak_memory()?.saturating_sub(base));
            }
            Ok(peak)
        })();
        self.cache = saved;
        self.kv_groups = saved_groups;
        mlx_rs::memory::clear_cache()?;
        result
    }

    /// Bytes MLX allocates beyond the weights for one forward of `num_tokens` tokens (one
    /// request), measured on such a forward.
    pub fn profile_peak_memory(&mut self, num_tokens: usize) -> Result<usize> {
        ensure!(num_tokens > 0, "profile needs at least one token");
        let saved = self.cache.take();
        mlx_rs::memory::clear_cache()?;
        mlx_rs::memory::reset_peak_memory()?;
        let base = mlx_rs::memory::active_memory()?;
        let blocks = num_tokens.div_ceil(self.block_size);
        let result = (|| -> Result<usize> {
            self.allocate_kv_cache(blocks)?;
            let tokens = vec![0i32; num_tokens];
            let block_ids: Vec<i32> = (0..blocks as i32).collect();
            let block_ids = [block_ids];
            let chunk = SeqChunk { start: 0, tokens: &tokens, block_ids: &block_ids, images: None };
            let batch = self.build_batch(&[chunk])?;
            let cache = self.cache.as_mut().unwrap();
            let hidden = self.model.forward(&batch, cache)?;
            let last = hidden.take_axis(&Array::from_slice(&[num_tokens as i32 - 1], &[1]), 0)?;
            let logits = self.model.logits(&last)?;
            eval([&logits].into_iter().chain(cache.arrays()))?;
            Ok(mlx_rs::memory::peak_memory()?.saturating_sub(base))
        })();
        self.cache = saved;
        mlx_rs::memory::clear_cache()?;
        result
    }

    /// Bytes vLLM may give to the KV cache: the memory fraction of the device, less the weights
    /// and the activation peak of the largest step. An error when one sequence of max_model_len
    /// would not fit.
    pub fn kv_cache_budget(&mut self, req: KvBudgetRequest) -> Result<usize> {
        ensure!(
            req.memory_fraction > 0.0 && req.memory_fraction <= 1.0,
            "memory fraction {} is outside (0, 1]",
            req.memory_fraction
        );
        let total = device::total_memory(self.device);
        let usable = (total as f64 * req.memory_fraction) as usize;
        let activation = self.activation_peak(req.max_num_batched_tokens)?;
        let peak = activation.bytes;
        let budget = usable.saturating_sub(self.weights_nbytes + peak);
        let per_block = self.kv_bytes_per_block();
        // vLLM keeps one block back (the null block) and wants one full-length sequence to fit.
        let needed_blocks = match req.max_model_len {
            Some(len) => len.div_ceil(self.block_size) + 1,
            None => 2,
        };
        let needed = per_block * needed_blocks;
        let gib = |b: usize| b as f64 / GIB;
        if budget < needed {
            bail!(
                "not enough memory for the KV cache: device {:.2} GiB x {} = {:.2} GiB, weights {:.2} GiB, \
                 activation peak {:.2} GiB ({} tokens), KV budget {:.2} GiB, needed {:.3} GiB for \
                 max_model_len={}; raise VLLM_METAL_MEMORY_FRACTION or lower max_model_len/max_num_batched_tokens",
                gib(total),
                req.memory_fraction,
                gib(usable),
                gib(self.weights_nbytes),
                gib(peak),
                req.max_num_batched_tokens,
                gib(budget),
                gib(needed),
                req.max_model_len.map_or("auto".to_string(), |l| l.to_string()),
            );
        }
        log::info!(
            "memory: device {} {:.2} GiB x {}, weights {:.2} GiB, activation peak {:.2} GiB ({} tokens; \
             bound from a forward of {} tokens, {:.3} GiB, and attention over {}, {:.3} GiB), \
             KV cache {:.2} GiB ({} blocks of {} tokens)",
            self.device.name(),
            gib(total),
            req.memory_fraction,
            gib(self.weights_nbytes),
            gib(peak),
            req.max_num_batched_tokens,
            activation.forward_tokens,
            gib(activation.forward_bytes),
            activation.attention_tokens,
            gib(activation.attention_bytes),
            gib(budget),
            budget / per_block,
            self.block_size
        );
        Ok(budget)
    }
}
