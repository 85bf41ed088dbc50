//! The paged KV cache: per layer, K and V as `[num_blocks * block_size, kv_heads, head_dim]`.
//!
//! Slot `s` holds the token at position `p` of a request whose block table has
//! `block_ids[p / block_size] == s / block_size`. The block manager (vLLM's, or the engine-alone
//! allocator in `runner`) owns the mapping; this struct only stores and writes.

use anyhow::{ensure, Result};
use mlx_rs::{ops, transforms::eval, Array, Dtype};

use crate::nn::dtype_size;

pub struct PagedKvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: Dtype,
    pub keys: Vec<Array>,
    pub values: Vec<Array>,
}

impl PagedKvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        ensure!(num_blocks > 0, "the KV cache needs at least one block");
        let shape = [(num_blocks * block_size) as i32, kv_heads as i32, head_dim as i32];
        let mut keys = Vec::with_capacity(num_layers);
        let mut values = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            keys.push(ops::zeros_dtype(&shape, dtype)?);
            values.push(ops::zeros_dtype(&shape, dtype)?);
        }
        eval(keys.iter().chain(values.iter()))?;
        Ok(Self { block_size, num_blocks, kv_heads, head_dim, dtype, keys, values })
    }

    /// Bytes of K and V for one block, over `num_layers` layers.
    pub fn bytes_per_block(num_layers: usize, block_size: usize, kv_heads: usize, head_dim: usize, dtype: Dtype) -> usize {
        2 * num_layers * block_size * kv_heads * head_dim * dtype_size(dtype)
    }

    /// Write this step's K/V rows (`[T, kv_heads, head_dim]`) at `slots` (`[T]`).
    ///
    /// The cache array is replaced by the scatter's result and its old handle dropped before
    /// evaluation, so MLX can donate the buffer: the write costs O(T), not O(cache size).
    pub fn write(&mut self, layer: usize, k: &Array, v: &Array, slots: &Array) -> Result<()> {
        let t = k.shape()[0];
        let upd = [t, 1, self.kv_heads as i32, self.head_dim as i32];
        let k = k.as_dtype(self.dtype)?.reshape(&upd)?;
        let v = v.as_dtype(self.dtype)?.reshape(&upd)?;
        self.keys[layer] = ops::indexing::scatter_single(&self.keys[layer], slots, &k, 0)?;
        self.values[layer] = ops::indexing::scatter_single(&self.values[layer], slots, &v, 0)?;
        Ok(())
    }

    /// The layer's cache viewed as `[num_blocks, block_size, kv_heads, head_dim]`.
    pub fn blocks(&self, layer: usize) -> Result<(Array, Array)> {
        let shape = [self.num_blocks as i32, self.block_size as i32, self.kv_heads as i32, self.head_dim as i32];
        Ok((self.keys[layer].reshape(&shape)?, self.values[layer].reshape(&shape)?))
    }

    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}
