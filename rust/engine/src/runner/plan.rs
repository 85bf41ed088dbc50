//! The step plan: pure host data computed from the request table and the scheduler's step —
//! which requests run, where each one's tokens sit in the flat batch, which rows sample, which
//! report prompt logprobs, which inputs are still on the device, and the PRNG key of each draw.
//! Tensors are built from it once (`StepBatch::build`), after it is complete.

use std::collections::HashSet;

use anyhow::{ensure, Result};

use super::requests::{Deferred, Failures, RequestTable};
use crate::batch::SeqChunk;
use crate::sampler::mix_seed;

/// The PRNG stream of draws for requests without their own seed (the engine seed, and how many
/// draws it has given).
#[derive(Debug, Clone, Copy, Default)]
pub struct Draws {
    pub seed: u64,
    pub count: u64,
}

impl Draws {
    /// The key of a draw: a seeded request's depends only on its seed and output length, so its
    /// tokens do not depend on its batch.
    fn key(&mut self, seed: Option<u64>, num_output: usize) -> u64 {
        match seed {
            Some(seed) => mix_seed(seed, num_output as u64),
            None => {
                self.count += 1;
                mix_seed(self.seed, self.count)
            }
        }
    }
}

/// One request's prompt-logprob rows in this step.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRows {
    pub req_id: String,
    /// Flat index of the chunk's first token.
    pub first_flat: usize,
    /// Prompt position of the first row (position p reports the logprob of prompt token p + 1).
    pub start: usize,
    pub rows: usize,
    /// These rows end the prompt: the request's prompt logprobs are reported with this step.
    pub complete: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    /// Every scheduled request with its token count, in the order the step's output lists them.
    pub scheduled: Vec<(String, usize)>,
    /// Indices into `scheduled` of the requests that run, in batch order (failed ones do not).
    pub running: Vec<usize>,
    /// Index into `scheduled` of each request that samples (its chunk reaches its last token).
    pub sample_rows: Vec<usize>,
    /// Flat index of each sampling request's last token.
    pub last_tokens: Vec<i32>,
    pub prompt_rows: Vec<PromptRows>,
    /// (flat index, where it comes from) of input tokens still on the device.
    pub device_tokens: Vec<(usize, Deferred)>,
    /// PRNG key of each sampling row's draw.
    pub keys: Vec<u64>,
    pub num_tokens: usize,
}

impl StepPlan {
    /// A plan that runs nothing: every scheduled request failed.
    pub fn nothing(scheduled: &[(String, usize)]) -> Self {
        Self { scheduled: scheduled.to_vec(), ..Default::default() }
    }

    pub fn new(table: &RequestTable, scheduled: &[(String, usize)], failed: &Failures, draws: &mut Draws) -> Result<Self> {
        let failed: HashSet<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
        let mut plan = Self::nothing(scheduled);
        for (i, (id, n)) in scheduled.iter().enumerate() {
            if failed.contains(id.as_str()) {
                continue;
            }
            let s = table.state(id)?;
            let (start, end) = (s.num_computed, s.num_computed + n);
            ensure!(end <= s.tokens.len(), "request {id}: {n} tokens scheduled past its known tokens");
            let flat = plan.num_tokens;
            plan.running.push(i);
            if s.prompt_logprobs.is_some() {
                // Rows up to the last prompt position that has a next prompt token.
                let remaining = s.num_prompt as isize - start as isize - 1;
                let (rows, complete) = if *n as isize <= remaining { (*n as isize, false) } else { (remaining, true) };
                plan.prompt_rows.push(PromptRows { req_id: id.clone(), first_flat: flat, start, rows: rows.max(0) as usize, complete });
            }
            for d in s.deferred.iter().filter(|d| (start..end).contains(&d.pos)) {
                plan.device_tokens.push((flat + d.pos - start, *d));
            }
            plan.num_tokens += n;
            if end == s.tokens.len() {
                plan.sample_rows.push(i);
                plan.last_tokens.push(plan.num_tokens as i32 - 1);
                plan.keys.push(draws.key(s.sampling.seed, s.num_output()));
            }
        }
        Ok(plan)
    }

    /// The running requests' chunks, borrowing their tokens and block tables from the table.
    pub fn chunks<'a>(&self, table: &'a RequestTable) -> Result<Vec<SeqChunk<'a>>> {
        self.running
            .iter()
            .map(|&i| {
                let (id, n) = &self.scheduled[i];
                let s = table.state(id)?;
                Ok(SeqChunk { start: s.num_computed, tokens: &s.tokens[s.num_computed..s.num_computed + n], block_ids: &s.block_ids, images: None })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::pipeline::StepId;
    use super::super::requests::{Limits, PENDING_TOKEN};
    use super::super::schedule::{CachedRequest, NewRequest, SchedulerStep};
    use super::*;
    use crate::sampler::SamplingParams;

    const LIMITS: Limits = Limits { vocab_size: 100, kv: Some((1, 64)) };

    fn new(id: &str, prompt: &[i32], blocks: &[i32], computed: usize) -> NewRequest {
        NewRequest {
            req_id: id.into(),
            prompt_token_ids: prompt.to_vec(),
            block_ids: vec![blocks.to_vec()],
            num_computed_tokens: computed,
            sampling: SamplingParams::default(),
            pooling: None,
        }
    }

    fn cached(id: &str, computed: usize, outputs: usize) -> CachedRequest {
        CachedRequest {
            req_id: id.into(),
            resumed: false,
            new_block_ids: None,
            num_computed_tokens: computed,
            num_output_tokens: outputs,
            all_token_ids: None,
        }
    }

    fn apply(table: &mut RequestTable, step: &SchedulerStep) -> Failures {
        table.apply(step, LIMITS, |_| 1)
    }

    fn plan(table: &RequestTable, step: &SchedulerStep, failed: &Failures) -> StepPlan {
        StepPlan::new(table, &step.num_scheduled_tokens, failed, &mut Draws::default()).unwrap()
    }

    /// The runner's bookkeeping after a step: computed counts advance, sampled tokens arrive.
    fn after(table: &mut RequestTable, plan: &StepPlan, sampled: i32) {
        for &i in &plan.running {
            let (id, n) = &plan.scheduled[i];
            table.get_mut(id).unwrap().num_computed += n;
        }
        for &i in &plan.sample_rows {
            table.get_mut(&plan.scheduled[i].0).unwrap().tokens.push(sampled);
        }
    }

    #[test]
    fn decode_only() {
        let mut t = RequestTable::default();
        let first = SchedulerStep {
            new_requests: vec![new("a", &[1, 2, 3], &[0], 0), new("b", &[4, 5], &[1], 0)],
            num_scheduled_tokens: vec![("a".into(), 3), ("b".into(), 2)],
            ..Default::default()
        };
        apply(&mut t, &first);
        let p = plan(&t, &first, &vec![]);
        after(&mut t, &p, 7);
        let step = SchedulerStep {
            cached_requests: vec![cached("a", 3, 1), cached("b", 2, 1)],
            num_scheduled_tokens: vec![("a".into(), 1), ("b".into(), 1)],
            ..Default::default()
        };
        assert!(apply(&mut t, &step).is_empty());
        let p = plan(&t, &step, &vec![]);
        assert_eq!((p.num_tokens, p.sample_rows.clone(), p.last_tokens.clone()), (2, vec![0, 1], vec![0, 1]));
        let chunks = p.chunks(&t).unwrap();
        assert_eq!((chunks[0].start, chunks[0].tokens), (3, &[7][..]));
        assert_eq!((chunks[1].start, chunks[1].tokens), (2, &[7][..]));
    }

    #[test]
    fn mixed_prefill_and_decode_sample_where_chunks_end() {
        let mut t = RequestTable::default();
        let first = SchedulerStep {
            new_requests: vec![new("a", &[1, 2], &[0], 0)],
            num_scheduled_tokens: vec![("a".into(), 2)],
            ..Default::default()
        };
        apply(&mut t, &first);
        let p = plan(&t, &first, &vec![]);
        after(&mut t, &p, 9);
        // "a" decodes, "b" prefills the first 4 of its 6 tokens (a chunk that does not sample).
        let step = SchedulerStep {
            new_requests: vec![new("b", &[1, 2, 3, 4, 5, 6], &[1], 0)],
            cached_requests: vec![cached("a", 2, 1)],
            num_scheduled_tokens: vec![("b".into(), 4), ("a".into(), 1)],
            ..Default::default()
        };
        apply(&mut t, &step);
        let p = plan(&t, &step, &vec![]);
        assert_eq!(p.running, vec![0, 1]);
        assert_eq!(p.num_tokens, 5);
        assert_eq!(p.sample_rows, vec![1]);
        assert_eq!(p.last_tokens, vec![4]);
        assert_eq!(p.keys.len(), 1);
    }

    #[test]
    fn chunked_prefill_samples_and_completes_prompt_logprobs_at_its_end() {
        let mut t = RequestTable::default();
        let mut r = new("a", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0], 0);
        r.sampling.prompt_logprobs = Some(2);
        let first = SchedulerStep { new_requests: vec![r], num_scheduled_tokens: vec![("a".into(), 4)], ..Default::default() };
        apply(&mut t, &first);
        let p = plan(&t, &first, &vec![]);
        assert!(p.sample_rows.is_empty());
        assert_eq!(p.prompt_rows, vec![PromptRows { req_id: "a".into(), first_flat: 0, start: 0, rows: 4, complete: false }]);
        after(&mut t, &p, 0);
        let second = SchedulerStep {
            cached_requests: vec![cached("a", 4, 0)],
            num_scheduled_tokens: vec![("a".into(), 6)],
            ..Default::default()
        };
        apply(&mut t, &second);
        let p = plan(&t, &second, &vec![]);
        assert_eq!(p.sample_rows, vec![0]);
        assert_eq!(p.last_tokens, vec![5]);
        // Positions 4..9 report prompt tokens 5..10: 5 rows, the last ones of the prompt.
        assert_eq!(p.prompt_rows, vec![PromptRows { req_id: "a".into(), first_flat: 0, start: 4, rows: 5, complete: true }]);
    }

    #[test]
    fn prefix_cache_hit_starts_at_the_cached_length() {
        let mut t = RequestTable::default();
        let step = SchedulerStep {
            new_requests: vec![new("a", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[3, 4], 8)],
            num_scheduled_tokens: vec![("a".into(), 2)],
            ..Default::default()
        };
        apply(&mut t, &step);
        let p = plan(&t, &step, &vec![]);
        let chunks = p.chunks(&t).unwrap();
        assert_eq!((chunks[0].start, chunks[0].tokens), (8, &[9, 10][..]));
        assert_eq!(p.sample_rows, vec![0]);
    }

    #[test]
    fn resumed_request_takes_its_tokens_and_block_table_again() {
        let mut t = RequestTable::default();
        let first = SchedulerStep {
            new_requests: vec![new("a", &[1, 2, 3], &[0], 0)],
            num_scheduled_tokens: vec![("a".into(), 3)],
            ..Default::default()
        };
        apply(&mut t, &first);
        t.get_mut("a").unwrap().push_pending(StepId(0), 0);
        // Preempted; back with its 3 + 1 tokens, recomputed from scratch into new blocks.
        let resumed = SchedulerStep {
            cached_requests: vec![CachedRequest {
                resumed: true,
                new_block_ids: Some(vec![vec![5]]),
                all_token_ids: Some(vec![1, 2, 3, 8]),
                ..cached("a", 0, 1)
            }],
            num_scheduled_tokens: vec![("a".into(), 4)],
            ..Default::default()
        };
        assert!(apply(&mut t, &resumed).is_empty());
        let s = t.get("a").unwrap();
        assert_eq!((s.tokens.clone(), s.block_ids.clone(), s.deferred.len()), (vec![1, 2, 3, 8], vec![vec![5]], 0));
        let p = plan(&t, &resumed, &vec![]);
        assert!(p.device_tokens.is_empty());
        assert_eq!((p.num_tokens, p.sample_rows.clone()), (4, vec![0]));
    }

    #[test]
    fn several_kv_cache_groups_keep_one_table_each() {
        let mut t = RequestTable::default();
        let limits = Limits { vocab_size: 100, kv: Some((2, 64)) };
        let r = NewRequest { block_ids: vec![vec![0, 1], vec![2, 3]], ..new("a", &[1; 20], &[], 0) };
        let step = SchedulerStep { new_requests: vec![r], num_scheduled_tokens: vec![("a".into(), 20)], ..Default::default() };
        assert!(t.apply(&step, limits, |_| 1).is_empty());
        let grow = SchedulerStep {
            cached_requests: vec![CachedRequest { new_block_ids: Some(vec![vec![7], vec![]]), ..cached("a", 20, 0) }],
            ..Default::default()
        };
        t.get_mut("a").unwrap().tokens.push(4);
        assert!(t.apply(&grow, limits, |_| 1).is_empty());
        assert_eq!(t.get("a").unwrap().block_ids, vec![vec![0, 1, 7], vec![2, 3]]);
        // One table per group is required.
        let wrong = SchedulerStep {
            cached_requests: vec![CachedRequest { new_block_ids: Some(vec![vec![8]]), ..cached("a", 21, 1) }],
            ..Default::default()
        };
        assert_eq!(t.apply(&wrong, limits, |_| 1).len(), 1);
    }

    #[test]
    fn tokens_on_the_device_are_planned_at_their_flat_positions() {
        let mut t = RequestTable::default();
        let first = SchedulerStep {
            new_requests: vec![new("a", &[1, 2], &[0], 0), new("b", &[3, 4, 5], &[1], 0)],
            num_scheduled_tokens: vec![("a".into(), 2), ("b".into(), 3)],
            ..Default::default()
        };
        apply(&mut t, &first);
        let p = plan(&t, &first, &vec![]);
        for &i in &p.running {
            let (id, n) = &p.scheduled[i];
            t.get_mut(id).unwrap().num_computed += n;
        }
        for (row, &i) in p.sample_rows.iter().enumerate() {
            t.get_mut(&p.scheduled[i].0).unwrap().push_pending(StepId(3), row);
        }
        let step = SchedulerStep {
            cached_requests: vec![cached("a", 2, 1), cached("b", 3, 1)],
            num_scheduled_tokens: vec![("a".into(), 1), ("b".into(), 1)],
            ..Default::default()
        };
        apply(&mut t, &step);
        let p = plan(&t, &step, &vec![]);
        let got: Vec<(usize, usize)> = p.device_tokens.iter().map(|(flat, d)| (*flat, d.row)).collect();
        assert_eq!(got, vec![(0, 0), (1, 1)]);
        assert_eq!(p.chunks(&t).unwrap()[0].tokens, &[PENDING_TOKEN]);
    }

    #[test]
    fn failed_requests_stay_listed_and_do_not_run() {
        let mut t = RequestTable::default();
        let step = SchedulerStep {
            new_requests: vec![new("a", &[1, 2], &[0], 0), new("bad", &[1, 200], &[1], 0), new("c", &[3], &[2], 0)],
            num_scheduled_tokens: vec![("a".into(), 2), ("bad".into(), 2), ("c".into(), 1)],
            ..Default::default()
        };
        let failed = apply(&mut t, &step);
        assert_eq!(failed.len(), 1);
        assert!(failed[0].1.contains("token id 200"), "{failed:?}");
        let p = plan(&t, &step, &failed);
        assert_eq!(p.scheduled.len(), 3);
        assert_eq!(p.running, vec![0, 2]);
        assert_eq!((p.sample_rows.clone(), p.last_tokens.clone()), (vec![0, 2], vec![1, 2]));
        // A later step that still names it (scheduled before the failure was known) fails it again.
        let again = SchedulerStep {
            cached_requests: vec![cached("bad", 2, 0)],
            num_scheduled_tokens: vec![("bad".into(), 1)],
            ..Default::default()
        };
        assert_eq!(apply(&mut t, &again).len(), 1);
    }

    #[test]
    fn seeded_keys_follow_the_output_length_unseeded_the_engine_stream() {
        let mut t = RequestTable::default();
        let mut a = new("a", &[1, 2], &[0], 0);
        a.sampling.seed = Some(5);
        let step = SchedulerStep {
            new_requests: vec![a, new("b", &[3], &[1], 0)],
            num_scheduled_tokens: vec![("a".into(), 2), ("b".into(), 1)],
            ..Default::default()
        };
        apply(&mut t, &step);
        let mut draws = Draws { seed: 9, count: 0 };
        let p = StepPlan::new(&t, &step.num_scheduled_tokens, &vec![], &mut draws).unwrap();
        assert_eq!(p.keys, vec![mix_seed(5, 0), mix_seed(9, 1)]);
        assert_eq!(draws.count, 1);
    }
}
