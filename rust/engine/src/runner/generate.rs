//! Engine-alone generation (benchmarks, the GPU box, tests): a small scheduler of its own drives
//! the same two-call step vLLM drives, pipelined as vLLM's async scheduling runs it.

use std::collections::HashMap;

use anyhow::{bail, ensure, Result};

use super::schedule::{CachedRequest, NewRequest, SchedulerStep};
use super::ModelRunner;
use crate::sampler::SamplingParams;

impl ModelRunner {
    /// All prompts batched, one block table each, `max_tokens` new tokens (fewer for a prompt that
    /// emits a stop token). Step i + 1 is built and submitted, reading step i's tokens on the
    /// device, before step i's tokens are read to the host; a request that stopped has its extra
    /// token dropped. `pipeline` false waits for each step's tokens before building the next.
    pub fn generate(
        &mut self,
        prompts: &[Vec<i32>],
        max_tokens: usize,
        sampling: &SamplingParams,
        stop_token_ids: &[i32],
        pipeline: bool,
    ) -> Result<Vec<Vec<i32>>> {
        let depth = if pipeline { 2 } else { 1 };
        let bs = self.block_size;
        let (num_blocks, num_groups) = self.cache.as_ref().map_or((0, 0), |c| (c.num_blocks, c.num_groups()));
        ensure!(num_groups > 0, "generate runs on an allocated KV cache");
        ensure!(self.pipeline.is_idle(), "generate while a step is in flight");
        let n = prompts.len();
        let ids: Vec<String> = (0..n).map(|i| format!("generate-{i}")).collect();
        let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let mut next_block = 0i32;
        let mut step = SchedulerStep::default();
        for (i, p) in prompts.iter().enumerate() {
            ensure!(!p.is_empty(), "prompt {i} is empty");
            let need = (p.len() + max_tokens).div_ceil(bs) as i32;
            // Each KV-cache group its own blocks, as vLLM draws them from one pool.
            ensure!(
                (next_block + need * num_groups as i32) as usize <= num_blocks,
                "generate: the KV cache has {num_blocks} blocks, too few for these prompts and max_tokens"
            );
            let block_ids = (0..num_groups as i32).map(|g| (next_block + g * need..next_block + (g + 1) * need).collect()).collect();
            step.new_requests.push(NewRequest {
                req_id: ids[i].clone(),
                prompt_token_ids: p.clone(),
                block_ids,
                num_computed_tokens: 0,
                sampling: sampling.clone(),
                pooling: None,
            });
            if max_tokens > 0 {
                step.num_scheduled_tokens.push((ids[i].clone(), p.len()));
            }
            next_block += need * num_groups as i32;
        }
        let mut outputs: Vec<Vec<i32>> = vec![Vec::new(); n];
        let mut done = vec![max_tokens == 0; n];
        // Tokens sampled or in flight per request (what the next step may schedule).
        let mut scheduled = vec![0usize; n];
        let mut finished: Vec<String> = Vec::new();
        loop {
            if !step.num_scheduled_tokens.is_empty() {
                for (id, _) in &step.num_scheduled_tokens {
                    scheduled[index[id.as_str()]] += 1;
                }
                self.forward_step(&step)?;
                self.sample_submit(None)?;
            }
            // The next step, from what is known now (the tokens of the step just submitted are not).
            let mut next = SchedulerStep { finished_req_ids: std::mem::take(&mut finished), ..Default::default() };
            for i in (0..n).filter(|&i| !done[i] && scheduled[i] < max_tokens) {
                let s = self.table.state(&ids[i])?;
                next.cached_requests.push(CachedRequest {
                    req_id: ids[i].clone(),
                    resumed: false,
                    new_block_ids: None,
                    num_computed_tokens: s.num_computed,
                    num_output_tokens: s.num_output(),
                    all_token_ids: None,
                });
                next.num_scheduled_tokens.push((ids[i].clone(), 1));
            }
            let in_flight = self.pipeline.num_in_flight();
            if in_flight >= depth || (next.num_scheduled_tokens.is_empty() && in_flight > 0) {
                let out = self.collect(None)?;
                if let Some((id, reason)) = out.failed.first() {
                    bail!("request {id} failed: {reason}");
                }
                for (id, toks) in out.req_ids.iter().zip(&out.sampled_token_ids) {
                    let i = index[id.as_str()];
                    if done[i] {
                        continue; // computed past its stop: dropped
                    }
                    outputs[i].extend_from_slice(toks);
                    if outputs[i].len() >= max_tokens || toks.iter().any(|t| stop_token_ids.contains(t)) {
                        done[i] = true;
                        finished.push(id.clone());
                    }
                }
                // Requests that stopped leave the next step.
                next.num_scheduled_tokens.retain(|(id, _)| !done[index[id.as_str()]]);
                next.cached_requests.retain(|c| !done[index[c.req_id.as_str()]]);
            }
            if next.num_scheduled_tokens.is_empty() && self.pipeline.num_in_flight() == 0 {
                next.finished_req_ids.append(&mut finished);
                self.forward_step(&next)?; // drop finished requests
                break;
            }
            step = next;
        }
        Ok(outputs)
    }

    /// A short prompt through prefill, decode and both kinds of draw (greedy; temperature with
    /// top-k and top-p), so that the first request does not pay MLX's first-use work (kernel
    /// builds on GPU backends; the CPU backend's fused kernels are built by the memory profile's
    /// forward already). Leaves no trace: the requests finish, and the
    /// draw counter and step timings are as before. The blocks it writes are free in vLLM's pool
    /// and rewritten before any request reads them.
    pub fn warm_up(&mut self) -> Result<()> {
        const PROMPT: usize = 4;
        const NEW_TOKENS: usize = 2;
        let start = std::time::Instant::now();
        let (num_blocks, num_groups) = self.cache.as_ref().map_or((0, 1), |c| (c.num_blocks, c.num_groups()));
        let needed = num_groups * (PROMPT + NEW_TOKENS).div_ceil(self.block_size);
        if num_blocks < needed {
            log::info!("warm-up skipped: the KV cache has {num_blocks} blocks, it needs {needed}");
            return Ok(());
        }
        let (draws, timings) = (self.draws, std::mem::take(&mut self.timings));
        let vocab = self.config.vocab_size.max(1) as i32;
        let prompt: Vec<i32> = (0..PROMPT as i32).map(|i| (i * 7 + 1) % vocab).collect();
        let sampled = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, ..Default::default() };
        let result = self
            .generate(std::slice::from_ref(&prompt), NEW_TOKENS, &SamplingParams::default(), &[], true)
            .and_then(|_| self.generate(std::slice::from_ref(&prompt), NEW_TOKENS, &sampled, &[], true));
        self.draws = draws;
        self.timings = timings;
        result?;
        log::info!("warm-up: prefill, decode and sampling ran in {:.2}s", start.elapsed().as_secs_f64());
        Ok(())
    }
}
