//! Token choice for a batch of logits rows, on MLX, in vLLM's order: grammar bitmask, allowed
//! tokens, bad words, logit bias and min_tokens, penalties; then greedy argmax, or temperature,
//! min_p, top-k/top-p and a seeded draw. Also the logprobs vLLM reports.

use anyhow::{bail, ensure, Result};
use std::collections::HashMap;

use mlx_rs::{error::Exception, ops, ops::indexing::TryIndexOp, Array, Dtype};

use crate::mlx_ext::fuse::fused;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// <= 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// A seeded request draws from its own stream, independent of its batch.
    pub seed: Option<u64>,
    /// OpenAI-style: subtract `presence` once and `frequency` per occurrence in the output.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// > 1 discourages tokens of the prompt and the output (divides positive logits, multiplies
    /// negative ones).
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(i32, f32)>,
    pub allowed_token_ids: Option<Vec<i32>>,
    /// Token sequences never to complete: the last token is banned when the output ends with the rest.
    pub bad_words: Vec<Vec<i32>>,
    /// EOS and stop tokens are masked until the output has this many tokens.
    pub min_tokens: usize,
    pub stop_token_ids: Vec<i32>,
    /// Top logprobs to report per sampled token (`Some(0)`: the sampled token's only; -1: all).
    pub logprobs: Option<i32>,
    /// Top logprobs to report per prompt position.
    pub prompt_logprobs: Option<i32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// Reads the request's tokens on the host (not only their count).
    pub fn needs_history(&self) -> bool {
        self.has_penalties() || !self.bad_words.is_empty()
    }

    fn has_masks(&self, output_len: usize) -> bool {
        self.allowed_token_ids.is_some()
            || !self.bad_words.is_empty()
            || !self.logit_bias.is_empty()
            || output_len < self.min_tokens
    }
}

/// One row of the batch to sample: its parameters, the PRNG key seed of this draw, and the
/// request's tokens so far.
pub struct Row<'a> {
    pub params: &'a SamplingParams,
    pub key: u64,
    pub prompt: &'a [i32],
    pub output: &'a [i32],
    /// The distinct tokens of `prompt` and `output`, when the caller keeps them up to date;
    /// counted here otherwise.
    pub counts: Option<&'a TokenCounts>,
}

/// A request's distinct tokens, for the penalties: occurrences in the output, presence in the
/// prompt. Extended as the request grows, so a step costs the new tokens, not the whole history.
#[derive(Debug, Clone, Default)]
pub struct TokenCounts {
    tokens: Vec<i32>,
    in_output: Vec<f32>,
    in_prompt: Vec<bool>,
    index: HashMap<i32, usize>,
    num_prompt: usize,
    counted: usize,
}

impl TokenCounts {
    pub fn of(prompt: &[i32], output: &[i32]) -> Self {
        let mut c = Self::default();
        c.update(prompt, output);
        c
    }

    /// Counts the tokens added since the last call.
    pub fn update(&mut self, prompt: &[i32], output: &[i32]) {
        if self.num_prompt != prompt.len() || self.counted > prompt.len() + output.len() {
            *self = Self { num_prompt: prompt.len(), ..Self::default() };
        }
        for (i, &t) in prompt.iter().chain(output).enumerate().skip(self.counted) {
            let e = *self.index.entry(t).or_insert_with(|| {
                self.tokens.push(t);
                self.in_output.push(0.0);
                self.in_prompt.push(false);
                self.tokens.len() - 1
            });
            if i < self.num_prompt {
                self.in_prompt[e] = true;
            } else {
                self.in_output[e] += 1.0;
            }
        }
        self.counted = prompt.len() + output.len();
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// What reported logprobs are computed from (vLLM's `logprobs_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogprobsMode {
    /// log_softmax of the model's logits, before any processing (vLLM's default).
    #[default]
    RawLogprobs,
    RawLogits,
    /// log_softmax of the logits a draw uses: processed, tempered, min_p / top-k / top-p filtered.
    ProcessedLogprobs,
    ProcessedLogits,
}

impl std::str::FromStr for LogprobsMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "raw_logprobs" => Self::RawLogprobs,
            "raw_logits" => Self::RawLogits,
            "processed_logprobs" => Self::ProcessedLogprobs,
            "processed_logits" => Self::ProcessedLogits,
            other => bail!(
                "unknown logprobs_mode {other:?}: expected raw_logprobs, raw_logits, \
                 processed_logprobs or processed_logits"
            ),
        })
    }
}

impl LogprobsMode {
    pub fn is_processed(self) -> bool {
        matches!(self, Self::ProcessedLogprobs | Self::ProcessedLogits)
    }

    /// The reported scores of `logits` rows: log-probabilities, or the logits themselves.
    pub fn scores(self, logits: &Array) -> Result<Array> {
        Ok(match self {
            Self::RawLogprobs | Self::ProcessedLogprobs => log_softmax(logits)?,
            Self::RawLogits | Self::ProcessedLogits => logits.clone(),
        })
    }
}

/// Row-wise log_softmax in float32.
pub fn log_softmax(x: &Array) -> Result<Array> {
    Ok(x.subtract(x.logsumexp_axis(1, true)?)?)
}

/// The top `k` scores of each row after the target token's: ids and scores `[R, 1 + k]` with the
/// target first, then the k best in descending order; and the target's rank `[R]`, counted as
/// vLLM does (tokens scoring at least as high, the target included). `k` < 0 means every token.
pub struct TopLogprobs {
    pub token_ids: Array,
    pub scores: Array,
    pub ranks: Array,
}

pub fn gather_logprobs(scores: &Array, k: i32, targets: &Array) -> Result<TopLogprobs> {
    let r = scores.shape()[0];
    let v = scores.shape()[1];
    let k = if k < 0 { v } else { k.min(v) };
    let targets = targets.as_dtype(Dtype::Int32)?.reshape(&[r, 1])?;
    let target_scores = scores.take_along_axis(&targets, 1)?;
    let ranks = scores.ge(&target_scores)?.as_dtype(Dtype::Int32)?.sum_axis(1, false)?;
    if k == 0 {
        return Ok(TopLogprobs { token_ids: targets, scores: target_scores, ranks });
    }
    let top = top_candidates(scores, k)?;
    let top_scores = scores.take_along_axis(&top, 1)?;
    Ok(TopLogprobs {
        token_ids: ops::concatenate(&[targets, top], 1)?,
        scores: ops::concatenate(&[target_scores, top_scores], 1)?,
        ranks,
    })
}

/// vLLM's structured-output bitmask for some rows: bit `t % 32` of word `t / 32` allows token `t`.
/// Returns the additive mask `[rows.len(), vocab]` (0 allowed, -inf banned) for the rows given by
/// `rows` (row index in the batch, its bitmask words); other rows stay 0.
pub fn bitmask_to_additive(num_rows: usize, vocab: usize, rows: &[(usize, &[i32])]) -> Result<Array> {
    let mut add = vec![0f32; num_rows * vocab];
    for &(i, words) in rows {
        ensure!(i < num_rows, "grammar bitmask row {i} outside a batch of {num_rows}");
        ensure!(
            words.len() * 32 >= vocab,
            "grammar bitmask covers {} tokens, the model has {vocab}",
            words.len() * 32
        );
        let line = &mut add[i * vocab..(i + 1) * vocab];
        for (t, slot) in line.iter_mut().enumerate() {
            if (words[t >> 5] as u32 >> (t & 31)) & 1 == 0 {
                *slot = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Array::from_slice(&add, &[num_rows as i32, vocab as i32]))
}

/// SplitMix64: decorrelates (seed, step) pairs into PRNG keys.
pub fn mix_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Logits after the processors that also change greedy choices (vLLM's order): allowed tokens,
/// bad words, logit bias, min_tokens, then repetition / frequency / presence penalties.
pub fn process_logits(logits: &Array, rows: &[Row]) -> Result<Array> {
    let r = rows.len();
    let v = logits.shape()[1] as usize;
    let mut x = logits.clone();

    if rows.iter().any(|row| row.params.has_masks(row.output.len())) {
        // One dense additive matrix: 0, -inf for masked tokens, the bias otherwise.
        let mut add = vec![0f32; r * v];
        for (i, row) in rows.iter().enumerate() {
            let p = row.params;
            let line = &mut add[i * v..(i + 1) * v];
            let mut ban = |t: i32| {
                if let Some(slot) = usize::try_from(t).ok().and_then(|t| line.get_mut(t)) {
                    *slot = f32::NEG_INFINITY;
                }
            };
            if let Some(allowed) = &p.allowed_token_ids {
                let keep: std::collections::HashSet<i32> = allowed.iter().copied().collect();
                for t in 0..v as i32 {
                    if !keep.contains(&t) {
                        ban(t);
                    }
                }
            }
            for word in &p.bad_words {
                let Some((&last, prefix)) = word.split_last() else { continue };
                if prefix.len() <= row.output.len() && row.output.ends_with(prefix) {
                    ban(last);
                }
            }
            if row.output.len() < p.min_tokens {
                for &t in &p.stop_token_ids {
                    ban(t);
                }
            }
            for &(t, b) in &p.logit_bias {
                if let Some(slot) = usize::try_from(t).ok().and_then(|t| line.get_mut(t)) {
                    *slot += b;
                }
            }
        }
        x = x.add(Array::from_slice(&add, &[r as i32, v as i32]))?;
    }

    if rows.iter().any(|row| row.params.has_penalties()) {
        // Only the tokens a row has seen change: gather them, penalise, scatter back — `[R, U]`
        // work for U distinct tokens instead of dense `[R, V]` counts.
        let counted: Vec<Option<TokenCounts>> = rows
            .iter()
            .map(|row| (row.params.has_penalties() && row.counts.is_none()).then(|| TokenCounts::of(row.prompt, row.output)))
            .collect();
        let entries: Vec<Vec<(i32, f32, bool)>> = rows
            .iter()
            .zip(&counted)
            .map(|(row, own)| match row.counts.or(own.as_ref()).filter(|_| row.params.has_penalties()) {
                Some(c) => (0..c.len())
                    .filter(|&e| (c.tokens[e] as usize) < v)
                    .map(|e| (c.tokens[e], c.in_output[e], c.in_prompt[e] || c.in_output[e] > 0.0))
                    .collect(),
                None => Vec::new(),
            })
            .collect();
        let u = entries.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // Short rows repeat their last entry (the same value written twice); a row with none
        // rewrites token 0 unchanged (not seen, no occurrences).
        let (mut idx, mut occ, mut seen) = (vec![0i32; r * u], vec![0f32; r * u], vec![0f32; r * u]);
        for (i, e) in entries.iter().enumerate() {
            for j in 0..if e.is_empty() { 0 } else { u } {
                let (t, o, s) = e[j.min(e.len() - 1)];
                (idx[i * u + j], occ[i * u + j], seen[i * u + j]) = (t, o, s as i32 as f32);
            }
        }
        let shape = [r as i32, u as i32];
        let idx = Array::from_slice(&idx, &shape);
        let col = |f: &dyn Fn(&SamplingParams) -> f32| -> Array {
            Array::from_slice(&rows.iter().map(|row| f(row.params)).collect::<Vec<f32>>(), &[r as i32, 1])
        };
        let args = [
            x.take_along_axis(&idx, 1)?,
            Array::from_slice(&occ, &shape),
            Array::from_slice(&seen, &shape),
            col(&|p| p.repetition_penalty),
            col(&|p| p.frequency_penalty),
            col(&|p| p.presence_penalty),
        ];
        let g = fused(penalise, &args)?;
        x = x.put_along_axis(&idx, &g, 1)?;
    }
    Ok(x)
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
fn top_candidates(x: &Array, k: i32) -> Result<Array> {
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
fn gumbel_argmax_of(a: &[Array]) -> std::result::Result<Array, Exception> {
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

/// Penalised values `g` of the tokens a row has seen (`[R, U]`): repetition where `seen`,
/// frequency per output occurrence `occ`, presence once; `rep`, `freq`, `pres`: `[R, 1]`.
/// (Per-row parameters come as separate columns: a compiled function's slice or gather of one
/// packed array would fix the batch size.)
fn penalise(a: &[Array]) -> std::result::Result<Array, Exception> {
    let [g, occ, seen, rep, freq, pres] = a else { unreachable!("penalise takes 6 arrays") };
    let zero = Array::from_f32(0.0);
    let penalised = ops::select(&g.gt(&zero)?, &g.divide(rep)?, &g.multiply(rep)?)?;
    ops::select(&seen.gt(&zero)?, &penalised, g)?
        .subtract(freq.multiply(occ)?)?
        .subtract(pres.multiply(occ.gt(&zero)?.as_dtype(Dtype::Float32)?)?)
}

/// `filter_rows` for rows of candidates sorted in descending order (`[R, K]`, K <= every
/// drawing row's top_k), `rank` = `[[0, 1, .., K-1]]`, then `Filter::columns`: temperature,
/// min_p relative to the best candidate, top-k, top-p.
fn filter_sorted(a: &[Array]) -> std::result::Result<Array, Exception> {
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
struct Filter {
    temperature: f32,
    min_p: f32,
    /// >= V: off.
    top_k: i32,
    top_p: f32,
}

impl Filter {
    const NONE: Self = Self { temperature: 1.0, min_p: 0.0, top_k: i32::MAX, top_p: 1.0 };

    /// `[R, 1]` columns for `filter_sorted` over `k` candidates: temperature, ln(min_p) (-inf:
    /// off), top-k, top-p (+inf: off) — filters that are off pass everything, so one graph
    /// serves every batch.
    fn columns(filters: &[Self], k: i32) -> [Array; 4] {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn probs_logits() -> Array {
        // Two identical rows over 6 tokens with probabilities .4 .25 .15 .1 .06 .04
        let p = [0.4f32, 0.25, 0.15, 0.1, 0.06, 0.04];
        let l: Vec<f32> = p.iter().chain(p.iter()).map(|x| x.ln()).collect();
        Array::from_slice(&l, &[2, 6])
    }

    fn row(params: &SamplingParams, key: u64) -> Row<'_> {
        Row { params, key, prompt: &[], output: &[], counts: None }
    }

    fn draw(params: &SamplingParams, n: u64) -> Vec<usize> {
        let logits = probs_logits();
        let mut counts = vec![0usize; 6];
        for i in 0..n {
            let rows = [row(params, mix_seed(7, 2 * i)), row(params, mix_seed(7, 2 * i + 1))];
            let t: Vec<i32> = sample(&logits, &rows).unwrap().as_slice::<i32>().to_vec();
            for x in t {
                counts[x as usize] += 1;
            }
        }
        counts
    }

    #[test]
    fn greedy_is_argmax() {
        let p = SamplingParams::default();
        let out = sample(&probs_logits(), &[row(&p, 0), row(&p, 1)]).unwrap();
        assert_eq!(out.as_slice::<i32>(), &[0, 0]);
    }

    #[test]
    fn top_k_and_top_p_never_pick_filtered_tokens() {
        let k2 = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let c = draw(&k2, 300);
        assert!(c[2..].iter().all(|&x| x == 0), "top_k=2 drew {c:?}");
        assert!(c[0] > c[1] && c[1] > 0, "top_k=2 draws {c:?}");
        // top_p 0.7: .4 + .25 = .65 < .7, so the third token (.15) is still needed; the 4th is not.
        let p = SamplingParams { temperature: 1.0, top_p: 0.7, ..Default::default() };
        let c = draw(&p, 300);
        assert!(c[3..].iter().all(|&x| x == 0), "top_p=0.7 drew {c:?}");
        assert!(c[2] > 0, "top_p=0.7 should keep the third token: {c:?}");
    }

    #[test]
    fn seeded_draws_repeat() {
        let p = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
        assert_eq!(draw(&p, 20), draw(&p, 20));
    }

    #[test]
    fn gather_logprobs_puts_the_target_first_then_the_top_k() {
        let scores = Array::from_slice(&[0.1f32, 0.5, 0.3, 0.7, -1.0, 0.5, 0.2, 0.0], &[2, 4]);
        let targets = Array::from_slice(&[2i32, 3], &[2]);
        let t = gather_logprobs(&scores, 2, &targets).unwrap();
        assert_eq!(t.token_ids.as_slice::<i32>(), &[2, 3, 1, 3, 1, 2]);
        assert_eq!(t.scores.as_slice::<f32>(), &[0.3, 0.7, 0.5, 0.0, 0.5, 0.2]);
        // Rank: tokens scoring at least as high as the target, itself included.
        assert_eq!(t.ranks.as_slice::<i32>(), &[3, 3]);
        let all = gather_logprobs(&scores, -1, &targets).unwrap();
        assert_eq!(all.token_ids.shape(), &[2, 5]);
    }

    #[test]
    fn log_softmax_rows_sum_to_one() {
        let x = Array::from_slice(&[1.0f32, 2.0, 3.0, -50.0, 0.0, 50.0], &[2, 3]);
        let p = log_softmax(&x).unwrap().exp().unwrap().sum_axis(1, false).unwrap();
        for s in p.as_slice::<f32>() {
            assert!((s - 1.0).abs() < 1e-6, "{s}");
        }
    }

    #[test]
    fn bitmask_bans_unset_bits() {
        // Token t is allowed when bit t % 32 of word t / 32 is set; 40 tokens, two words.
        let words = [0b1010i32, 1 << 7]; // tokens 1, 3 and 39
        let add = bitmask_to_additive(2, 40, &[(1, &words[..])]).unwrap();
        let a = add.as_slice::<f32>();
        assert!(a[..40].iter().all(|&x| x == 0.0), "row 0 has no mask");
        let allowed: Vec<usize> = (0..40).filter(|&t| a[40 + t] == 0.0).collect();
        assert_eq!(allowed, vec![1, 3, 39]);
        assert!(bitmask_to_additive(1, 70, &[(0, &words[..])]).is_err(), "too short a mask");
    }

    #[test]
    fn top_k_rows_draw_the_same_over_candidates_or_the_whole_vocabulary() {
        // Rows with a top-k draw over candidates; adding a row without one adds the
        // whole-vocabulary path to the batch. The top-k rows must not notice.
        let v = 50;
        let l: Vec<f32> = (0..3 * v).map(|i| ((i * 37 % 101) as f32) / 17.0).collect();
        let logits = Array::from_slice(&l, &[3, v as i32]);
        let k5 = SamplingParams { temperature: 1.0, top_k: 5, top_p: 0.8, min_p: 0.05, ..Default::default() };
        let free = SamplingParams { temperature: 1.0, ..Default::default() };
        for key in 0..40u64 {
            let cand = sample(&logits, &[row(&k5, key), row(&k5, key + 1000), row(&k5, key + 2000)]).unwrap();
            let full = sample(&logits, &[row(&k5, key), row(&k5, key + 1000), row(&free, key + 2000)]).unwrap();
            assert_eq!(cand.as_slice::<i32>()[..2], full.as_slice::<i32>()[..2], "key {key}");
        }
    }

    #[test]
    fn top_candidates_are_the_k_best_through_blocks_or_not() {
        // 1000 tokens: k = 5 goes through the block search, k = 40 partitions the whole row.
        let v = 1000;
        let l: Vec<f32> = (0..2 * v).map(|i| ((i as u64 * 7919 % 10007) as f32).sin() * 10.0).collect();
        let x = Array::from_slice(&l, &[2, v as i32]);
        for k in [5, 40] {
            let got = top_candidates(&x, k).unwrap();
            for r in 0..2 {
                let row = &l[r * v..(r + 1) * v];
                let mut order: Vec<usize> = (0..v).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let want: Vec<i32> = order[..k as usize].iter().map(|&t| t as i32).collect();
                assert_eq!(got.as_slice::<i32>()[r * k as usize..(r + 1) * k as usize], want[..], "k {k} row {r}");
            }
        }
    }

    #[test]
    fn token_counts_grow_like_a_fresh_count() {
        let prompt = [5, 7, 5, 9];
        let output = [7, 7, 11, 5, 11];
        let mut grown = TokenCounts::default();
        for n in 0..=output.len() {
            grown.update(&prompt, &output[..n]);
        }
        let fresh = TokenCounts::of(&prompt, &output);
        let view = |c: &TokenCounts| {
            let mut e: Vec<(i32, f32, bool)> = (0..c.len()).map(|i| (c.tokens[i], c.in_output[i], c.in_prompt[i])).collect();
            e.sort_by_key(|t| t.0);
            e
        };
        assert_eq!(view(&grown), view(&fresh));
        assert_eq!(view(&fresh), vec![(5, 1.0, true), (7, 2.0, true), (9, 0.0, true), (11, 2.0, false)]);
    }

    #[test]
    fn compiled_chains_equal_the_plain_ops_for_any_shape() {
        // Compiled here on the CPU backend; the engine compiles them on GPUs only.
        use crate::mlx_ext::fuse::compiled;
        let mut gumbel_c = compiled(gumbel_argmax_of);
        let mut filter_c = compiled(filter_sorted);
        let mut penalise_c = compiled(penalise);
        let vals = |r: i32, k: i32, m: i32| Array::from_iter((0..r * k).map(|i| ((i * m % 97) as f32 / 9.0).sin() * 4.0), &[r, k]);
        // (rows, ids per row, ids shared by all rows): every shape the sampler passes.
        for (r, k, shared) in [(3, 5, false), (1, 40, false), (4, 9, true), (7, 32, false), (2, 3, true)] {
            let key = Array::from_slice(&(0..r as u64).map(|i| mix_seed(i, 1) | 1).collect::<Vec<_>>(), &[r, 1]);
            let n = if shared { 1 } else { r };
            let ids = Array::from_iter((0..n * k).map(|i| i * 7 % 1000), &[n, k]);
            let args = [vals(r, k, 13), key, ids];
            let plain = gumbel_argmax_of(&args).unwrap();
            let fused = gumbel_c(&args).unwrap().remove(0);
            assert_eq!(plain.as_slice::<u32>(), fused.as_slice::<u32>(), "gumbel {r}x{k} shared {shared}");

            let sorted = ops::sort_axis(vals(r, k, 13).negative().unwrap(), 1).unwrap().negative().unwrap();
            let filters: Vec<Filter> = (0..r)
                .map(|i| Filter { temperature: 0.5 + i as f32, min_p: [0.0, 0.1][i as usize % 2], top_k: 2 + i, top_p: [1.0, 0.7, 0.9][i as usize % 3] })
                .collect();
            let [t, m, kk, p] = Filter::columns(&filters, k);
            let args = [sorted, Array::from_iter(0..k, &[1, k]), t, m, kk, p];
            let plain = filter_sorted(&args).unwrap();
            let fused = filter_c(&args).unwrap().remove(0);
            assert_eq!(plain.as_slice::<f32>(), fused.as_slice::<f32>(), "filter {r}x{k}");

            let col = |c: f32| Array::from_iter((0..r).map(|i| c + i as f32 / 10.0), &[r, 1]);
            let seen = vals(r, k, 11).gt(Array::from_f32(0.0)).unwrap().as_dtype(Dtype::Float32).unwrap();
            let args = [vals(r, k, 5), vals(r, k, 3).abs().unwrap().floor().unwrap(), seen, col(1.3), col(0.4), col(-0.2)];
            let plain = penalise(&args).unwrap();
            let fused = penalise_c(&args).unwrap().remove(0);
            assert_eq!(plain.as_slice::<f32>(), fused.as_slice::<f32>(), "penalise {r}x{k}");
        }
    }
}
