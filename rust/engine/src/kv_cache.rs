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
use mlx_rs::{ops, transforms::eval, Array, Dtype};

use crate::dtype::dtype_size;

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
        for _ in 0..storages {
            keys.push(ops::zeros_dtype(&shape, dtype)?);
            values.push(ops::zeros_dtype(&shape, dtype)?);
        }
        eval(keys.iter().chain(values.iter()))?;
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

    /// Elements (of the cache dtype) of one block of one storage's K, and of its V.
    fn block_elems(&self) -> i32 {
        (self.block_size * self.kv_heads * self.head_dim) as i32
    }

    /// The recurrent state of a linear-attention layer in the blocks `slots` (`[R]` block ids):
    /// conv `[R, K-1, conv_dim]` and ssm `[R, heads, key_dim, value_dim]`. A state lives in a
    /// block of its layer's storage, as vLLM's plan places it (its page is padded to the K/V page
    /// of one block): the conv state from the block's first K byte, the ssm state after it.
    pub fn read_state(&self, layer: usize, slots: &Array, geo: &StateGeometry) -> Result<(Array, Array)> {
        let s = self.layer_storage[layer];
        let e = self.block_elems();
        let rows = |a: &Array| -> Result<Array> { Ok(a.reshape(&[self.num_blocks as i32, e])?.take_axis(slots, 0)?) };
        let row = ops::concatenate(&[rows(&self.keys[s])?, rows(&self.values[s])?], 1)?;
        let (conv_n, ssm_n) = geo.elems_in(self.dtype)?;
        let r = slots.shape()[0];
        let parts = ops::split_at_indices(&row, &[conv_n, conv_n + ssm_n], 1)?;
        let conv = parts[0].reshape(&[r, geo.conv[0] as i32, geo.conv[1] as i32])?;
        let ssm_shape = [r, geo.ssm[0] as i32, geo.ssm[1] as i32, geo.ssm[2] as i32];
        let ssm = parts[1].view_dtype(geo.ssm_dtype)?.reshape(&ssm_shape)?;
        Ok((conv, ssm))
    }

    /// Store linear-attention states (as [`Self::read_state`] reads them) into the blocks `slots`.
    pub fn write_state(&mut self, layer: usize, slots: &Array, conv: &Array, ssm: &Array, geo: &StateGeometry) -> Result<()> {
        let s = self.layer_storage[layer];
        let e = self.block_elems();
        let (conv_n, ssm_n) = geo.elems_in(self.dtype)?;
        let r = slots.shape()[0];
        let conv = conv.as_dtype(self.dtype)?.reshape(&[r, conv_n])?;
        let ssm = ssm.as_dtype(geo.ssm_dtype)?.reshape(&[r, -1])?.view_dtype(self.dtype)?;
        let mut parts = vec![conv, ssm];
        if 2 * e > conv_n + ssm_n {
            parts.push(ops::zeros_dtype(&[r, 2 * e - conv_n - ssm_n], self.dtype)?);
        }
        let row = ops::concatenate(&parts, 1)?;
        let halves = ops::split_at_indices(&row, &[e], 1)?;
        let nb = self.num_blocks as i32;
        let full = self.keys[s].shape().to_vec();
        self.keys[s] = ops::indexing::scatter_single(&self.keys[s].reshape(&[nb, e])?, slots, &halves[0].reshape(&[r, 1, e])?, 0)?.reshape(&full)?;
        self.values[s] = ops::indexing::scatter_single(&self.values[s].reshape(&[nb, e])?, slots, &halves[1].reshape(&[r, 1, e])?, 0)?.reshape(&full)?;
        Ok(())
    }
}

/// The shape of a linear-attention layer's recurrent state: its convolution window (the last
/// `K - 1` inputs, model dtype) and its ssm matrix per value head (`ssm_dtype`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateGeometry {
    pub conv: [usize; 2],
    pub ssm: [usize; 3],
    pub ssm_dtype: Dtype,
}

impl StateGeometry {
    /// Bytes of one state with the convolution window in `dtype`.
    pub fn bytes(&self, dtype: Dtype) -> usize {
        self.conv[0] * self.conv[1] * dtype_size(dtype) + self.ssm.iter().product::<usize>() * dtype_size(self.ssm_dtype)
    }

    /// Elements of the cache dtype `dtype` the conv and the ssm state take.
    fn elems_in(&self, dtype: Dtype) -> Result<(i32, i32)> {
        let (d, sd) = (dtype_size(dtype), dtype_size(self.ssm_dtype));
        let ssm_bytes = self.ssm.iter().product::<usize>() * sd;
        ensure!(ssm_bytes % d == 0, "ssm state of {ssm_bytes} bytes does not fill whole {dtype:?} elements");
        Ok(((self.conv[0] * self.conv[1]) as i32, (ssm_bytes / d) as i32))
    }
}
