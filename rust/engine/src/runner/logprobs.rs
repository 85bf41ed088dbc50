//! Reported logprobs: the sampled tokens' (one row per request of a step) and the prompts'
//! (accumulated over a request's prefill chunks, returned with the step that ends its prompt,
//! as vLLM's GPU runner does).

use anyhow::{ensure, Result};
use mlx_rs::Array;

use super::plan::PromptRows;
use super::requests::RequestTable;
use crate::models::CausalLm;
use crate::sampler::{gather_logprobs, LogprobsMode, TopLogprobs};

/// Row-major `[rows, cols]`: per row the target token first (the sampled one, or the next prompt
/// token), then the top `cols - 1` in descending order; the target's rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logprobs {
    pub cols: usize,
    pub token_ids: Vec<i32>,
    pub logprobs: Vec<f32>,
    pub ranks: Vec<i32>,
}

impl Logprobs {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { cols, token_ids: vec![0; rows * cols], logprobs: vec![0.0; rows * cols], ranks: vec![0; rows] }
    }

    /// Copy the rows of `top` (evaluated, at most `self.cols` wide) into rows `rows` of `self`.
    pub fn fill(&mut self, rows: impl ExactSizeIterator<Item = usize>, top: &TopLogprobs) -> Result<()> {
        let shape = top.token_ids.shape();
        let (n, c) = (shape[0] as usize, shape[1] as usize);
        ensure!(c <= self.cols && rows.len() == n, "logprobs rows out of range");
        let (ids, lps, ranks) =
            (top.token_ids.as_slice::<i32>(), top.scores.as_slice::<f32>(), top.ranks.as_slice::<i32>());
        for (i, dst) in rows.enumerate() {
            ensure!(dst < self.ranks.len(), "logprobs row {dst} out of range");
            let row = dst * self.cols;
            self.token_ids[row..row + c].copy_from_slice(&ids[i * c..(i + 1) * c]);
            self.logprobs[row..row + c].copy_from_slice(&lps[i * c..(i + 1) * c]);
            self.ranks[dst] = ranks[i];
        }
        Ok(())
    }
}

/// The logprobs of the sampled tokens of the rows that asked: (sampling rows, k, their top k).
pub struct SampledLogprobs {
    pub rows: Vec<i32>,
    pub k: usize,
    pub top: TopLogprobs,
}

/// The prompt logprobs one step computes for one request.
pub struct PromptChunk {
    pub req_id: String,
    /// Prompt position of the first row.
    pub start: usize,
    pub top: Option<TopLogprobs>,
    /// The last rows of the prompt: the request's prompt logprobs are reported with this step.
    pub complete: bool,
}

/// The prompt logprobs of the step's prefill rows (not evaluated). Prompt tokens skip the sampling
/// processors, so processed modes equal raw ones here.
pub fn prompt_chunks(
    model: &dyn CausalLm,
    hidden: &Array,
    rows: &[PromptRows],
    table: &RequestTable,
    mode: LogprobsMode,
) -> Result<Vec<PromptChunk>> {
    let mut chunks = Vec::with_capacity(rows.len());
    for r in rows {
        let s = table.state(&r.req_id)?;
        let Some(buf) = &s.prompt_logprobs else { continue };
        let top = if r.rows > 0 {
            let n = r.rows as i32;
            let idx = Array::from_iter(r.first_flat as i32..r.first_flat as i32 + n, &[n]);
            let logits = model.logits(&hidden.take_axis(&idx, 0)?)?;
            let targets = Array::from_slice(&s.tokens[r.start + 1..r.start + 1 + r.rows], &[n]);
            Some(gather_logprobs(&mode.scores(&logits)?, buf.cols as i32 - 1, &targets)?)
        } else {
            None
        };
        chunks.push(PromptChunk { req_id: r.req_id.clone(), start: r.start, top, complete: r.complete });
    }
    Ok(chunks)
}

/// Add evaluated prompt chunks to their requests' buffers; the buffers of prompts that ended are
/// handed out.
pub fn accumulate(chunks: Vec<PromptChunk>, table: &mut RequestTable) -> Result<Vec<(String, Logprobs)>> {
    let mut done = Vec::new();
    for c in chunks {
        let Some(buf) = table.get_mut(&c.req_id).and_then(|s| s.prompt_logprobs.as_mut()) else { continue };
        if let Some(top) = &c.top {
            buf.fill(c.start..c.start + top.ranks.shape()[0] as usize, top)?;
        }
        if c.complete {
            let s = table.get_mut(&c.req_id).expect("checked above");
            done.push((c.req_id, s.prompt_logprobs.take().expect("checked above")));
        }
    }
    Ok(done)
}
