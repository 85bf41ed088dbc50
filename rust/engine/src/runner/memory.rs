//! The engine's memory facts: KV bytes per block, the activation peak of a forward, and the
//! KV-cache budget vLLM is given (all decided here; the worker only asks).

use anyhow::{bail, ensure, Result};
use mlx_rs::{transforms::eval, Array};

use super::ModelRunner;
use crate::batch::SeqChunk;
use crate::kv_cache::PagedKvCache;
use crate::mlx_ext::device;

const GIB: f64 = (1u64 << 30) as f64;

/// What vLLM's configuration asks of the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct KvBudgetRequest {
    /// Share of device memory the engine may use (weights, activations and KV cache).
    pub memory_fraction: f64,
    /// Tokens of the largest step (the activation peak is measured at this size).
    pub max_num_batched_tokens: usize,
    /// One sequence of this length must fit; None: vLLM fits the length to the cache itself.
    pub max_model_len: Option<usize>,
}

impl ModelRunner {
    pub fn kv_bytes_per_block(&self) -> usize {
        let shapes: Vec<_> = self.kv_layers().iter().map(|l| l.shape).collect();
        PagedKvCache::bytes_per_block(&shapes, self.block_size, self.dtype)
    }

    /// Bytes MLX allocates beyond the weights for one forward of `num_tokens` tokens (one request).
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
        let peak = self.profile_peak_memory(req.max_num_batched_tokens)?;
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
            "memory: device {} {:.2} GiB x {}, weights {:.2} GiB, activation peak {:.2} GiB ({} tokens), \
             KV cache {:.2} GiB ({} blocks of {} tokens)",
            self.device.name(),
            gib(total),
            req.memory_fraction,
            gib(self.weights_nbytes),
            gib(peak),
            req.max_num_batched_tokens,
            gib(budget),
            budget / per_block,
            self.block_size
        );
        Ok(budget)
    }
}
