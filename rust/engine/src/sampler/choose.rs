//! Token choice: greedy argmax, or temperature, min_p, top-k / top-p and a seeded draw (Gumbel-max
//! over counter-based noise, so a row's token does not depend on its batch).

use anyhow::Result;
use mlx_rs::{error::Exception, ops, ops::indexing::TryIndexOp, Array, Dtype};

use super::params::{Row, SamplingParams};
use super::processors::process_logits;
use crate::mlx_ext::fuse::fused;

/// SplitMix64: decorrelates (seed, step) pairs into PRNG keys.
pub fn mix_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `logits`: float32 `[R, V]`. Returns the chosen ids, int32 `[R]`.
pub fn sample(logits: &Array, rows: &[Row]) -> Result<Array> {
    Ok(choose(logits, rows, false)?.0)
}

/// The chosen ids, int32 `[R]`, and, when `processed`, the logits the choice was made from
/// (vLLM's "processed" logits): processed, then tempered and filtered.
pub fn choose(logits: &Array, rows: &[Row], processed: bool) -> Result<(Array, Option<Array>)> {
    let x = process_logits(logits, rows)?;
    let r = rows.len() as i32;
    let v = x.shape()[1];
    // Each row's token depends on its own parameters and key only, never on its batch: a greedy
    // row takes the argmax, a row with a top-k draws among its candidates, any other row over
    // the whole filtered vocabulary. Paths no row takes are not built.
    let filters: Vec<Filter> = rows.iter().map(|row| Filter::of(row.params, v)).collect();
    let path: Vec<i32> = rows
        .iter()
        .zip(&filters)
        .map(|(row, f)| if row.params.is_greedy() { 0 } else if f.top_k < v { 1 } else { 2 })
        .collect();
    let path_arr = Array::from_slice(&path, &[r]);
    let mut out: Option<Array> = None;
    let mut merge = |which: i32, ids: Array| -> Result<()> {
        out = Some(match out.take() {
            None => ids,
            Some(prev) => ops::select(&path_arr.eq(Array::from_int(which))?, &ids, &prev)?,
        });
        Ok(())
    };
    let keys: Vec<u64> = rows.iter().map(|row| row.key).collect();
    if path.contains(&0) {
        merge(0, ops::indexing::argmax_axis(&x, 1, false)?.as_dtype(Dtype::Int32)?)?;
    }
    if path.contains(&1) {
        // Gumbel-max over the candidates: the noise of a token depends only on (key, token),
        // so the draw does not depend on how many candidates the batch's largest top-k brings.
        let k_max = path.iter().zip(&filters).filter(|(&p, _)| p == 1).map(|(_, f)| f.top_k).max().unwrap();
        let cand = top_candidates(&x, k_max)?;
        let sorted = x.take_along_axis(&cand, 1)?;
        let rank = Array::from_iter(0..k_max, &[1, k_max]);
        let [t, m, k, p] = Filter::columns(&filters, k_max);
        let filtered = fused(filter_sorted, &[sorted, rank, t, m, k, p])?;
        let pick = gumbel_argmax(&filtered, &keys, TOKEN_STREAM, &cand)?;
        merge(1, cand.take_along_axis(&pick, 1)?.reshape(&[r])?)?;
    }
    if path.contains(&2) {
        // The top-k rows' filters are left out here: they would sort the whole vocabulary.
        let whole: Vec<Filter> = path.iter().zip(&filters).map(|(&p, &f)| if p == 2 { f } else { Filter::NONE }).collect();
        merge(2, draw_whole(&filter_rows(&x, &whole)?, &keys)?)?;
    }
    Ok((out.unwrap(), if processed { Some(filter_logits(&x, rows)?) } else { None }))
}

/// Tokens per block in the two-level searches over the vocabulary.
const BLOCK: i32 = 32;

const TOKEN_STREAM: u64 = 0x5EED;

const BLOCK_STREAM: u64 = 0xB10C;

/// `x` `[R, V]` padded with `fill` to whole blocks, as `[R, blocks, BLOCK]`.
fn blocks(x: &Array, fill: f32) -> Result<Array> {
    let (r, v) = (x.shape()[0], x.shape()[1]);
    let nb = (v + BLOCK - 1) / BLOCK;
    let x = if nb * BLOCK == v {
        x.clone()
    } else {
        let pad = ops::full::<f32>(&[r, nb * BLOCK - v], Array::from_f32(fill))?.as_dtype(x.dtype())?;
        ops::concatenate(&[x.clone(), pad], 1)?
    };
    Ok(x.reshape(&[r, nb, BLOCK])?)
}

/// The token ids of blocks `b` (`[R, n]`): `[R, n * BLOCK]`.
fn block_tokens(b: &Array) -> Result<Array> {
    let (r, n) = (b.shape()[0], b.shape()[1]);
    let within = Array::from_iter(0..BLOCK, &[1, 1, BLOCK]);
    Ok(b.as_dtype(Dtype::Int32)?.reshape(&[r, n, 1])?.multiply(Array::from_int(BLOCK))?.add(within)?.reshape(&[r, n * BLOCK])?)
}

/// The `k` best token ids of each row, best first, int32 `[R, k]`. Each of the k best tokens
/// lies in a block whose maximum is among the k largest block maxima, so only the tokens of
/// those k blocks are sorted, not the whole vocabulary (a full partition is a sort on some
/// backends).
pub(super) fn top_candidates(x: &Array, k: i32) -> Result<Array> {
    let (r, v) = (x.shape()[0], x.shape()[1]);
    let neg = x.negative()?; // ascending order = best first
    if k * BLOCK * 4 <= v {
        let b = blocks(&neg, f32::INFINITY)?;
        let best_blocks = ops::argpartition_axis(&b.min_axis(2, false)?, k - 1, 1)?.try_index((.., ..k))?;
        let ids = block_tokens(&best_blocks)?;
        let pool = b.reshape(&[r, -1])?.take_along_axis(&ids, 1)?;
        let best = ops::argsort_axis(&pool, 1)?.try_index((.., ..k))?;
        return Ok(ids.take_along_axis(&best, 1)?);
    }
    let part = ops::argpartition_axis(&neg, k - 1, 1)?.try_index((.., ..k))?;
    let order = ops::argsort_axis(neg.take_along_axis(&part, 1)?, 1)?;
    Ok(part.take_along_axis(&order, 1)?.as_dtype(Dtype::Int32)?)
}

/// One draw per row from softmax(`logits`) (-inf: excluded), by Gumbel-max in two levels: a
/// block by its total mass, then a token inside it. The same distribution as one Gumbel-max
/// over the vocabulary, with noise for V/32 blocks and 32 tokens per row instead of V.
fn draw_whole(logits: &Array, keys: &[u64]) -> Result<Array> {
    let r = logits.shape()[0];
    let b = blocks(logits, f32::NEG_INFINITY)?;
    let nb = b.shape()[1];
    let mass = b.logsumexp_axis(2, false)?;
    // A block with nothing allowed has no mass (-inf), whatever a backend makes of -inf - -inf.
    let mass = ops::select(&mass.is_nan()?, Array::from_f32(f32::NEG_INFINITY), &mass)?;
    let pick = gumbel_argmax(&mass, keys, BLOCK_STREAM, &Array::from_iter(0..nb, &[1, nb]))?;
    let ids = block_tokens(&pick)?;
    let vals = b.reshape(&[r, -1])?.take_along_axis(&ids, 1)?;
    let t = gumbel_argmax(&vals, keys, TOKEN_STREAM, &ids)?;
    Ok(ids.take_along_axis(&t, 1)?.reshape(&[r])?)
}

/// argmax(`scores` + Gumbel noise of `ids` in `stream`), `[R, 1]`: a draw from softmax(scores).
fn gumbel_argmax(scores: &Array, keys: &[u64], stream: u64, ids: &Array) -> Result<Array> {
    // The generator wants keys with well-spread bits; callers may pass small integers.
    let mixed: Vec<u64> = keys.iter().map(|&k| mix_seed(k, stream) | 1).collect();
    let key = Array::from_slice(&mixed, &[keys.len() as i32, 1]);
    fused(gumbel_argmax_of, &[scores.clone(), key, ids.clone()])
}

/// argmax(scores + Gumbel noise(key, ids)) over axis 1, `[R, 1]`.
pub(super) fn gumbel_argmax_of(a: &[Array]) -> std::result::Result<Array, Exception> {
    ops::indexing::argmax_axis(a[0].add(squares_gumbel(&a[1], &a[2])?)?, 1, true)
}

/// Gumbel noise of uint64 `key` `[R, 1]` and token `ids`, elementwise: uniforms from a
/// counter-based generator (Widynski's "squares", 64-bit wrapping arithmetic) of (key, id) —
/// one batch of elementwise ops for all rows instead of a PRNG call each.
fn squares_gumbel(key: &Array, ids: &Array) -> std::result::Result<Array, Exception> {
    let u64c = |c: u64| Array::from_slice(&[c], &[1]);
    let two32 = u64c(1 << 32);
    // Rotate by 32 bits: the halves do not overlap, so adding them is or-ing them.
    let rot = |x: &Array| -> std::result::Result<Array, Exception> { x.floor_divide(&two32)?.add(x.multiply(&two32)?) };
    let ctr = ids.as_dtype(Dtype::Uint64)?.add(u64c(1))?;
    let y = ctr.multiply(key)?;
    let z = y.add(key)?;
    let mut x = rot(&y.multiply(&y)?.add(&y)?)?;
    x = rot(&x.multiply(&x)?.add(&z)?)?;
    x = rot(&x.multiply(&x)?.add(&y)?)?;
    let bits = x.multiply(&x)?.add(&z)?.floor_divide(u64c(1 << 40))?; // top 24 bits
    let u = bits.as_dtype(Dtype::Float32)?.add(Array::from_f32(0.5))?.multiply(Array::from_f32(1.0 / (1u32 << 24) as f32))?;
    u.log()?.negative()?.log()?.negative()
}

/// `filter_rows` for rows of candidates sorted in descending order (`[R, K]`, K <= every
/// drawing row's top_k), `rank` = `[[0, 1, .., K-1]]`, then `Filter::columns`: temperature,
/// min_p relative to the best candidate, top-k, top-p.
pub(super) fn filter_sorted(a: &[Array]) -> std::result::Result<Array, Exception> {
    let [sorted, rank, temperature, ln_min_p, top_k, top_p] = a else { unreachable!("filter_sorted takes 6 arrays") };
    let neg_inf = Array::from_f32(f32::NEG_INFINITY);
    let x = sorted.divide(temperature)?;
    // As in `filter_rows`; the first candidate is the max.
    let floor = x.max_axis(1, true)?.add(ln_min_p)?;
    let keep = x.ge(&floor)?.logical_and(&rank.lt(top_k)?)?;
    let x = ops::select(&keep, &x, &neg_inf)?;
    // A candidate stays while the mass of better candidates is below top_p.
    let probs = ops::softmax_axis(&x, 1, None)?;
    let before = probs.cumsum(1, None, None)?.subtract(&probs)?;
    ops::select(&before.lt(top_p)?, &x, &neg_inf)
}

/// One row's draw filters as `filter_rows` applies them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Filter {
    pub(super) temperature: f32,
    pub(super) min_p: f32,
    /// >= V: off.
    pub(super) top_k: i32,
    pub(super) top_p: f32,
}

impl Filter {
    const NONE: Self = Self { temperature: 1.0, min_p: 0.0, top_k: i32::MAX, top_p: 1.0 };

    /// `[R, 1]` columns for `filter_sorted` over `k` candidates: temperature, ln(min_p) (-inf:
    /// off), top-k, top-p (+inf: off) — filters that are off pass everything, so one graph
    /// serves every batch.
    pub(super) fn columns(filters: &[Self], k: i32) -> [Array; 4] {
        let col = |f: &dyn Fn(&Self) -> f32| Array::from_slice(&filters.iter().map(f).collect::<Vec<f32>>(), &[filters.len() as i32, 1]);
        [
            col(&|f| f.temperature),
            col(&|f| if f.min_p > 0.0 { f.min_p.ln() } else { f32::NEG_INFINITY }),
            col(&|f| f.top_k.min(k) as f32),
            col(&|f| if f.top_p < 1.0 { f.top_p } else { f32::INFINITY }),
        ]
    }

    /// Greedy rows get temperature 1.
    fn of(p: &SamplingParams, v: i32) -> Self {
        Self {
            temperature: if p.is_greedy() { 1.0 } else { p.temperature },
            min_p: p.min_p,
            top_k: if p.top_k > 0 && p.top_k < v { p.top_k } else { v },
            top_p: p.top_p,
        }
    }
}

/// The distribution a random draw uses, as logits (-inf where filtered): processed logits divided
/// by the temperature, then min_p, then top-k and top-p (vLLM's order). Greedy rows get
/// temperature 1.
pub fn filter_logits(processed: &Array, rows: &[Row]) -> Result<Array> {
    let v = processed.shape()[1];
    filter_rows(processed, &rows.iter().map(|row| Filter::of(row.params, v)).collect::<Vec<_>>())
}

fn filter_rows(processed: &Array, filters: &[Filter]) -> Result<Array> {
    let r = filters.len() as i32;
    let v = processed.shape()[1];
    let neg_inf = Array::from_f32(f32::NEG_INFINITY);
    let col = |f: &dyn Fn(&Filter) -> f32| Array::from_slice(&filters.iter().map(f).collect::<Vec<f32>>(), &[r, 1]);
    let mut x = processed.divide(col(&|f| f.temperature))?;

    if filters.iter().any(|f| f.min_p > 0.0) {
        // p >= min_p * p_max  <=>  x >= x_max + ln(min_p): no softmax needed.
        let floor = x.max_axis(1, true)?.add(col(&|f| if f.min_p > 0.0 { f.min_p.ln() } else { f32::NEG_INFINITY }))?;
        x = ops::select(&x.lt(&floor)?, &neg_inf, &x)?;
    }

    let use_top_k = filters.iter().any(|f| f.top_k < v);
    let use_top_p = filters.iter().any(|f| f.top_p < 1.0);
    if use_top_k || use_top_p {
        let sorted = ops::sort_axis(x.negative()?, 1)?.negative()?; // descending
        let ks: Vec<i32> = filters.iter().map(|f| f.top_k.min(v)).collect();
        let k = Array::from_slice(&ks, &[r, 1]);
        // Smallest logit a row keeps: the k-th largest, then raised by top-p over those k (a
        // token stays while the mass of larger tokens is below top_p).
        let mut keep_from = k.subtract(Array::from_int(1))?;
        if use_top_p {
            let rank = Array::from_iter(0..v, &[1, v]);
            let in_k = ops::select(&rank.lt(&k)?, &sorted, &neg_inf)?;
            let probs = ops::softmax_axis(&in_k, 1, None)?;
            let before = probs.cumsum(1, None, None)?.subtract(&probs)?;
            let kept = before.lt(col(&|f| f.top_p))?.logical_and(&rank.lt(&k)?)?;
            let count = kept.as_dtype(Dtype::Int32)?.sum_axis(1, true)?;
            keep_from = ops::minimum(&keep_from, &count.subtract(Array::from_int(1))?)?;
        }
        let threshold = sorted.take_along_axis(&keep_from, 1)?;
        x = ops::select(&x.lt(&threshold)?, &neg_inf, &x)?;
    }
    Ok(x)
}
