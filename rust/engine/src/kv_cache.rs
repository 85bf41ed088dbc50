//! The paged KV cache: per storage, K and V as `[num_blocks * block_size, kv_heads, head_dim]`.
//!
//! Slot `s` holds the token at position `p` of a request whose block table has
//! `block_ids[p / block_size] == s / block_size`. The block manager (vLLM's, or the engine-alone
//! allocator in `runner`) owns the mapping; this struct only stores and writes.
//!
//! Each layer belongs to a KV-cache group (its block tables) and a storage. Usually every layer
//! has its own storage and all are in group 0. With several groups (vLLM's hybrid manager: e.g.
//! Gemma's local and global layers) one storage is shared by one layer of each group, as vLLM
//! plans it: the groups draw their block ids from one pool, so they never write the same block.

use anyhow::{ensure, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::dtype::dtype_size;
use crate::mlx_ext::alloc;

pub struct PagedKvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: Dtype,
    pub keys: Vec<Array>,
    pub values: Vec<Array>,
    /// Per layer: its KV-cache group and its storage (index into keys / values).
    pub layer_group: Vec<usize>,
    pub layer_storage: Vec<usize>,
}

impl PagedKvCache {
    /// One storage per layer, all layers in KV-cache group 0.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        Self::with_groups(vec![0; num_layers], (0..num_layers).collect(), num_blocks, block_size, kv_heads, head_dim, dtype)
    }

    /// Layers mapped to KV-cache groups and storages (`layer_group[i]`, `layer_storage[i]`).
    pub fn with_groups(
        layer_group: Vec<usize>,
        layer_storage: Vec<usize>,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        ensure!(num_blocks > 0, "the KV cache needs at least one block");
        ensure!(layer_group.len() == layer_storage.len(), "one KV group and one storage per layer");
        let storages = layer_storage.iter().max().map_or(0, |m| m + 1);
        for s in 0..storages {
            let groups: Vec<usize> =
                (0..layer_storage.len()).filter(|&l| layer_storage[l] == s).map(|l| layer_group[l]).collect();
            let distinct: std::collections::BTreeSet<_> = groups.iter().collect();
            ensure!(
                !groups.is_empty() && distinct.len() == groups.len(),
                "KV storage {s} is shared by layers of the same group (or by none): {groups:?}"
            );
        }
        let shape = [(num_blocks * block_size) as i32, kv_heads as i32, head_dim as i32];
        let mut keys = Vec::with_capacity(storages);
        let mut values = Vec::with_capacity(storages);
        // Zeros (padded attention reads unwritten slots, masked out), written only where the
        // backend cannot map them untouched (see mlx_ext::alloc).
        for _ in 0..storages {
            keys.push(alloc::zeros(&shape, dtype)?);
            values.push(alloc::zeros(&shape, dtype)?);
        }
        Ok(Self {
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
            dtype,
            keys,
            values,
            layer_group,
            layer_storage,
        })
    }

    /// Bytes of K and V for one block, over `num_layers` layers.
    pub fn bytes_per_block(num_layers: usize, block_size: usize, kv_heads: usize, head_dim: usize, dtype: Dtype) -> usize {
        2 * num_layers * block_size * kv_heads * head_dim * dtype_size(dtype)
    }

    pub fn num_groups(&self) -> usize {
        self.layer_group.iter().max().map_or(1, |m| m + 1)
    }

    /// Write this step's K/V rows (`[T, kv_heads, head_dim]`) at `slots` (`[T]`, the slots of
    /// the layer's KV-cache group).
    ///
    /// The cache array is replaced by the scatter's result and its old handle dropped before
    /// evaluation, so MLX can donate the buffer: the write costs O(T), not O(cache size).
    pub fn write(&mut self, layer: usize, k: &Array, v: &Array, slots: &Array) -> Result<()> {
        let t = k.shape()[0];
        let upd = [t, 1, self.kv_heads as i32, self.head_dim as i32];
        let k = k.as_dtype(self.dtype)?.reshape(&upd)?;
        let v = v.as_dtype(self.dtype)?.reshape(&upd)?;
        let s = self.layer_storage[layer];
        self.keys[s] = ops::indexing::scatter_single(&self.keys[s], slots, &k, 0)?;
        self.values[s] = ops::indexing::scatter_single(&self.values[s], slots, &v, 0)?;
        Ok(())
    }

    /// The layer's cache viewed as `[num_blocks, block_size, kv_heads, head_dim]`.
    pub fn blocks(&self, layer: usize) -> Result<(Array, Array)> {
        let shape = [self.num_blocks as i32, self.block_size as i32, self.kv_heads as i32, self.head_dim as i32];
        let s = self.layer_storage[layer];
        Ok((self.keys[s].reshape(&shape)?, self.values[s].reshape(&shape)?))
    }

    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}
