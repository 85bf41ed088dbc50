//! The logprobs vLLM reports: from the raw or processed logits, the target token first, then
//! the top k with their ranks.

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

use super::choose::top_candidates;

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
    let top = top_candidates(scores, k)?;
    let top_scores = scores.take_along_axis(&top, 1)?;
    Ok(TopLogprobs {
        token_ids: ops::concatenate(&[targets, top], 1)?,
        scores: ops::concatenate(&[target_scores, top_scores], 1)?,
        ranks,
    })
}
