//! Token choice for a batch of logits rows, on MLX, in vLLM's order: allowed tokens, bad words,
//! logit bias and min_tokens, penalties; then greedy argmax, or temperature, min_p, top-k/top-p
//! and a seeded draw.

use anyhow::Result;
use mlx_rs::{ops, random, Array, Dtype};

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
    let x = process_logits(logits, rows)?;
    let greedy = ops::indexing::argmax_axis(&x, 1, false)?;
    if rows.iter().all(|row| row.params.is_greedy()) {
        return Ok(greedy.as_dtype(Dtype::Int32)?);
    }
    let x = filter_logits(&x, rows)?;
    let v = x.shape()[1];
    let mut noise = Vec::with_capacity(rows.len());
    for row in rows {
        let key = random::key(row.key)?;
        noise.push(random::gumbel::<f32>(&[1, v][..], &key)?);
    }
    // Gumbel-max: argmax(x + Gumbel noise) draws from softmax(x).
    let drawn = ops::indexing::argmax_axis(&x.add(&ops::concatenate(&noise, 0)?)?, 1, false)?;
    let is_greedy: Vec<bool> = rows.iter().map(|row| row.params.is_greedy()).collect();
    let out = ops::select(&Array::from_slice(&is_greedy, &[rows.len() as i32]), &greedy, &drawn)?;
    Ok(out.as_dtype(Dtype::Int32)?)
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
}
