//! The paged KV cache: per storage, K and V as one buffer of `num_blocks` pages, viewed by each
//! layer in its own geometry `[num_blocks * block_size, kv_heads, head_dim]`.
//!
//! Slot `s` holds the token at position `p` of a request whose block table has
//! `block_ids[p / block_size] == s / block_size`. The block manager (vLLM's, or the engine-alone
//! allocator in `runner`) owns the mapping; this struct only stores and writes.
//!
//! Each cache layer belongs to a KV-cache group (its block tables) and a storage. Usually every
//! layer has its own storage and all are in group 0. With several groups (vLLM's hybrid manager:
//! e.g. Gemma's local and global layers) one storage is shared by one layer of each group, as vLLM
//! plans it: the groups draw their block ids from one pool, so they never write the same block.
//! Layers may differ in KV heads and head size (Gemma 4's global layers): vLLM then gives the
//! groups of smaller rows proportionally larger blocks, so that every page has one size and a
//! storage's page holds `block_size * kv_heads * head_dim` elements whichever layer views it.

use anyhow::{ensure, Result};
use mlx_rs::{ops, Array, Dtype};

use crate::dtype::dtype_size;
use crate::mlx_ext::alloc;

/// The K (and V) row shape of one cache layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn row_elements(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

pub struct PagedKvCache {
    pub num_blocks: usize,
    pub dtype: Dtype,
    /// Per cache layer.
    pub shapes: Vec<KvShape>,
    /// Tokens per block of each KV-cache group.
    pub group_block_size: Vec<usize>,
    pub keys: Vec<Array>,
    pub values: Vec<Array>,
    /// Per cache layer: its KV-cache group and its storage (index into keys / values).
    pub layer_group: Vec<usize>,
    pub layer_storage: Vec<usize>,
}

impl PagedKvCache {
    /// One storage per layer, all layers in KV-cache group 0.
    pub fn new(shapes: Vec<KvShape>, num_blocks: usize, block_size: usize, dtype: Dtype) -> Result<Self> {
        let n = shapes.len();
        Self::with_groups(vec![0; n], (0..n).collect(), vec![block_size], shapes, num_blocks, dtype)
    }

    /// Layers mapped to KV-cache groups and storages (`layer_group[i]`, `layer_storage[i]`), with
    /// each group's block size.
    pub fn with_groups(
        layer_group: Vec<usize>,
        layer_storage: Vec<usize>,
        group_block_size: Vec<usize>,
        shapes: Vec<KvShape>,
        num_blocks: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        ensure!(num_blocks > 0, "the KV cache needs at least one block");
        ensure!(
            layer_group.len() == layer_storage.len() && layer_group.len() == shapes.len(),
            "one KV group, one storage and one shape per layer"
        );
        ensure!(
            layer_group.iter().all(|&g| g < group_block_size.len()) && group_block_size.iter().all(|&b| b > 0),
            "every KV group needs a positive block size: {group_block_size:?}"
        );
        let page = |l: usize| group_block_size[layer_group[l]] * shapes[l].row_elements();
        let storages = layer_storage.iter().max().map_or(0, |m| m + 1);
        let mut keys = Vec::with_capacity(storages);
        let mut values = Vec::with_capacity(storages);
        for s in 0..storages {
            let layers: Vec<usize> = (0..layer_storage.len()).filter(|&l| layer_storage[l] == s).collect();
            let groups: Vec<usize> = layers.iter().map(|&l| layer_group[l]).collect();
            let distinct: std::collections::BTreeSet<_> = groups.iter().collect();
            ensure!(
                !groups.is_empty() && distinct.len() == groups.len(),
                "KV storage {s} is shared by layers of the same group (or by none): {groups:?}"
            );
            let pages: Vec<usize> = layers.iter().map(|&l| page(l)).collect();
            ensure!(
                pages.iter().all(|&p| p == pages[0]),
                "KV storage {s} is shared by layers {layers:?} whose pages differ ({pages:?} elements)"
            );
            let first = layers[0];
            let bs = group_block_size[layer_group[first]];
            let shape = [(num_blocks * bs) as i32, shapes[first].kv_heads as i32, shapes[first].head_dim as i32];
            // Zeros (padded attention reads unwritten slots, masked out), written only where the
            // backend cannot map them untouched (see mlx_ext::alloc).
            keys.push(alloc::zeros(&shape, dtype)?);
            values.push(alloc::zeros(&shape, dtype)?);
        }
        Ok(Self { num_blocks, dtype, shapes, group_block_size, keys, values, layer_group, layer_storage })
    }

    /// Bytes of K and V for one block of `block_size` tokens over layers of these shapes.
    pub fn bytes_per_block(shapes: &[KvShape], block_size: usize, dtype: Dtype) -> usize {
        2 * block_size * shapes.iter().map(KvShape::row_elements).sum::<usize>() * dtype_size(dtype)
    }

    pub fn num_groups(&self) -> usize {
        self.group_block_size.len()
    }

    pub fn block_size(&self, layer: usize) -> usize {
        self.group_block_size[self.layer_group[layer]]
    }

    pub fn kv_heads(&self, layer: usize) -> usize {
        self.shapes[layer].kv_heads
    }

    pub fn head_dim(&self, layer: usize) -> usize {
        self.shapes[layer].head_dim
    }

    /// A storage in the layer's geometry `[num_blocks * block_size, kv_heads, head_dim]` (free
    /// when the storage already has it: every layer sharing it but Gemma 4's other kind).
    fn view(&self, layer: usize, a: &Array) -> Result<Array> {
        let KvShape { kv_heads, head_dim } = self.shapes[layer];
        let shape = [(self.num_blocks * self.block_size(layer)) as i32, kv_heads as i32, head_dim as i32];
        Ok(if a.shape() == shape { a.clone() } else { a.reshape(&shape)? })
    }

    /// The layer's K and V as `[num_blocks * block_size, kv_heads, head_dim]`.
    pub fn slots(&self, layer: usize) -> Result<(Array, Array)> {
        let s = self.layer_storage[layer];
        Ok((self.view(layer, &self.keys[s])?, self.view(layer, &self.values[s])?))
    }

    /// Write this step's K/V rows (`[T, kv_heads, head_dim]`) at `slots` (`[T]`, the slots of
    /// the layer's KV-cache group).
    ///
    /// The cache array is replaced by the scatter's result and its old handle dropped before
    /// evaluation, so MLX can donate the buffer: the write costs O(T), not O(cache size).
    pub fn write(&mut self, layer: usize, k: &Array, v: &Array, slots: &Array) -> Result<()> {
        let t = k.shape()[0];
        let KvShape { kv_heads, head_dim } = self.shapes[layer];
        let upd = [t, 1, kv_heads as i32, head_dim as i32];
        let k = k.as_dtype(self.dtype)?.reshape(&upd)?;
        let v = v.as_dtype(self.dtype)?.reshape(&upd)?;
        let s = self.layer_storage[layer];
        let (kc, vc) = self.slots(layer)?;
        self.keys[s] = ops::indexing::scatter_single(&kc, slots, &k, 0)?;
        self.values[s] = ops::indexing::scatter_single(&vc, slots, &v, 0)?;
        Ok(())
    }

    /// The layer's cache viewed as `[num_blocks, block_size, kv_heads, head_dim]`.
    pub fn blocks(&self, layer: usize) -> Result<(Array, Array)> {
        let KvShape { kv_heads, head_dim } = self.shapes[layer];
        let shape = [self.num_blocks as i32, self.block_size(layer) as i32, kv_heads as i32, head_dim as i32];
        let s = self.layer_storage[layer];
        Ok((self.keys[s].reshape(&shape)?, self.values[s].reshape(&shape)?))
    }

    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }

    /// Elements (of the cache dtype) of one block of the layer's K, and of its V.
    fn block_elems(&self, layer: usize) -> i32 {
        (self.block_size(layer) * self.shapes[layer].row_elements()) as i32
    }

    /// The recurrent state of a linear-attention layer in the blocks `slots` (`[R]` block ids):
    /// conv `[R, K-1, conv_dim]` and ssm `[R, heads, key_dim, value_dim]`. A state lives in a
    /// block of its layer's storage, as vLLM's plan places it (its page is padded to the K/V page
    /// of one block): the conv state from the block's first K byte, the ssm state after it.
    pub fn read_state(&self, layer: usize, slots: &Array, geo: &StateGeometry) -> Result<(Array, Array)> {
        let s = self.layer_storage[layer];
        let e = self.block_elems(layer);
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
        let e = self.block_elems(layer);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_of_two_shapes_share_a_storage_by_pages() {
        // Layer 0: rows of 2 x 4 in blocks of 4 tokens; layer 1: rows of 1 x 16 in blocks of 2.
        let shapes = vec![KvShape { kv_heads: 2, head_dim: 4 }, KvShape { kv_heads: 1, head_dim: 16 }];
        let mut c = PagedKvCache::with_groups(vec![0, 1], vec![0, 0], vec![4, 2], shapes.clone(), 3, Dtype::Float32).unwrap();
        // Layer 0 writes block 1 (slots 4..8), layer 1 block 2 (slots 4, 5).
        let k0 = Array::from_iter((0..32).map(|v| v as f32), &[4, 2, 4]);
        c.write(0, &k0, &k0, &Array::from_slice(&[4, 5, 6, 7], &[4])).unwrap();
        let k1 = Array::from_iter((0..32).map(|v| -(v as f32) - 1.0), &[2, 1, 16]);
        c.write(1, &k1, &k1, &Array::from_slice(&[4, 5], &[2])).unwrap();
        let (b0, _) = c.blocks(0).unwrap();
        let (b1, _) = c.blocks(1).unwrap();
        assert_eq!(b0.shape(), [3, 4, 2, 4]);
        assert_eq!(b1.shape(), [3, 2, 1, 16]);
        let flat = |a: Array| a.flatten(None, None).unwrap().as_slice::<f32>().to_vec();
        let idx = |i: i32| Array::from_int(i);
        assert_eq!(flat(b0.take_axis(&idx(1), 0).unwrap()), (0..32).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(flat(b1.take_axis(&idx(2), 0).unwrap()), (0..32).map(|v| -(v as f32) - 1.0).collect::<Vec<_>>());
        // One page is 32 elements whichever layer views it; block 0 stays untouched.
        assert!(flat(b1.take_axis(&idx(0), 0).unwrap()).iter().all(|&v| v == 0.0));
        // Pages of different sizes cannot share a storage.
        let Err(err) = PagedKvCache::with_groups(vec![0, 1], vec![0, 0], vec![4, 4], shapes, 3, Dtype::Float32) else {
            panic!("pages of 32 and 64 elements shared a storage")
        };
        assert!(format!("{err:#}").contains("whose pages differ"), "{err:#}");
    }
}
