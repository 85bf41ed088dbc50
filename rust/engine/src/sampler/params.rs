//! What a request asks of the sampler, and what the sampler reads of its history.

use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// <= 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// A seeded request draws from its own stream, independent of its batch.
    pub seed: Option<u64>,
    /// OpenAI-style: subtract `presence` once and `frequency` per occurrence in the output.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// > 1 discourages tokens of the prompt and the output (divides positive logits, multiplies
    /// negative ones).
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(i32, f32)>,
    pub allowed_token_ids: Option<Vec<i32>>,
    /// Token sequences never to complete: the last token is banned when the output ends with the rest.
    pub bad_words: Vec<Vec<i32>>,
    /// EOS and stop tokens are masked until the output has this many tokens.
    pub min_tokens: usize,
    pub stop_token_ids: Vec<i32>,
    /// Top logprobs to report per sampled token (`Some(0)`: the sampled token's only; -1: all).
    pub logprobs: Option<i32>,
    /// Top logprobs to report per prompt position.
    pub prompt_logprobs: Option<i32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// Reads the request's tokens on the host (not only their count).
    pub fn needs_history(&self) -> bool {
        self.has_penalties() || !self.bad_words.is_empty()
    }

    pub(super) fn has_masks(&self, output_len: usize) -> bool {
        self.allowed_token_ids.is_some()
            || !self.bad_words.is_empty()
            || !self.logit_bias.is_empty()
            || output_len < self.min_tokens
    }
}

/// One row of the batch to sample: its parameters, the PRNG key seed of this draw, and the
/// request's tokens so far.
pub struct Row<'a> {
    pub params: &'a SamplingParams,
    pub key: u64,
    pub prompt: &'a [i32],
    pub output: &'a [i32],
    /// The distinct tokens of `prompt` and `output`, when the caller keeps them up to date;
    /// counted here otherwise.
    pub counts: Option<&'a TokenCounts>,
}

/// A request's distinct tokens, for the penalties: occurrences in the output, presence in the
/// prompt. Extended as the request grows, so a step costs the new tokens, not the whole history.
#[derive(Debug, Clone, Default)]
pub struct TokenCounts {
    pub(super) tokens: Vec<i32>,
    pub(super) in_output: Vec<f32>,
    pub(super) in_prompt: Vec<bool>,
    index: HashMap<i32, usize>,
    num_prompt: usize,
    counted: usize,
}

impl TokenCounts {
    pub fn of(prompt: &[i32], output: &[i32]) -> Self {
        let mut c = Self::default();
        c.update(prompt, output);
        c
    }

    /// Counts the tokens added since the last call.
    pub fn update(&mut self, prompt: &[i32], output: &[i32]) {
        if self.num_prompt != prompt.len() || self.counted > prompt.len() + output.len() {
            *self = Self { num_prompt: prompt.len(), ..Self::default() };
        }
        for (i, &t) in prompt.iter().chain(output).enumerate().skip(self.counted) {
            let e = *self.index.entry(t).or_insert_with(|| {
                self.tokens.push(t);
                self.in_output.push(0.0);
                self.in_prompt.push(false);
                self.tokens.len() - 1
            });
            if i < self.num_prompt {
                self.in_prompt[e] = true;
            } else {
                self.in_output[e] += 1.0;
            }
        }
        self.counted = prompt.len() + output.len();
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
