//! What the engine reads from vLLM's scheduler once per step: the vLLM-shaped contract of the
//! runner (the PyO3 crate fills these from `SchedulerOutput`; `generate` fills them itself).

use crate::encoder::pooling::PoolingParams;
use crate::sampler::SamplingParams;

/// A request the scheduler sends for the first time (or again after it was dropped).
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub req_id: String,
    pub prompt_token_ids: Vec<i32>,
    /// One block table per KV-cache group.
    pub block_ids: Vec<Vec<i32>>,
    /// > 0 when a prefix of the prompt is already cached.
    pub num_computed_tokens: usize,
    pub sampling: SamplingParams,
    /// A pooling request (of a pooling model): what it asks instead of tokens.
    pub pooling: Option<PoolingParams>,
}

/// A request the runner already knows.
#[derive(Debug, Clone)]
pub struct CachedRequest {
    pub req_id: String,
    /// Preempted and scheduled again: `new_block_ids` replaces the block table.
    pub resumed: bool,
    /// Per KV-cache group.
    pub new_block_ids: Option<Vec<Vec<i32>>>,
    pub num_computed_tokens: usize,
    pub num_output_tokens: usize,
    /// The request's full token list, when the scheduler sends it (resumed requests).
    pub all_token_ids: Option<Vec<i32>>,
}

#[derive(Debug, Clone, Default)]
pub struct SchedulerStep {
    pub new_requests: Vec<NewRequest>,
    pub cached_requests: Vec<CachedRequest>,
    /// (req_id, tokens to run this step), in the order the step's output lists them.
    pub num_scheduled_tokens: Vec<(String, usize)>,
    pub finished_req_ids: Vec<String>,
    /// Scheduled requests the reader could not read, with the reason: they fail in this step.
    pub rejected: Vec<(String, String)>,
}

/// vLLM's structured-output bitmask: one row of `width` int32 words per request of `req_ids`.
pub struct GrammarBitmask<'a> {
    pub req_ids: &'a [String],
    pub words: &'a [i32],
    pub width: usize,
}
