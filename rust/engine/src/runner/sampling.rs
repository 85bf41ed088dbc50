//! The sampling batch of a step, built once: one row per sampling request (its parameters, PRNG
//! key and tokens), the grammar bitmask of structured-output requests as an additive mask, and
//! the rows whose sampled-token logprobs are reported. Tokens are chosen on the device.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use mlx_rs::Array;

use super::logprobs::SampledLogprobs;
use super::pipeline::PendingStep;
use super::plan::StepPlan;
use super::requests::RequestTable;
use super::schedule::GrammarBitmask;
use crate::sampler::{bitmask_to_additive, choose, gather_logprobs, LogprobsMode, Row};

/// Penalties and bad words read a request's tokens on the host: a step with such a request whose
/// tokens are still on the device waits for them first.
pub fn needs_host_tokens(plan: &StepPlan, table: &RequestTable) -> bool {
    plan.sample_rows.iter().any(|&i| {
        table.get(&plan.scheduled[i].0).is_some_and(|s| !s.deferred.is_empty() && s.sampling.needs_history())
    })
}

/// The additive mask of the grammar rows among the step's sampling rows (requests the grammar
/// covers that do not sample this step have no row here).
fn grammar_mask(plan: &StepPlan, grammar: Option<&GrammarBitmask>, vocab: usize) -> Result<Option<Array>> {
    let Some(g) = grammar.filter(|g| !g.req_ids.is_empty()) else { return Ok(None) };
    ensure!(
        g.words.len() == g.req_ids.len() * g.width,
        "grammar bitmask has {} words for {} requests of width {}",
        g.words.len(),
        g.req_ids.len(),
        g.width
    );
    let row_of: HashMap<&str, usize> =
        plan.sample_rows.iter().enumerate().map(|(r, &i)| (plan.scheduled[i].0.as_str(), r)).collect();
    let masked: Vec<(usize, &[i32])> = g
        .req_ids
        .iter()
        .enumerate()
        .filter_map(|(j, id)| row_of.get(id.as_str()).map(|&r| (r, &g.words[j * g.width..(j + 1) * g.width])))
        .collect();
    if masked.is_empty() {
        return Ok(None);
    }
    Ok(Some(bitmask_to_additive(plan.sample_rows.len(), vocab, &masked)?))
}

/// The step's tokens `[sample_rows]` and the logprobs asked for, submitted to the device but not
/// evaluated. `num_logprobs(k)` resolves a request's count (-1: the vocabulary).
pub fn choose_tokens(
    step: &PendingStep,
    table: &mut RequestTable,
    grammar: Option<&GrammarBitmask>,
    mode: LogprobsMode,
    num_logprobs: impl Fn(i32) -> usize,
) -> Result<(Option<Array>, Option<SampledLogprobs>)> {
    let Some(mut logits) = step.logits.clone() else { return Ok((None, None)) };
    let plan = &step.plan;
    for &i in &plan.sample_rows {
        if let Some(s) = table.get_mut(&plan.scheduled[i].0).filter(|s| s.sampling.has_penalties()) {
            let (prompt, output) = s.tokens.split_at(s.num_prompt);
            s.counts.update(prompt, output);
        }
    }
    if let Some(mask) = grammar_mask(plan, grammar, logits.shape()[1] as usize)? {
        logits = logits.add(mask)?;
    }
    let mut rows = Vec::with_capacity(plan.sample_rows.len());
    for (&i, &key) in plan.sample_rows.iter().zip(&plan.keys) {
        let s = table.state(&plan.scheduled[i].0)?;
        let (prompt, output) = s.tokens.split_at(s.num_prompt);
        rows.push(Row { params: &s.sampling, key, prompt, output, counts: Some(&s.counts) });
    }
    let (ids, processed) = choose(&logits, &rows, mode.is_processed())?;
    // Sampled-token logprobs, for the rows that ask, from the logits the mode names.
    let asking: Vec<i32> = (0..rows.len() as i32).filter(|&r| rows[r as usize].params.logprobs.is_some()).collect();
    let Some(k) = asking.iter().filter_map(|&r| rows[r as usize].params.logprobs).map(&num_logprobs).max() else {
        return Ok((Some(ids), None));
    };
    let source = processed.as_ref().unwrap_or(&logits);
    let idx = Array::from_slice(&asking, &[asking.len() as i32]);
    let scores = mode.scores(&source.take_axis(&idx, 0)?)?;
    let top = gather_logprobs(&scores, k as i32, &ids.take_axis(&idx, 0)?)?;
    Ok((Some(ids), Some(SampledLogprobs { rows: asking, k, top })))
}
