//! Token choice for a batch of logits rows, on MLX, in vLLM's order: grammar bitmask, allowed
//! tokens, bad words, logit bias and min_tokens, penalties; then greedy argmax, or temperature,
//! min_p, top-k/top-p and a seeded draw. Also the logprobs vLLM reports.

use anyhow::{bail, ensure, Result};
use mlx_rs::{ops, Array, Dtype};

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

    fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
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
    let neg = scores.negative()?;
    let top = if k < v {
        // Partition first: sorting k candidates instead of the whole vocabulary.
        let part = ops::argpartition_axis(&neg, k - 1, 1)?;
        part.take_axis(Array::from_iter(0..k, &[k]), 1)?
    } else {
        ops::argsort_axis(&neg, 1)?
    };
    let top_neg = neg.take_along_axis(&top, 1)?;
    let order = ops::argsort_axis(&top_neg, 1)?;
    let top = top.take_along_axis(&order, 1)?.as_dtype(Dtype::Int32)?;
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
        // Output token counts and prompt presence, scattered on the device.
        let counts_of = |output: bool| -> Result<Array> {
            let mut idx = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                if row.params.has_penalties() {
                    let tokens = if output { row.output } else { row.prompt };
                    idx.extend(tokens.iter().filter(|&&t| (t as usize) < v).map(|&t| (i * v) as i32 + t));
                }
            }
            let zeros = ops::zeros::<f32>(&[(r * v) as i32])?;
            if idx.is_empty() {
                return Ok(zeros.reshape(&[r as i32, v as i32])?);
            }
            let n = idx.len() as i32;
            let ones = ops::ones::<f32>(&[n, 1])?;
            let c = ops::indexing::scatter_add_single(&zeros, Array::from_slice(&idx, &[n]), &ones, 0)?;
            Ok(c.reshape(&[r as i32, v as i32])?)
        };
        let out_counts = counts_of(true)?;
        let in_prompt = counts_of(false)?;
        let zero = Array::from_f32(0.0);
        let seen_out = out_counts.gt(&zero)?;
        let seen = seen_out.logical_or(&in_prompt.gt(&zero)?)?;
        let col = |f: &dyn Fn(&SamplingParams) -> f32| -> Array {
            let vals: Vec<f32> = rows.iter().map(|row| f(row.params)).collect();
            Array::from_slice(&vals, &[r as i32, 1])
        };
        let rep = col(&|p| p.repetition_penalty);
        let penalised = ops::select(&x.gt(&zero)?, &x.divide(&rep)?, &x.multiply(&rep)?)?;
        x = ops::select(&seen, &penalised, &x)?;
        x = x.subtract(col(&|p| p.frequency_penalty).multiply(&out_counts)?)?;
        x = x.subtract(col(&|p| p.presence_penalty).multiply(seen_out.as_dtype(Dtype::Float32)?)?)?;
    }
    Ok(x)
}

/// `logits`: float32 `[R, V]`. Returns the chosen ids, int32 `[R]`.
pub fn sample(logits: &Array, rows: &[Row]) -> Result<Array> {
    Ok(choose(logits, rows)?.0)
}

/// The chosen ids, int32 `[R]`, and the logits the choice was made from (lazy; vLLM's
/// "processed" logits): processed, then, when any row draws at random, tempered and filtered.
pub fn choose(logits: &Array, rows: &[Row]) -> Result<(Array, Array)> {
    let x = process_logits(logits, rows)?;
    let greedy = ops::indexing::argmax_axis(&x, 1, false)?;
    if rows.iter().all(|row| row.params.is_greedy()) {
        return Ok((greedy.as_dtype(Dtype::Int32)?, x));
    }
    let r = rows.len() as i32;
    let v = x.shape()[1];
    let keys: Vec<u64> = rows.iter().map(|row| row.key).collect();
    // Gumbel-max: argmax(x + Gumbel noise) draws from softmax(x). The noise of token t in a row
    // depends only on (the row's key, t), so a row draws the same token alone or in any batch,
    // and over a few top-k candidates or the whole vocabulary alike.
    let k_max = rows
        .iter()
        .filter(|row| !row.params.is_greedy())
        .map(|row| if row.params.top_k > 0 && row.params.top_k < v { row.params.top_k } else { v })
        .max()
        .unwrap_or(v);
    let drawn = if k_max < v {
        // Every drawing row has a top-k: draw among the k_max best candidates only, filtered
        // as `filter_logits` filters the whole row (it stays the reference and the reported
        // distribution).
        let neg = x.negative()?;
        let cand = ops::argpartition_axis(&neg, k_max - 1, 1)?.take_axis(Array::from_iter(0..k_max, &[k_max]), 1)?;
        let order = ops::argsort_axis(neg.take_along_axis(&cand, 1)?, 1)?;
        let cand = cand.take_along_axis(&order, 1)?;
        let filtered = filter_sorted(&x.take_along_axis(&cand, 1)?, rows)?;
        let pick = ops::indexing::argmax_axis(&filtered.add(gumbel_noise(&keys, &cand)?)?, 1, true)?;
        cand.take_along_axis(&pick, 1)?.reshape(&[r])?
    } else {
        let ids = Array::from_iter(0..v, &[1, v]);
        ops::indexing::argmax_axis(&filter_logits(&x, rows)?.add(gumbel_noise(&keys, &ids)?)?, 1, false)?
    };
    let is_greedy: Vec<bool> = rows.iter().map(|row| row.params.is_greedy()).collect();
    let out = ops::select(&Array::from_slice(&is_greedy, &[r]), &greedy, &drawn)?;
    Ok((out.as_dtype(Dtype::Int32)?, filter_logits(&x, rows)?))
}

/// Standard Gumbel noise for token ids `ids` (`[R, K]` or `[1, K]`) of rows with PRNG `keys`:
/// uniforms from a counter-based generator (Widynski's "squares", 64-bit wrapping arithmetic)
/// of (key, token id) — one batch of elementwise ops for all rows instead of a PRNG call each.
fn gumbel_noise(keys: &[u64], ids: &Array) -> Result<Array> {
    let u64c = |c: u64| Array::from_slice(&[c], &[1]);
    let two32 = u64c(1 << 32);
    // Rotate by 32 bits: the halves do not overlap, so adding them is or-ing them.
    let rot = |x: &Array| -> Result<Array> { Ok(x.floor_divide(&two32)?.add(x.multiply(&two32)?)?) };
    // The generator wants keys with well-spread bits; callers may pass small integers.
    let mixed: Vec<u64> = keys.iter().map(|&k| mix_seed(k, 0x5EED) | 1).collect();
    let key = Array::from_slice(&mixed, &[keys.len() as i32, 1]);
    let ctr = ids.as_dtype(Dtype::Uint64)?.add(u64c(1))?;
    let y = ctr.multiply(&key)?;
    let z = y.add(&key)?;
    let mut x = rot(&y.multiply(&y)?.add(&y)?)?;
    x = rot(&x.multiply(&x)?.add(&z)?)?;
    x = rot(&x.multiply(&x)?.add(&y)?)?;
    let bits = x.multiply(&x)?.add(&z)?.floor_divide(u64c(1 << 40))?; // top 24 bits
    let u = bits.as_dtype(Dtype::Float32)?.add(Array::from_f32(0.5))?.multiply(Array::from_f32(1.0 / (1u32 << 24) as f32))?;
    Ok(u.log()?.negative()?.log()?.negative()?)
}

/// `filter_logits` for rows of candidates sorted in descending order (`[R, K]`, K <= every
/// drawing row's top_k): temperature, min_p relative to the best candidate, top-k, top-p.
fn filter_sorted(sorted: &Array, rows: &[Row]) -> Result<Array> {
    let r = rows.len() as i32;
    let kn = sorted.shape()[1];
    let neg_inf = Array::from_f32(f32::NEG_INFINITY);
    let temps: Vec<f32> =
        rows.iter().map(|row| if row.params.is_greedy() { 1.0 } else { row.params.temperature }).collect();
    let mut x = sorted.divide(Array::from_slice(&temps, &[r, 1]))?;
    let rank = Array::from_iter(0..kn, &[1, kn]);
    if rows.iter().any(|row| row.params.min_p > 0.0) {
        // p >= min_p * p_max  <=>  x >= x_max + ln(min_p); the first candidate is the max.
        let logs: Vec<f32> = rows
            .iter()
            .map(|row| if row.params.min_p > 0.0 { row.params.min_p.ln() } else { f32::NEG_INFINITY })
            .collect();
        let floor = x.take_axis(Array::from_int(0), 1)?.reshape(&[r, 1])?.add(Array::from_slice(&logs, &[r, 1]))?;
        x = ops::select(&x.lt(&floor)?, &neg_inf, &x)?;
    }
    let ks: Vec<i32> = rows.iter().map(|row| if row.params.top_k > 0 { row.params.top_k.min(kn) } else { kn }).collect();
    let in_k = rank.lt(Array::from_slice(&ks, &[r, 1]))?;
    x = ops::select(&in_k, &x, &neg_inf)?;
    if rows.iter().any(|row| row.params.top_p < 1.0) {
        // A candidate stays while the mass of better candidates is below top_p.
        let probs = ops::softmax_axis(&x, 1, None)?;
        let before = probs.cumsum(1, None, None)?.subtract(&probs)?;
        let ps: Vec<f32> = rows.iter().map(|row| row.params.top_p).collect();
        x = ops::select(&before.lt(Array::from_slice(&ps, &[r, 1]))?, &x, &neg_inf)?;
    }
    Ok(x)
}

/// The distribution a random draw uses, as logits (-inf where filtered): processed logits divided
/// by the temperature, then min_p, then top-k and top-p (vLLM's order). Greedy rows get
/// temperature 1.
pub fn filter_logits(processed: &Array, rows: &[Row]) -> Result<Array> {
    let r = rows.len() as i32;
    let v = processed.shape()[1];
    let neg_inf = Array::from_f32(f32::NEG_INFINITY);
    let temps: Vec<f32> =
        rows.iter().map(|row| if row.params.is_greedy() { 1.0 } else { row.params.temperature }).collect();
    let mut x = processed.divide(Array::from_slice(&temps, &[r, 1]))?;

    if rows.iter().any(|row| row.params.min_p > 0.0) {
        // Keep tokens with probability >= min_p * the row's top probability.
        let probs = ops::softmax_axis(&x, 1, None)?;
        let top = probs.max_axis(1, true)?;
        let min_ps: Vec<f32> = rows.iter().map(|row| row.params.min_p).collect();
        let floor = top.multiply(Array::from_slice(&min_ps, &[r, 1]))?;
        x = ops::select(&probs.lt(&floor)?, &neg_inf, &x)?;
    }

    let use_top_k = rows.iter().any(|row| row.params.top_k > 0 && row.params.top_k < v);
    let use_top_p = rows.iter().any(|row| row.params.top_p < 1.0);
    if use_top_k || use_top_p {
        let sorted = ops::sort_axis(x.negative()?, 1)?.negative()?; // descending
        let ks: Vec<i32> = rows
            .iter()
            .map(|row| if row.params.top_k > 0 && row.params.top_k < v { row.params.top_k } else { v })
            .collect();
        let k = Array::from_slice(&ks, &[r, 1]);
        // Smallest logit a row keeps: the k-th largest, then raised by top-p over those k (a
        // token stays while the mass of larger tokens is below top_p).
        let mut keep_from = k.subtract(Array::from_int(1))?;
        if use_top_p {
            let rank = Array::from_iter(0..v, &[1, v]);
            let in_k = ops::select(&rank.lt(&k)?, &sorted, &neg_inf)?;
            let probs = ops::softmax_axis(&in_k, 1, None)?;
            let before = probs.cumsum(1, None, None)?.subtract(&probs)?;
            let ps: Vec<f32> = rows.iter().map(|row| row.params.top_p).collect();
            let kept = before.lt(Array::from_slice(&ps, &[r, 1]))?.logical_and(&rank.lt(&k)?)?;
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
        Row { params, key, prompt: &[], output: &[] }
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
        // A batch where every row has a top-k draws over candidates; adding a row without one
        // sends the batch through the whole-vocabulary path. The top-k rows must not notice.
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
}
