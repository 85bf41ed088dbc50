//! The in-flight pipeline: steps whose forward is submitted (pending: waiting for the grammar
//! bitmask and the sampler), and steps whose tokens are chosen and submitted (in flight: their
//! ids still on the device). Each step has an explicit id.
//!
//! Invariants:
//! - at most one pending step; in-flight steps are collected oldest first, and collecting
//!   another one is an error, never a silent mix-up;
//! - a request's `PENDING_TOKEN`s name the in-flight step and row their value comes from, and a
//!   step scheduled before they are collected reads them on the device (`device_tokens`);
//! - resolving a step writes its tokens into the requests still waiting for them (requests
//!   finished or failed meanwhile are skipped).

use std::collections::{HashMap, VecDeque};

use anyhow::{anyhow, ensure, Context, Result};
use mlx_rs::{transforms::eval, Array};

use super::logprobs::{PromptChunk, SampledLogprobs};
use super::plan::StepPlan;
use super::requests::{Deferred, Failures, RequestTable};

/// A step's id, counted from 0 in submission order (what vLLM's `get_output` collects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId(pub u64);

/// Host-side timings of one step, in seconds (see `ModelRunner::take_step_profile`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTiming {
    pub num_tokens: usize,
    pub num_seqs: usize,
    /// Request table, batch tensors and the forward's graph, built on the host.
    pub build: f64,
    /// `async_eval` of the forward: on a GPU, encoding and launching its kernels.
    pub submit: f64,
    /// Grammar mask, sampler and logprobs graph.
    pub sample_build: f64,
    /// The final `eval`: the device finishing the step, then the ids copied to the host.
    pub wait: f64,
    /// Input tokens read on the device from earlier steps' sampled ids (async scheduling).
    pub device_tokens: usize,
}

/// A step whose forward is submitted and whose tokens are not chosen yet.
pub struct PendingStep {
    pub plan: StepPlan,
    /// float32 logits `[sample_rows, V]`.
    pub logits: Option<Array>,
    /// Pooling models: the pooled float32 rows `[sample_rows, hidden]` (or the classifier's
    /// logits `[sample_rows, labels]`) instead of logits.
    pub pooled: Option<Array>,
    pub prompt_chunks: Vec<PromptChunk>,
    pub timing: StepTiming,
    pub failed: Failures,
}

impl PendingStep {
    /// A step that runs nothing (its requests failed, or it had none).
    pub fn nothing(plan: StepPlan, failed: Failures) -> Self {
        Self { plan, logits: None, pooled: None, prompt_chunks: Vec::new(), timing: StepTiming::default(), failed }
    }
}

/// A step whose tokens are chosen and submitted, not yet read back to the host.
pub struct InFlight {
    pub id: StepId,
    pub scheduled: Vec<(String, usize)>,
    /// Index into `scheduled` of each sampling row.
    pub sample_rows: Vec<usize>,
    /// `[sample_rows]` int32.
    pub ids: Option<Array>,
    pub logprobs: Option<SampledLogprobs>,
    pub prompt_chunks: Vec<PromptChunk>,
    pub timing: StepTiming,
    /// The ids on the host, once evaluated.
    pub host: Option<Vec<i32>>,
    pub failed: Failures,
}

impl InFlight {
    /// A step with nothing on the device: no tokens, or all of its requests failed.
    pub fn done(id: StepId, scheduled: Vec<(String, usize)>, failed: Failures) -> Self {
        Self {
            id,
            scheduled,
            sample_rows: Vec::new(),
            ids: None,
            logprobs: None,
            prompt_chunks: Vec::new(),
            timing: StepTiming::default(),
            host: Some(Vec::new()),
            failed,
        }
    }

    /// What the step's output reads: the ids, the sampled tokens' and the prompts' logprobs.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v: Vec<&Array> = self.ids.iter().collect();
        let tops = self.logprobs.iter().map(|l| &l.top).chain(self.prompt_chunks.iter().filter_map(|c| c.top.as_ref()));
        for t in tops {
            v.extend([&t.token_ids, &t.scores, &t.ranks]);
        }
        v
    }
}

#[derive(Default)]
pub struct Pipeline {
    pending: Option<PendingStep>,
    /// Oldest first (two with vLLM's async scheduling).
    in_flight: VecDeque<InFlight>,
    next_id: u64,
}

impl Pipeline {
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn is_idle(&self) -> bool {
        self.pending.is_none() && self.in_flight.is_empty()
    }

    pub fn num_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn set_pending(&mut self, step: PendingStep) -> Result<()> {
        ensure!(self.pending.is_none(), "a step is submitted twice without sampling its tokens");
        self.pending = Some(step);
        Ok(())
    }

    /// The pending step, if any, and the id its sampled tokens get.
    pub fn take_pending(&mut self) -> (StepId, Option<PendingStep>) {
        let id = StepId(self.next_id);
        self.next_id += 1;
        (id, self.pending.take())
    }

    pub fn push(&mut self, step: InFlight) {
        self.in_flight.push_back(step);
    }

    /// Whether the oldest step's ids are still on the device.
    pub fn oldest_on_device(&self) -> bool {
        self.in_flight.front().is_some_and(|f| f.host.is_none())
    }

    /// Token ids `base` `[T]` with the positions of `patches` taken from in-flight steps' ids on
    /// the device (their values are not on the host yet).
    pub fn device_tokens(&self, base: &Array, patches: &[(usize, Deferred)]) -> Result<Array> {
        let t = base.shape()[0] as usize;
        let mut sources: Vec<Array> = Vec::new();
        let mut offsets: HashMap<StepId, usize> = HashMap::new();
        let (mut idx, mut mask) = (vec![0i32; t], vec![false; t]);
        for &(flat, d) in patches {
            let offset = match offsets.get(&d.step) {
                Some(&o) => o,
                None => {
                    let ids = self
                        .in_flight
                        .iter()
                        .find(|f| f.id == d.step)
                        .and_then(|f| f.ids.clone())
                        .ok_or_else(|| anyhow!("a pending token's step {:?} is no longer in flight", d.step))?;
                    let o = sources.iter().map(|a| a.shape()[0] as usize).sum();
                    sources.push(ids);
                    offsets.insert(d.step, o);
                    o
                }
            };
            idx[flat] = (offset + d.row) as i32;
            mask[flat] = true;
        }
        let src = if sources.len() == 1 { sources.pop().unwrap() } else { mlx_rs::ops::concatenate(&sources, 0)? };
        let taken = src.take_axis(&Array::from_slice(&idx, &[t as i32]), 0)?;
        if patches.len() == t {
            return Ok(taken);
        }
        Ok(mlx_rs::ops::select(&Array::from_slice(&mask, &[t as i32]), &taken, base)?)
    }

    /// Wait for in-flight step `i` and put its tokens in place of their placeholders.
    pub fn resolve(&mut self, i: usize, table: &mut RequestTable) -> Result<()> {
        let Some(f) = self.in_flight.get_mut(i) else { return Ok(()) };
        if f.host.is_some() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        eval(f.arrays()).context("running the step")?;
        f.timing.wait += t.elapsed().as_secs_f64();
        let host = f.ids.as_ref().map(|a| a.as_slice::<i32>().to_vec()).unwrap_or_default();
        for (row, &b) in f.sample_rows.iter().enumerate() {
            // Requests finished or failed meanwhile no longer wait for this token.
            if let Some(s) = table.get_mut(&f.scheduled[b].0) {
                s.resolve(f.id, row, host[row]);
            }
        }
        f.host = Some(host);
        Ok(())
    }

    /// Wait for every step in flight (their tokens are needed on the host).
    pub fn resolve_all(&mut self, table: &mut RequestTable) -> Result<()> {
        for i in 0..self.in_flight.len() {
            self.resolve(i, table)?;
        }
        Ok(())
    }

    /// The oldest step, which must be `expected` when the caller names one.
    pub fn pop_oldest(&mut self, expected: Option<StepId>) -> Result<InFlight> {
        let oldest = self.in_flight.front().map(|f| f.id).ok_or_else(|| anyhow!("no submitted step to collect"))?;
        if let Some(want) = expected {
            ensure!(want == oldest, "step {} collected while step {} is the oldest in flight", want.0, oldest.0);
        }
        Ok(self.in_flight.pop_front().expect("checked above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_collected_oldest_first_and_by_their_id() {
        let mut p = Pipeline::default();
        let (a, _) = p.take_pending();
        p.push(InFlight::done(a, Vec::new(), Vec::new()));
        let (b, _) = p.take_pending();
        p.push(InFlight::done(b, Vec::new(), Vec::new()));
        assert_ne!(a, b);
        let err = p.pop_oldest(Some(b)).err().expect("b is not the oldest");
        assert!(err.to_string().contains("is the oldest"), "{err}");
        assert_eq!(p.pop_oldest(Some(a)).unwrap().id, a);
        assert_eq!(p.pop_oldest(None).unwrap().id, b);
        assert!(p.pop_oldest(None).is_err());
    }

    #[test]
    fn a_second_pending_step_is_an_error() {
        let mut p = Pipeline::default();
        p.set_pending(PendingStep::nothing(StepPlan::default(), Vec::new())).unwrap();
        assert!(p.set_pending(PendingStep::nothing(StepPlan::default(), Vec::new())).is_err());
    }
}
