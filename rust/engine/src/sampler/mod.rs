//! Token choice for a batch of logits rows, on MLX, in vLLM's order: grammar bitmask, allowed
//! tokens, bad words, logit bias and min_tokens, penalties; then greedy argmax, or temperature,
//! min_p, top-k/top-p and a seeded draw. Also the logprobs vLLM reports.

mod choose;
mod logprobs;
mod params;
mod processors;
#[cfg(test)]
mod tests;

pub use choose::{choose, filter_logits, mix_seed, sample};
pub use logprobs::{gather_logprobs, log_softmax, LogprobsMode, TopLogprobs};
pub use params::{Row, SamplingParams, TokenCounts};
pub use processors::{bitmask_to_additive, process_logits};
