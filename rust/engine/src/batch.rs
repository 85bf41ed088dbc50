//! One step's input tensors, built once per step from the scheduled chunks of every request.

use anyhow::{bail, Result};
use mlx_rs::Array;

use crate::multimodal::RequestImages;
use crate::paged_attention::AttentionBackend;

/// The tokens of one request that run this step.
#[derive(Debug, Clone)]
pub struct SeqChunk<'a> {
    /// Tokens of the request already in the KV cache (position of the chunk's first token).
    pub start: usize,
    pub tokens: &'a [i32],
    /// The request's whole block table, one per KV-cache group (vLLM gives layers of different
    /// attention types, e.g. Gemma's local and global layers, their own tables).
    pub block_ids: &'a [Vec<i32>],
    /// The request's images (a multimodal model's request that has some): the rows its
    /// placeholders in this chunk take and its M-RoPE positions.
    pub images: Option<&'a RequestImages>,
}

/// The pages a group's queries read, and which of their keys each query sees.
pub struct Pages {
    pub max_pages: i32,
    /// `[R * P]`: each request's pages, padded with block 0 (masked out).
    pub block_table: Array,
    /// `[R, 1, Q, P * block_size]`; none for decode groups that the page-reading kernel serves.
    pub mask: Option<Array>,
}

/// Every request of a group has `len` tokens in the cache and its queries end at its last one (a
/// single request, or decode rows of equal length): exactly those slots are gathered and attention
/// is causal aligned to the end (none for one query) — no mask array, so MLX can use its fused
/// decode kernels.
pub struct Exact {
    pub len: i32,
    /// `[R * len]`: the cache slots of positions `0..len` of each request.
    pub slots: Array,
}

/// The pages of one KV-cache group.
pub struct GroupPages {
    /// Every page from position 0; key position <= query position.
    pub full: Pages,
    /// The same keys as `full` without padding or mask, when the group's requests share a length.
    pub exact: Option<Exact>,
    /// For the model's sliding-window layers: only the pages the window reaches (from the first
    /// query's position - window + 1); also key position > query position - window. None for
    /// decode groups that the page-reading kernel serves (it starts at the window itself).
    pub window: Option<Pages>,
}

/// Requests whose queries attend together in one padded `[R, Q]` x `[R, P * block_size]` call.
pub struct QueryGroup {
    pub num_seqs: i32,
    pub max_q: i32,
    /// `[R * Q]`: the flat token feeding each padded query row (padding repeats a real row).
    pub q_index: Array,
    /// `[R]`: each request's length at the end of its chunk (its keys in the cache this step).
    pub seq_lens: Array,
    /// `PageKernel`: a decode group whose attention reads the pages itself, so its pages carry
    /// block tables only (no masks, slot lists or window pages).
    pub backend: AttentionBackend,
    /// Per KV-cache group.
    pub pages: Vec<GroupPages>,
}

/// What each KV-cache group's block tables serve. Attention layers read pages of the groups
/// they are in; linear-attention layers keep each request's recurrent state in a block of
/// theirs, chosen by the group's state block size (vLLM's `mamba_block_size`): a state is read
/// from the block of the column holding position `start - 1` and written to the block of the
/// column holding the chunk's last position — one block per request when the state block spans
/// the whole context, one per column with prefix caching (vLLM's "align" mode, which keeps the
/// state at each block boundary). Empty lists: every group is attention only.
#[derive(Debug, Clone, Default)]
pub struct KvGroups {
    pub attention: Vec<bool>,
    pub state_block_size: Vec<Option<usize>>,
}

impl KvGroups {
    fn state(&self, group: usize) -> Option<usize> {
        self.state_block_size.get(group).copied().flatten()
    }

    fn attention(&self, group: usize) -> bool {
        self.attention.get(group).copied().unwrap_or(true)
    }
}

/// The requests of a step as the linear-attention layers see them: decode rows run one
/// recurrent step together, each prefill chunk its own chunked scan.
pub struct StateBatch {
    /// `[R]`: the flat token of each decode row.
    pub decode_tokens: Option<Array>,
    /// `[R]` float32: 1 where the row continues a state, 0 for a request's first token.
    pub decode_continues: Option<Array>,
    pub prefills: Vec<StatePrefill>,
    /// `[T]`: the row of each flat token in decode rows followed by the prefills' tokens.
    pub order: Array,
    /// Per KV-cache group (empty for attention groups): `[R + P]` read and write blocks, decode
    /// rows then prefills.
    pub read: Vec<Option<Array>>,
    pub write: Vec<Option<Array>>,
}

pub struct StatePrefill {
    /// First flat token and number of tokens.
    pub offset: usize,
    pub len: usize,
    /// The chunk continues a state (the request has tokens before it).
    pub continues: bool,
}

/// Image rows that replace the token embeddings of the step's placeholder tokens.
pub struct ImageRows {
    /// `[K, hidden]`: the rows, in flat-token order.
    pub rows: Array,
    /// `[T]`: for each flat token, its row in `[token embeddings; rows]` (t, or T + k).
    pub select: Array,
}

pub struct StepBatch {
    /// Present when a chunk carries images.
    pub images: Option<ImageRows>,
    /// `[3, T]` M-RoPE positions (t, h, w) when a chunk carries images; absent, every row is
    /// `positions`.
    pub mrope_positions: Option<Array>,
    /// Present when the model has linear-attention layers.
    pub states: Option<StateBatch>,
    pub num_tokens: usize,
    pub token_ids: Array,
    pub positions: Array,
    /// `[T]` per KV-cache group: the cache slot of each token's K/V.
    pub slots: Vec<Array>,
    /// `[T]`: each token's request length at the end of this step's chunk.
    pub seq_ends: Array,
    pub query_groups: Vec<QueryGroup>,
    /// `[T]`: row of each flat token in the concatenated padded group outputs.
    pub out_index: Array,
    /// One group whose padded rows are the flat tokens in order: `q_index` and `out_index` are
    /// the identity and need no gather.
    pub identity: bool,
}

impl StepBatch {
    /// Decode chunks (one token) share one group; each prefill chunk gets its own, so a long
    /// prompt does not pad every decode row to its length. `window`: the sliding window of the
    /// model's local layers, if it has any. `backend`: with `PageKernel`, decode attention reads the
    /// pages itself, so the decode group needs only its block tables and lengths. `block_sizes`:
    /// the tokens per block of each KV-cache group; `kv_groups`: what each group's tables serve.
    pub fn build(
        chunks: &[SeqChunk],
        block_sizes: &[usize],
        window: Option<usize>,
        backend: AttentionBackend,
        kv_groups: &KvGroups,
    ) -> Result<Self> {
        let num_kv_groups = chunks.first().map_or(block_sizes.len(), |c| c.block_ids.len());
        if num_kv_groups != block_sizes.len() {
            bail!("batch has {num_kv_groups} block tables per request, the KV cache {} groups", block_sizes.len());
        }
        let is_state = |g: usize| !kv_groups.attention(g);
        let mut token_ids = Vec::new();
        let mut positions = Vec::new();
        let mut seq_ends = Vec::new();
        let mut slots = vec![Vec::new(); num_kv_groups];
        let mut offsets = Vec::with_capacity(chunks.len());
        let any_images = chunks.iter().any(|c| c.images.is_some());
        let mut mrope: [Vec<i32>; 3] = Default::default();
        let mut image_rows = Vec::new();
        let mut image_select = Vec::new();
        for (r, c) in chunks.iter().enumerate() {
            if c.tokens.is_empty() {
                bail!("batch entry {r} has no tokens");
            }
            offsets.push(token_ids.len());
            let end = c.start + c.tokens.len();
            if c.block_ids.len() != num_kv_groups {
                bail!("batch entry {r} has {} block tables, entry 0 has {num_kv_groups}", c.block_ids.len());
            }
            for (g, (table, bs)) in c.block_ids.iter().zip(block_sizes).enumerate() {
                if let Some(sbs) = kv_groups.state(g) {
                    if (end - 1) / sbs >= table.len() {
                        bail!("batch entry {r}: position {} needs state block column {}, block table has {}", end - 1, (end - 1) / sbs, table.len());
                    }
                }
                let pages = end.div_ceil(*bs);
                if !is_state(g) && pages > table.len() {
                    bail!(
                        "batch entry {r}: positions up to {end} need {pages} blocks, block table has {}",
                        table.len()
                    );
                }
            }
            if let Some(img) = c.images {
                let rows = img.rows_in(c.start, end);
                if !rows.is_empty() {
                    let idx: Vec<i32> = rows.clone().map(|k| k as i32).collect();
                    image_rows.push(img.embeds.take_axis(&Array::from_slice(&idx, &[idx.len() as i32]), 0)?);
                    image_select.extend(rows.map(|k| token_ids.len() + img.positions.placeholders[k] - c.start));
                }
            }
            for (i, &t) in c.tokens.iter().enumerate() {
                let p = c.start + i;
                if any_images {
                    let at = c.images.map_or([p as i32; 3], |img| img.positions.at(p));
                    for (row, v) in mrope.iter_mut().zip(at) {
                        row.push(v);
                    }
                }
                token_ids.push(t);
                positions.push(p as i32);
                seq_ends.push(end as i32);
                for (g, table) in c.block_ids.iter().enumerate() {
                    let bs = block_sizes[g];
                    slots[g].push(if is_state(g) { 0 } else { table[p / bs] * bs as i32 + (p % bs) as i32 });
                }
            }
        }
        let decode: Vec<usize> = (0..chunks.len()).filter(|&r| chunks[r].tokens.len() == 1).collect();
        let mut members: Vec<Vec<usize>> = Vec::new();
        if !decode.is_empty() {
            members.push(decode);
        }
        members.extend((0..chunks.len()).filter(|&r| chunks[r].tokens.len() > 1).map(|r| vec![r]));

        let mut out_index = vec![0i32; token_ids.len()];
        let mut groups = Vec::with_capacity(members.len());
        let mut row_base = 0usize;
        for m in &members {
            let q = m.iter().map(|&r| chunks[r].tokens.len()).max().unwrap();
            let mut q_index = Vec::with_capacity(m.len() * q);
            let mut q_pos = Vec::with_capacity(m.len() * q);
            for (row, &r) in m.iter().enumerate() {
                let c = &chunks[r];
                let n = c.tokens.len();
                for i in 0..q {
                    let i_real = i.min(n - 1);
                    q_index.push((offsets[r] + i_real) as i32);
                    q_pos.push((c.start + i_real) as i32);
                }
                for i in 0..n {
                    out_index[offsets[r] + i] = (row_base + row * q + i) as i32;
                }
            }
            let (rq, qi) = (m.len() as i32, q as i32);
            let qpos = Array::from_slice(&q_pos, &[rq, 1, qi, 1]);
            let group_backend = backend.for_group(q);
            let in_place = group_backend == AttentionBackend::PageKernel;
            // Pages: all of them, or from the first page the window reaches (whose keys must also
            // be inside the window).
            let pages_from = |first: &dyn Fn(usize) -> usize, g: usize, window: Option<usize>| -> Result<Pages> {
                let block_size = block_sizes[g];
                let firsts: Vec<usize> = m.iter().map(|&r| first(r)).collect();
                let ends: Vec<usize> =
                    m.iter().map(|&r| (chunks[r].start + chunks[r].tokens.len()).div_ceil(block_size)).collect();
                let pn = firsts.iter().zip(&ends).map(|(f, e)| e - f).max().unwrap();
                let mut table = Vec::with_capacity(m.len() * pn);
                for (row, &r) in m.iter().enumerate() {
                    let (f, e) = (firsts[row], ends[row]);
                    table.extend_from_slice(&chunks[r].block_ids[g][f..e]);
                    table.extend(std::iter::repeat(0).take(pn - (e - f)));
                }
                let block_table = Array::from_slice(&table, &[rq * pn as i32]);
                if in_place {
                    return Ok(Pages { max_pages: pn as i32, block_table, mask: None });
                }
                // Padding pages get positions past the request's end: masked as future keys.
                let mut kpos = Vec::with_capacity(m.len() * pn * block_size);
                for &f in &firsts {
                    kpos.extend((0..pn * block_size).map(|j| (f * block_size + j) as i32));
                }
                let kpos = Array::from_slice(&kpos, &[rq, 1, 1, (pn * block_size) as i32]);
                let mut mask = kpos.le(&qpos)?;
                if let Some(w) = window {
                    mask = mask.logical_and(&kpos.gt(qpos.subtract(Array::from_int(w as i32))?)?)?;
                }
                Ok(Pages { max_pages: pn as i32, block_table, mask: Some(mask) })
            };
            let ends: Vec<usize> = m.iter().map(|&r| chunks[r].start + chunks[r].tokens.len()).collect();
            let same_len = ends.iter().all(|&e| e == ends[0]) && m.iter().all(|&r| chunks[r].tokens.len() == q);
            let mut pages = Vec::with_capacity(num_kv_groups);
            for (g, &block_size) in block_sizes.iter().enumerate() {
                if is_state(g) {
                    pages.push(GroupPages::unused());
                    continue;
                }
                let full = pages_from(&|_| 0, g, None)?;
                let exact = (same_len && !in_place).then(|| {
                    let len = ends[0];
                    let mut slots = Vec::with_capacity(m.len() * len);
                    for &r in m {
                        let ids = &chunks[r].block_ids[g];
                        slots.extend((0..len).map(|p| ids[p / block_size] * block_size as i32 + (p % block_size) as i32));
                    }
                    Exact { len: len as i32, slots: Array::from_slice(&slots, &[rq * len as i32]) }
                });
                let window = match window {
                    Some(w) if !in_place => {
                        let first = |r: usize| (chunks[r].start + 1).saturating_sub(w) / block_size;
                        Some(pages_from(&first, g, Some(w))?)
                    }
                    _ => None,
                };
                pages.push(GroupPages { full, exact, window });
            }
            let seq_lens: Vec<i32> = ends.iter().map(|&e| e as i32).collect();
            groups.push(QueryGroup {
                num_seqs: rq,
                max_q: qi,
                backend: group_backend,
                q_index: Array::from_slice(&q_index, &[rq * qi]),
                seq_lens: Array::from_slice(&seq_lens, &[rq]),
                pages,
            });
            row_base += m.len() * q;
        }
        let t = token_ids.len() as i32;
        let identity = groups.len() == 1 && row_base == token_ids.len();
        let states = if kv_groups.state_block_size.iter().any(Option::is_some) {
            Some(StateBatch::build(chunks, &offsets, kv_groups)?)
        } else {
            None
        };
        let images = if image_rows.is_empty() {
            None
        } else {
            let mut select: Vec<i32> = (0..t).collect();
            for (k, &flat) in image_select.iter().enumerate() {
                select[flat] = t + k as i32;
            }
            let rows = if image_rows.len() == 1 { image_rows.pop().unwrap() } else { mlx_rs::ops::concatenate(&image_rows, 0)? };
            Some(ImageRows { rows, select: Array::from_slice(&select, &[t]) })
        };
        let mrope_positions = any_images.then(|| Array::from_slice(&mrope.concat(), &[3, t]));
        Ok(Self {
            images,
            mrope_positions,
            states,
            num_tokens: token_ids.len(),
            token_ids: Array::from_slice(&token_ids, &[t]),
            positions: Array::from_slice(&positions, &[t]),
            slots: slots.iter().map(|s| Array::from_slice(s, &[t])).collect(),
            seq_ends: Array::from_slice(&seq_ends, &[t]),
            query_groups: groups,
            out_index: Array::from_slice(&out_index, &[t]),
            identity,
        })
    }
}

impl GroupPages {
    /// The pages of a state group: attention never reads them.
    fn unused() -> Self {
        let empty = Pages { max_pages: 0, block_table: Array::from_slice::<i32>(&[], &[0]), mask: None };
        Self { full: empty, exact: None, window: None }
    }
}

impl StateBatch {
    fn build(chunks: &[SeqChunk], offsets: &[usize], groups: &KvGroups) -> Result<Self> {
        let decode: Vec<usize> = (0..chunks.len()).filter(|&r| chunks[r].tokens.len() == 1).collect();
        let prefill: Vec<usize> = (0..chunks.len()).filter(|&r| chunks[r].tokens.len() > 1).collect();
        let rows: Vec<usize> = decode.iter().chain(&prefill).copied().collect();
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut order = vec![0i32; total];
        let mut row = 0usize;
        for &r in &decode {
            order[offsets[r]] = row as i32;
            row += 1;
        }
        for &r in &prefill {
            for i in 0..chunks[r].tokens.len() {
                order[offsets[r] + i] = (row + i) as i32;
            }
            row += chunks[r].tokens.len();
        }
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for g in 0..groups.state_block_size.len() {
            let Some(sbs) = groups.state(g) else {
                read.push(None);
                write.push(None);
                continue;
            };
            let (mut rd, mut wr) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
            for &r in &rows {
                let c = &chunks[r];
                let table = &c.block_ids[g];
                let end = c.start + c.tokens.len();
                // A first chunk reads nothing: any block will do (its state is multiplied by 0).
                rd.push(table[c.start.saturating_sub(1) / sbs]);
                wr.push(table[(end - 1) / sbs]);
            }
            read.push(Some(Array::from_slice(&rd, &[rows.len() as i32])));
            write.push(Some(Array::from_slice(&wr, &[rows.len() as i32])));
        }
        let (decode_tokens, decode_continues) = if decode.is_empty() {
            (None, None)
        } else {
            let toks: Vec<i32> = decode.iter().map(|&r| offsets[r] as i32).collect();
            let cont: Vec<f32> = decode.iter().map(|&r| if chunks[r].start > 0 { 1.0 } else { 0.0 }).collect();
            let n = decode.len() as i32;
            (Some(Array::from_slice(&toks, &[n])), Some(Array::from_slice(&cont, &[n])))
        };
        let prefills = prefill
            .iter()
            .map(|&r| StatePrefill { offset: offsets[r], len: chunks[r].tokens.len(), continues: chunks[r].start > 0 })
            .collect();
        Ok(Self { decode_tokens, decode_continues, prefills, order: Array::from_slice(&order, &[total as i32]), read, write })
    }
}
