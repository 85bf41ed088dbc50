//! vLLM's logits processors, in its order: grammar bitmask, allowed tokens, bad words, logit bias
//! and min_tokens, then repetition / frequency / presence penalties.

use anyhow::{ensure, Result};
use mlx_rs::{error::Exception, ops, Array, Dtype};

use super::params::{Row, SamplingParams, TokenCounts};
use crate::mlx_ext::fuse::fused;

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

/// Penalised values `g` of the tokens a row has seen (`[R, U]`): repetition where `seen`,
/// frequency per output occurrence `occ`, presence once; `rep`, `freq`, `pres`: `[R, 1]`.
/// (Per-row parameters come as separate columns: a compiled function's slice or gather of one
/// packed array would fix the batch size.)
pub(super) fn penalise(a: &[Array]) -> std::result::Result<Array, Exception> {
    let [g, occ, seen, rep, freq, pres] = a else { unreachable!("penalise takes 6 arrays") };
    let zero = Array::from_f32(0.0);
    let penalised = ops::select(&g.gt(&zero)?, &g.divide(rep)?, &g.multiply(rep)?)?;
    ops::select(&seen.gt(&zero)?, &penalised, g)?
        .subtract(freq.multiply(occ)?)?
        .subtract(pres.multiply(occ.gt(&zero)?.as_dtype(Dtype::Float32)?)?)
}
