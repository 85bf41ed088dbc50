//! The request table: what the engine knows of each request vLLM runs — tokens, block tables,
//! computed count, sampling parameters — kept in step with the scheduler's output.
//!
//! A request the table cannot take (tokens outside the vocabulary, block ids outside the cache,
//! a scheduler step that contradicts what the engine knows) fails alone: it is forgotten and
//! reported; the rest of the step goes on.

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, ensure, Result};

use super::logprobs::Logprobs;
use super::pipeline::StepId;
use super::schedule::{CachedRequest, NewRequest, SchedulerStep};
use crate::encoder::pooling::PoolingParams;
use crate::sampler::{SamplingParams, TokenCounts};

/// The value of a token that is still on the device (sampled by a step in flight): a request's
/// `tokens` hold it at the positions its `deferred` list names. Never a real token id.
pub const PENDING_TOKEN: i32 = -1;

/// A token of `tokens` still on the device: row `row` of in-flight step `step`'s ids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deferred {
    pub step: StepId,
    pub pos: usize,
    pub row: usize,
}

pub struct RequestState {
    /// Prompt then output tokens (`PENDING_TOKEN` where a sampled token is still on the device).
    pub tokens: Vec<i32>,
    pub num_prompt: usize,
    /// Per KV-cache group.
    pub block_ids: Vec<Vec<i32>>,
    /// Tokens whose K/V are in the cache (or are being written by a submitted step).
    pub num_computed: usize,
    pub sampling: SamplingParams,
    /// Pooling requests: what they ask instead of tokens.
    pub pooling: Option<PoolingParams>,
    /// Prompt logprobs gathered so far, while the prompt is being prefilled.
    pub prompt_logprobs: Option<Logprobs>,
    /// Distinct tokens for the penalties, counted as the request grows.
    pub counts: TokenCounts,
    /// Sampled tokens not on the host yet (at most one per step in flight).
    pub deferred: Vec<Deferred>,
}

impl RequestState {
    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }

    /// The token chosen later (step `step`, row `row`) is appended as a placeholder now, so the
    /// request's length (positions, seeds of the next draws) is known before its value.
    pub fn push_pending(&mut self, step: StepId, row: usize) {
        self.deferred.push(Deferred { step, pos: self.tokens.len(), row });
        self.tokens.push(PENDING_TOKEN);
    }

    /// The value of the token step `step` chose for this request at row `row`, if it waits for it.
    pub fn resolve(&mut self, step: StepId, row: usize, token: i32) {
        if let Some(k) = self.deferred.iter().position(|d| d.step == step && d.row == row) {
            let d = self.deferred.remove(k);
            debug_assert_eq!(self.tokens[d.pos], PENDING_TOKEN);
            self.tokens[d.pos] = token;
        }
    }
}

/// What the table checks requests against: the model's vocabulary and the KV cache's geometry.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub vocab_size: usize,
    /// (KV-cache groups, blocks) once the cache is allocated.
    pub kv: Option<(usize, usize)>,
}

impl Limits {
    fn check_tokens(&self, tokens: &[i32]) -> Result<()> {
        let vocab = self.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            bail!("token id {t} is outside the model's vocabulary of {vocab}");
        }
        Ok(())
    }

    fn check_blocks(&self, tables: &[Vec<i32>]) -> Result<()> {
        let Some((groups, n)) = self.kv else { return Ok(()) };
        ensure!(tables.len() == groups, "{} block tables for {groups} KV-cache groups", tables.len());
        if let Some(&b) = tables.iter().flatten().find(|&&b| b < 0 || b as usize >= n) {
            bail!("block id {b} is outside the KV cache of {n} blocks");
        }
        Ok(())
    }

    fn check_new(&self, r: &NewRequest) -> Result<()> {
        ensure!(!r.prompt_token_ids.is_empty(), "the prompt is empty");
        self.check_tokens(&r.prompt_token_ids)?;
        self.check_blocks(&r.block_ids)?;
        let p = &r.sampling;
        let ids = p.allowed_token_ids.iter().flatten().chain(p.logit_bias.iter().map(|(t, _)| t));
        for t in ids {
            self.check_tokens(std::slice::from_ref(t))?;
        }
        Ok(())
    }
}

/// Requests that failed in a step, with the reason.
pub type Failures = Vec<(String, String)>;

/// Record that request `id` failed, and why.
pub fn fail(failed: &mut Failures, id: &str, reason: String) {
    log::error!("request {id} failed: {reason}");
    failed.push((id.to_string(), reason));
}

#[derive(Default)]
pub struct RequestTable {
    requests: HashMap<String, RequestState>,
    /// Requests failed and forgotten that the scheduler has not finished yet: a step scheduled
    /// before it learnt of the failure may still name them.
    failed: HashSet<String>,
}

impl RequestTable {
    pub fn get(&self, id: &str) -> Option<&RequestState> {
        self.requests.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut RequestState> {
        self.requests.get_mut(id)
    }

    /// The state of a request the step runs (it is in the table by construction).
    pub fn state(&self, id: &str) -> Result<&RequestState> {
        self.requests.get(id).ok_or_else(|| anyhow!("request {id} is not in the table"))
    }

    /// Forget a request that failed; it stays known as failed until the scheduler finishes it.
    pub fn forget(&mut self, id: &str) {
        self.requests.remove(id);
        self.failed.insert(id.to_string());
    }

    /// Apply the scheduler's step: finished requests leave, new ones enter, cached ones get their
    /// new blocks, computed counts and (for resumed requests) tokens. `new_logprobs(k)` sizes the
    /// prompt-logprob buffer of a request asking for `k` (-1: the vocabulary). Returns the
    /// requests that failed (forgotten), the reader's rejections first.
    pub fn apply(&mut self, step: &SchedulerStep, limits: Limits, logprobs_cols: impl Fn(i32) -> usize) -> Failures {
        let mut failed = Failures::new();
        for (id, reason) in &step.rejected {
            fail(&mut failed, id, reason.clone());
        }
        for id in &step.finished_req_ids {
            self.requests.remove(id);
            self.failed.remove(id);
        }
        for r in &step.new_requests {
            if let Err(e) = limits.check_new(r) {
                fail(&mut failed, &r.req_id, format!("{e:#}"));
                continue;
            }
            let prompt_logprobs = r
                .sampling
                .prompt_logprobs
                .map(|k| Logprobs::zeros(r.prompt_token_ids.len().saturating_sub(1), logprobs_cols(k)));
            self.requests.insert(
                r.req_id.clone(),
                RequestState {
                    tokens: r.prompt_token_ids.clone(),
                    num_prompt: r.prompt_token_ids.len(),
                    block_ids: r.block_ids.clone(),
                    num_computed: r.num_computed_tokens,
                    sampling: r.sampling.clone(),
                    pooling: r.pooling.clone(),
                    prompt_logprobs,
                    counts: TokenCounts::default(),
                    deferred: Vec::new(),
                },
            );
        }
        for c in &step.cached_requests {
            if self.failed.contains(&c.req_id) {
                // Failed in a step the scheduler had not collected when it scheduled this one.
                failed.push((c.req_id.clone(), "failed in an earlier step".into()));
                continue;
            }
            if let Err(e) = self.apply_cached(c, limits) {
                self.requests.remove(&c.req_id);
                fail(&mut failed, &c.req_id, format!("{e:#}"));
            }
        }
        // Scheduled tokens the request does not have: the engine and the scheduler disagree on
        // this request (checked so that it cannot take the step down).
        for (id, n) in &step.num_scheduled_tokens {
            match self.requests.get(id) {
                None if !failed.iter().any(|(f, _)| f == id) => {
                    fail(&mut failed, id, "scheduled but never sent to the engine".into());
                }
                Some(s) if s.num_computed + n > s.tokens.len() => {
                    let reason =
                        format!("{n} tokens scheduled from position {} but only {} are known", s.num_computed, s.tokens.len());
                    self.requests.remove(id);
                    fail(&mut failed, id, reason);
                }
                _ => {}
            }
        }
        self.failed.extend(failed.iter().map(|(id, _)| id.clone()));
        failed
    }

    fn apply_cached(&mut self, c: &CachedRequest, limits: Limits) -> Result<()> {
        if let Some(all) = &c.all_token_ids {
            limits.check_tokens(all)?;
        }
        if let Some(ids) = &c.new_block_ids {
            limits.check_blocks(ids)?;
        }
        let state = self.requests.get_mut(&c.req_id).ok_or_else(|| anyhow!("unknown to the engine"))?;
        if let Some(all) = &c.all_token_ids {
            state.tokens = all.clone();
            state.deferred.clear();
        }
        match (&c.new_block_ids, c.resumed) {
            (Some(ids), true) => state.block_ids = ids.clone(),
            (Some(ids), false) => {
                ensure!(
                    ids.len() == state.block_ids.len(),
                    "{} new block tables for {} KV-cache groups",
                    ids.len(),
                    state.block_ids.len()
                );
                for (table, new) in state.block_ids.iter_mut().zip(ids) {
                    table.extend_from_slice(new);
                }
            }
            (None, _) => {}
        }
        state.num_computed = c.num_computed_tokens;
        // Outputs the scheduler no longer counts (e.g. rejected) are dropped.
        let known = state.num_prompt + c.num_output_tokens;
        if state.tokens.len() > known {
            state.tokens.truncate(known);
            state.deferred.retain(|d| d.pos < known);
        }
        Ok(())
    }
}
