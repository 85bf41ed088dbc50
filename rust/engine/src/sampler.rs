//! Token choice for a batch of logits rows, on MLX: greedy, temperature, top-k, top-p, seeds.

use anyhow::Result;
use mlx_rs::{ops, random, Array};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// <= 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// A seeded request draws from its own stream, independent of its batch.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// SplitMix64: decorrelates (seed, step) pairs into PRNG keys.
pub fn mix_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `logits`: float32 `[R, V]`; `rows[i]` = (params, PRNG key seed for this draw). Returns int32 `[R]`.
pub fn sample(logits: &Array, rows: &[(&SamplingParams, u64)]) -> Result<Array> {
    let greedy = ops::indexing::argmax_axis(logits, 1, false)?;
    if rows.iter().all(|(p, _)| p.is_greedy()) {
        return Ok(greedy.as_dtype(mlx_rs::Dtype::Int32)?);
    }
    let r = rows.len() as i32;
    let v = logits.shape()[1];
    let neg_inf = Array::from_f32(f32::NEG_INFINITY);
    let temps: Vec<f32> = rows.iter().map(|(p, _)| if p.is_greedy() { 1.0 } else { p.temperature }).collect();
    let mut x = logits.divide(Array::from_slice(&temps, &[r, 1]))?;

    let use_top_k = rows.iter().any(|(p, _)| p.top_k > 0 && p.top_k < v);
    let use_top_p = rows.iter().any(|(p, _)| p.top_p < 1.0);
    if use_top_k || use_top_p {
        let sorted = ops::sort_axis(x.negative()?, 1)?.negative()?; // descending
        let ks: Vec<i32> = rows
            .iter()
            .map(|(p, _)| if p.top_k > 0 && p.top_k < v { p.top_k } else { v })
            .collect();
        let k = Array::from_slice(&ks, &[r, 1]);
        // Smallest logit a row keeps: the k-th largest, then raised by top-p over those k.
        let mut keep_from = k.subtract(Array::from_int(1))?;
        if use_top_p {
            let rank = Array::from_iter(0..v, &[1, v]);
            let in_k = ops::select(&rank.lt(&k)?, &sorted, &neg_inf)?;
            let probs = ops::softmax_axis(&in_k, 1, None)?;
            let before = probs.cumsum(1, None, None)?.subtract(&probs)?;
            let ps: Vec<f32> = rows.iter().map(|(p, _)| p.top_p).collect();
            let kept = before.lt(Array::from_slice(&ps, &[r, 1]))?.logical_and(&rank.lt(&k)?)?;
            let count = kept.as_dtype(mlx_rs::Dtype::Int32)?.sum_axis(1, true)?;
            keep_from = ops::minimum(&keep_from, &count.subtract(Array::from_int(1))?)?;
        }
        let threshold = sorted.take_along_axis(&keep_from, 1)?;
        x = ops::select(&x.lt(&threshold)?, &neg_inf, &x)?;
    }

    let mut noise = Vec::with_capacity(rows.len());
    for (_, key_seed) in rows {
        let key = random::key(*key_seed)?;
        noise.push(random::gumbel::<f32>(&[1, v][..], &key)?);
    }
    let noise = ops::concatenate(&noise, 0)?;
    let drawn = ops::indexing::argmax_axis(&x.add(&noise)?, 1, false)?;
    let is_greedy: Vec<bool> = rows.iter().map(|(p, _)| p.is_greedy()).collect();
    let out = ops::select(&Array::from_slice(&is_greedy, &[r]), &greedy, &drawn)?;
    Ok(out.as_dtype(mlx_rs::Dtype::Int32)?)
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

    fn draw(params: &SamplingParams, n: u64) -> Vec<usize> {
        let logits = probs_logits();
        let mut counts = vec![0usize; 6];
        for i in 0..n {
            let rows = [(params, mix_seed(7, 2 * i)), (params, mix_seed(7, 2 * i + 1))];
            let t: Vec<i32> = sample(&logits, &rows).unwrap().as_slice::<i32>().to_vec();
            for x in t {
                counts[x as usize] += 1;
            }
        }
        counts
    }

    #[test]
    fn greedy_is_argmax() {
        let out = sample(&probs_logits(), &[(&SamplingParams::default(), 0), (&SamplingParams::default(), 1)]).unwrap();
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
