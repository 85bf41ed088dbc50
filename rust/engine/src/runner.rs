//! The model runner: per-request state, one step = schedule in, tensors built once, forward,
//! sample, out. Usable from vLLM (through the PyO3 surface) and alone (`generate`).

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use mlx_rs::{
    transforms::{async_eval, eval},
    Array, Dtype,
};

use crate::batch::{SeqChunk, StepBatch};
use crate::config::ModelConfig;
use crate::dtype::{dtype_name, parse_dtype};
use crate::kv_cache::PagedKvCache;
use crate::mlx_ext::device::{self, DeviceKind};
use crate::models::{self, CausalLm};
use crate::paged_attention::AttentionBackend;
use crate::sampler::{
    bitmask_to_additive, choose, gather_logprobs, mix_seed, LogprobsMode, Row, SamplingParams, TokenCounts, TopLogprobs,
};
use crate::weights::{WeightOptions, WeightSource, Weights};

#[derive(Debug, Clone, Default)]
pub struct RunnerOptions {
    pub block_size: usize,
    /// None: the GPU when MLX has one, else the CPU.
    pub device: Option<DeviceKind>,
    /// None: float32 on CPU, the checkpoint's dtype on GPU.
    pub dtype: Option<String>,
    /// Decode attention through gathered copies of the history even where a page-reading kernel
    /// exists (for A/B measurements).
    pub gather_attention: bool,
}

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
    /// (req_id, tokens to run this step), in the order the runner processes them.
    pub num_scheduled_tokens: Vec<(String, usize)>,
    pub finished_req_ids: Vec<String>,
    /// Scheduled requests the reader could not read, with the reason: they fail in this step.
    pub rejected: Vec<(String, String)>,
}

/// Reported logprobs, row-major `[rows, cols]`: per row the target token first (the sampled one,
/// or the next prompt token), then the top `cols - 1` in descending order; the target's rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logprobs {
    pub cols: usize,
    pub token_ids: Vec<i32>,
    pub logprobs: Vec<f32>,
    pub ranks: Vec<i32>,
}

impl Logprobs {
    fn zeros(rows: usize, cols: usize) -> Self {
        Self { cols, token_ids: vec![0; rows * cols], logprobs: vec![0.0; rows * cols], ranks: vec![0; rows] }
    }

    /// Copy the rows of `top` (evaluated, at most `self.cols` wide) into rows `rows` of `self`.
    fn fill(&mut self, rows: impl ExactSizeIterator<Item = usize>, top: &TopLogprobs) -> Result<()> {
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

#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub req_ids: Vec<String>,
    /// Per request: the sampled token, or nothing when its chunk did not reach the end of its tokens.
    pub sampled_token_ids: Vec<Vec<i32>>,
    /// One row per request of `req_ids` (zeros for those not asking), when a sampling request asks.
    pub logprobs: Option<Logprobs>,
    /// The whole prompt's logprobs (`num_prompt - 1` rows), for requests whose prefill ended now.
    pub prompt_logprobs: Vec<(String, Logprobs)>,
    /// Requests of the step that failed (no token), with the reason; the engine has forgotten
    /// them and serves the others.
    pub failed: Vec<(String, String)>,
}

/// vLLM's structured-output bitmask: one row of `width` int32 words per request of `req_ids`.
pub struct GrammarBitmask<'a> {
    pub req_ids: &'a [String],
    pub words: &'a [i32],
    pub width: usize,
}

struct RequestState {
    tokens: Vec<i32>,
    num_prompt: usize,
    /// Per KV-cache group.
    block_ids: Vec<Vec<i32>>,
    num_computed: usize,
    sampling: SamplingParams,
    /// Prompt logprobs gathered so far, while the prompt is being prefilled.
    prompt_logprobs: Option<Logprobs>,
    /// Distinct tokens for the penalties, counted as the request grows.
    counts: TokenCounts,
    /// Sampled tokens not on the host yet (at most one per step in flight): `tokens` holds a
    /// placeholder at their positions, and the next step reads them from the device.
    deferred: Vec<Deferred>,
}

/// A token of `tokens` still on the device: row `row` of in-flight step `seq`'s ids.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Deferred {
    seq: u64,
    pos: usize,
    row: usize,
}

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

/// Step timings kept for profiling (the most recent ones).
const MAX_TIMINGS: usize = 4096;

/// A step whose forward is submitted and whose tokens are not chosen yet (vLLM asks for them in a
/// second call, with the grammar bitmask computed meanwhile).
struct PendingStep {
    scheduled: Vec<(String, usize)>,
    /// Batch index of each request that samples, and the PRNG key of its draw.
    sample_rows: Vec<usize>,
    keys: Vec<u64>,
    /// float32 logits `[sample_rows, V]`.
    logits: Option<Array>,
    prompt_chunks: Vec<PromptChunk>,
    timing: StepTiming,
    failed: Vec<(String, String)>,
}

impl PendingStep {
    /// A step that runs nothing (its requests failed).
    fn nothing(scheduled: &[(String, usize)]) -> Self {
        Self {
            scheduled: scheduled.to_vec(),
            sample_rows: Vec::new(),
            keys: Vec::new(),
            logits: None,
            prompt_chunks: Vec::new(),
            timing: StepTiming::default(),
            failed: Vec::new(),
        }
    }
}

/// A step whose tokens are chosen and submitted, not yet read back to the host.
struct InFlight {
    seq: u64,
    scheduled: Vec<(String, usize)>,
    sample_rows: Vec<usize>,
    /// `[sample_rows]` int32.
    ids: Option<Array>,
    /// (sampling rows that ask, k, their logprobs).
    top: Option<(Vec<i32>, usize, TopLogprobs)>,
    prompt_chunks: Vec<PromptChunk>,
    timing: StepTiming,
    /// The ids on the host, once evaluated.
    host: Option<Vec<i32>>,
    failed: Vec<(String, String)>,
}

impl InFlight {
    /// A step with nothing on the device: no tokens, or all of its requests failed.
    fn done(seq: u64, scheduled: Vec<(String, usize)>, failed: Vec<(String, String)>) -> Self {
        Self {
            seq,
            scheduled,
            sample_rows: Vec::new(),
            ids: None,
            top: None,
            prompt_chunks: Vec::new(),
            timing: StepTiming::default(),
            host: Some(Vec::new()),
            failed,
        }
    }

    /// What the step's output reads: the ids, the sampled tokens' and the prompts' logprobs.
    fn arrays(&self) -> Vec<&Array> {
        let mut v: Vec<&Array> = self.ids.iter().collect();
        let tops = self.top.iter().map(|(_, _, t)| t).chain(self.prompt_chunks.iter().filter_map(|c| c.top.as_ref()));
        for t in tops {
            v.extend([&t.token_ids, &t.scores, &t.ranks]);
        }
        v
    }
}

/// The prompt logprobs one step computes for one request.
struct PromptChunk {
    req_id: String,
    /// Prompt position of the first row.
    start: usize,
    top: Option<TopLogprobs>,
    /// The last rows of the prompt: the request's prompt logprobs are reported with this step.
    complete: bool,
}

pub struct ModelRunner {
    pub config: ModelConfig,
    pub block_size: usize,
    pub device: DeviceKind,
    pub dtype: Dtype,
    pub weights_nbytes: usize,
    gather_attention: bool,
    /// How the allocated cache's attention reads its pages (`Gather` until allocation).
    attention: AttentionBackend,
    model: Box<dyn CausalLm>,
    cache: Option<PagedKvCache>,
    requests: HashMap<String, RequestState>,
    /// Draws of requests without their own seed come from this stream.
    seed: u64,
    draws: u64,
    logprobs_mode: LogprobsMode,
    pending: Option<PendingStep>,
    /// Sampled steps in submission order, oldest first (two with vLLM's async scheduling).
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    timings: Vec<StepTiming>,
    /// A failure to raise once at this stage of the next step (tests of fault isolation).
    fault: Option<FaultStage>,
    /// Requests failed and forgotten that the scheduler has not finished yet: a step scheduled
    /// before it learnt of the failure may still name them.
    failed_requests: std::collections::HashSet<String>,
}

/// Where a step can fail: building and submitting the forward, choosing the tokens, or on the
/// device while the step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStage {
    Forward,
    Sample,
    Device,
}

impl std::str::FromStr for FaultStage {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "forward" => Ok(Self::Forward),
            "sample" => Ok(Self::Sample),
            "device" => Ok(Self::Device),
            _ => bail!("unknown fault stage {s:?}: forward, sample or device"),
        }
    }
}

impl ModelRunner {
    pub fn load(model_path: &Path, opts: &RunnerOptions) -> Result<Self> {
        let start = std::time::Instant::now();
        ensure!(opts.block_size > 0, "block_size must be positive");
        let device = device::select(opts.device)?;
        let config_dir = if model_path.is_file() { model_path.parent().unwrap_or(Path::new(".")) } else { model_path };
        let config = ModelConfig::from_file(&config_dir.join("config.json"))?;
        let source = WeightSource::locate(model_path)?;
        let dtype = match device {
            // MLX's CPU backend has fast (BLAS) matmul for float32 only.
            DeviceKind::Cpu => {
                if let Some(d) = &opts.dtype {
                    if parse_dtype(d)? != Dtype::Float32 {
                        log::info!("dtype {d} requested; the CPU backend computes in float32");
                    }
                }
                Dtype::Float32
            }
            DeviceKind::Gpu => match opts.dtype.as_deref().or(config.checkpoint_dtype()) {
                Some(d) => parse_dtype(d)?,
                None => Dtype::Float16,
            },
        };
        let mut weights = Weights::load(&source, &config, WeightOptions { dtype, dequantize: device == DeviceKind::Cpu })?;
        let model = models::load(&config, &mut weights)
            .with_context(|| format!("building the model from {}", model_path.display()))?;
        let leftover = weights.leftover();
        if !leftover.is_empty() {
            log::warn!("{} checkpoint tensors unused, e.g. {}", leftover.len(), leftover[0]);
        }
        drop(weights);
        let linears = model.parameters();
        let mut arrays: Vec<&Array> = linears.iter().flat_map(|l| l.arrays()).collect();
        arrays.extend(model.norms().iter().map(|n| &n.weight));
        eval(arrays.iter().copied()).context("materialising weights")?;
        let weights_nbytes = linears.iter().map(|l| l.nbytes()).sum::<usize>()
            + model.norms().iter().map(|n| n.weight.nbytes()).sum::<usize>();
        log::info!(
            "loaded {} from {} ({}) on {:?}: {} layers, {} in {}, {:.1} MiB, {:.2}s",
            config.architectures.first().map(String::as_str).unwrap_or("?"),
            model_path.display(),
            match &source { WeightSource::Gguf(_) => "gguf", WeightSource::Safetensors(_) => "safetensors" },
            device,
            config.num_hidden_layers,
            if linears.iter().any(|l| l.quant.is_some()) { "quantized" } else { "dense" },
            dtype_name(dtype),
            weights_nbytes as f64 / (1 << 20) as f64,
            start.elapsed().as_secs_f64()
        );
        Ok(Self {
            config,
            block_size: opts.block_size,
            device,
            dtype,
            weights_nbytes,
            gather_attention: opts.gather_attention,
            attention: AttentionBackend::Gather,
            model,
            cache: None,
            requests: HashMap::new(),
            seed: 0,
            draws: 0,
            logprobs_mode: LogprobsMode::default(),
            pending: None,
            in_flight: VecDeque::new(),
            next_seq: 0,
            timings: Vec::new(),
            fault: None,
            failed_requests: Default::default(),
        })
    }

    /// The window of the model's sliding-window layers (families have one size at most).
    pub fn sliding_window(&self) -> Option<usize> {
        self.config.layer_windows().into_iter().flatten().max()
    }

    /// A step's tensors, for this model's windows and this cache's attention.
    fn build_batch(&self, chunks: &[SeqChunk]) -> Result<StepBatch> {
        StepBatch::build(chunks, self.block_size, self.sliding_window(), self.attention)
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    pub fn kv_bytes_per_block(&self) -> usize {
        PagedKvCache::bytes_per_block(
            self.num_layers(),
            self.block_size,
            self.config.num_kv_heads(),
            self.config.head_dim(),
            self.dtype,
        )
    }

    /// Seed for draws of requests without their own seed.
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
        self.draws = 0;
    }

    /// The timings of the steps run since the last call (at most the last 4096).
    pub fn take_step_profile(&mut self) -> Vec<StepTiming> {
        std::mem::take(&mut self.timings)
    }

    /// Make the next step fail at `stage`, once, as an error of MLX or of the engine would.
    pub fn inject_fault(&mut self, stage: FaultStage) {
        self.fault = Some(stage);
    }

    fn injected(&mut self, stage: FaultStage) -> Result<()> {
        if self.fault == Some(stage) {
            self.fault = None;
            bail!("injected fault ({stage:?})");
        }
        Ok(())
    }

    pub fn set_logprobs_mode(&mut self, mode: LogprobsMode) {
        self.logprobs_mode = mode;
    }

    /// `-1` (all tokens) as the vocabulary size.
    fn resolve_num_logprobs(&self, k: i32) -> usize {
        if k < 0 { self.config.vocab_size } else { k as usize }
    }

    pub fn allocate_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        let n = self.num_layers();
        self.allocate_kv_cache_groups(num_blocks, vec![0; n], (0..n).collect())
    }

    /// The KV cache as vLLM plans it: each layer's KV-cache group (its block tables) and
    /// storage (shared by one layer of each group).
    pub fn allocate_kv_cache_groups(&mut self, num_blocks: usize, layer_group: Vec<usize>, layer_storage: Vec<usize>) -> Result<()> {
        ensure!(
            layer_group.len() == self.num_layers(),
            "KV-cache plan covers {} layers, the model has {}",
            layer_group.len(),
            self.num_layers()
        );
        self.cache = None;
        let cache = PagedKvCache::with_groups(
            layer_group,
            layer_storage,
            num_blocks,
            self.block_size,
            self.config.num_kv_heads(),
            self.config.head_dim(),
            self.dtype,
        )?;
        self.attention = AttentionBackend::choose(self.gather_attention, cache.head_dim, cache.dtype);
        log::info!(
            "KV cache: {num_blocks} blocks of {} tokens, {} KV-cache group(s), {:.1} MiB; decode attention {}",
            self.block_size,
            cache.num_groups(),
            cache.arrays().map(|a| a.nbytes()).sum::<usize>() as f64 / (1 << 20) as f64,
            self.attention.describe()
        );
        self.cache = Some(cache);
        Ok(())
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.num_blocks)
    }

    fn cache_mut(&mut self) -> Result<&mut PagedKvCache> {
        self.cache.as_mut().ok_or_else(|| anyhow!("the KV cache is not allocated"))
    }

    /// Bytes MLX allocates beyond the weights for one forward of `num_tokens` tokens (one request).
    pub fn profile_peak_memory(&mut self, num_tokens: usize) -> Result<usize> {
        ensure!(num_tokens > 0, "profile needs at least one token");
        let saved = self.cache.take();
        mlx_rs::memory::clear_cache()?;
        mlx_rs::memory::reset_peak_memory()?;
        let base = mlx_rs::memory::active_memory()?;
        let blocks = num_tokens.div_ceil(self.block_size);
        let result = (|| -> Result<usize> {
            self.allocate_kv_cache(blocks)?;
            let tokens = vec![0i32; num_tokens];
            let block_ids: Vec<i32> = (0..blocks as i32).collect();
            let block_ids = [block_ids];
            let chunk = SeqChunk { start: 0, tokens: &tokens, block_ids: &block_ids };
            let batch = self.build_batch(&[chunk])?;
            let cache = self.cache.as_mut().unwrap();
            let hidden = self.model.forward(&batch, cache)?;
            let last = hidden.take_axis(&Array::from_slice(&[num_tokens as i32 - 1], &[1]), 0)?;
            let logits = self.model.logits(&last)?;
            eval([&logits].into_iter().chain(cache.arrays()))?;
            Ok(mlx_rs::memory::peak_memory()?.saturating_sub(base))
        })();
        self.cache = saved;
        mlx_rs::memory::clear_cache()?;
        result
    }

    /// The first half of a step: update request state, build the batch, submit the forward (MLX
    /// computes it in the background while the caller prepares the grammar bitmask).
    ///
    /// A request the step cannot serve (unreadable, out-of-range tokens, inconsistent with what
    /// the engine knows) fails alone; an error of the forward itself fails the step's requests.
    /// Either way the failed requests are forgotten and reported in the step's output, and the
    /// engine goes on. Only an engine-level inconsistency is an `Err`.
    pub fn forward_step(&mut self, step: &SchedulerStep) -> Result<()> {
        ensure!(self.pending.is_none(), "a step is submitted twice without sampling its tokens");
        let t0 = std::time::Instant::now();
        let mut failed = Vec::new();
        for (id, reason) in &step.rejected {
            fail(&mut failed, id, reason.clone());
        }
        self.apply_step(step, &mut failed);
        self.failed_requests.extend(failed.iter().map(|(id, _)| id.clone()));
        if step.num_scheduled_tokens.is_empty() {
            return Ok(());
        }
        let pending = match catching(|| self.submit_forward(step, &failed, t0)) {
            Ok(p) => p,
            Err(e) => {
                log::error!("a step of {} requests failed: {e:#}", step.num_scheduled_tokens.len());
                self.fail_all(&step.num_scheduled_tokens, &mut failed, &e);
                PendingStep::nothing(&step.num_scheduled_tokens)
            }
        };
        self.pending = Some(PendingStep { failed, ..pending });
        Ok(())
    }

    /// The scheduler's step applied to the request table; requests that cannot be applied are
    /// forgotten and listed in `failed`.
    fn apply_step(&mut self, step: &SchedulerStep, failed: &mut Vec<(String, String)>) {
        for id in &step.finished_req_ids {
            self.requests.remove(id);
            self.failed_requests.remove(id);
        }
        for r in &step.new_requests {
            if let Err(e) = self.check_new(r) {
                fail(failed, &r.req_id, format!("{e:#}"));
                continue;
            }
            let prompt_logprobs = r.sampling.prompt_logprobs.map(|k| {
                Logprobs::zeros(r.prompt_token_ids.len().saturating_sub(1), self.resolve_num_logprobs(k) + 1)
            });
            self.requests.insert(
                r.req_id.clone(),
                RequestState {
                    tokens: r.prompt_token_ids.clone(),
                    num_prompt: r.prompt_token_ids.len(),
                    block_ids: r.block_ids.clone(),
                    num_computed: r.num_computed_tokens,
                    sampling: r.sampling.clone(),
                    prompt_logprobs,
                    counts: TokenCounts::default(),
                    deferred: Vec::new(),
                },
            );
        }
        for c in &step.cached_requests {
            if self.failed_requests.contains(&c.req_id) {
                failed.push((c.req_id.clone(), "failed in an earlier step".into()));
                continue;
            }
            if let Err(e) = self.apply_cached(c) {
                self.requests.remove(&c.req_id);
                fail(failed, &c.req_id, format!("{e:#}"));
            }
        }
        // Scheduled tokens the request does not have: the engine and the scheduler disagree on
        // this request (never seen in practice; checked so that it cannot take the step down).
        for (id, n) in &step.num_scheduled_tokens {
            let Some(s) = self.requests.get(id) else {
                if !failed.iter().any(|(f, _)| f == id) {
                    fail(failed, id, "scheduled but never sent to the engine".into());
                }
                continue;
            };
            if s.num_computed + n > s.tokens.len() {
                let reason = format!(
                    "{n} tokens scheduled from position {} but only {} are known",
                    s.num_computed,
                    s.tokens.len()
                );
                self.requests.remove(id);
                fail(failed, id, reason);
            }
        }
    }

    /// Token ids inside the model's vocabulary, block tables for the cache's groups and blocks.
    fn check_tokens(&self, tokens: &[i32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            bail!("token id {t} is outside the model's vocabulary of {vocab}");
        }
        Ok(())
    }

    fn check_blocks(&self, tables: &[Vec<i32>]) -> Result<()> {
        let Some(cache) = &self.cache else { return Ok(()) };
        ensure!(
            tables.len() == cache.num_groups(),
            "{} block tables for {} KV-cache groups",
            tables.len(),
            cache.num_groups()
        );
        let n = cache.num_blocks;
        if let Some(&b) = tables.iter().flatten().find(|&&b| b < 0 || b as usize >= n) {
            bail!("block id {b} is outside the KV cache of {n} blocks");
        }
        Ok(())
    }

    fn check_new(&self, r: &NewRequest) -> Result<()> {
        ensure!(!r.prompt_token_ids.is_empty(), "the prompt is empty");
        self.check_tokens(&r.prompt_token_ids)?;
        self.check_blocks(&r.block_ids)?;
        for t in r.sampling.allowed_token_ids.iter().flatten().chain(r.sampling.logit_bias.iter().map(|(t, _)| t)) {
            self.check_tokens(std::slice::from_ref(t))?;
        }
        Ok(())
    }

    fn apply_cached(&mut self, c: &CachedRequest) -> Result<()> {
        if let Some(all) = &c.all_token_ids {
            self.check_tokens(all)?;
        }
        if let Some(ids) = &c.new_block_ids {
            self.check_blocks(ids)?;
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

    /// The requests of `scheduled` not failed yet fail with `e` and are forgotten.
    fn fail_all(&mut self, scheduled: &[(String, usize)], failed: &mut Vec<(String, String)>, e: &anyhow::Error) {
        for (id, _) in scheduled {
            if !failed.iter().any(|(f, _)| f == id) {
                self.requests.remove(id);
                self.failed_requests.insert(id.clone());
                failed.push((id.clone(), format!("the engine failed this step: {e:#}")));
            }
        }
    }

    /// Plan the step over the requests that did not fail, build its tensors and submit the forward.
    fn submit_forward(&mut self, step: &SchedulerStep, failed: &[(String, String)], t0: std::time::Instant) -> Result<PendingStep> {
        self.injected(FaultStage::Forward)?;
        let failed_ids: std::collections::HashSet<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
        let mut chunks = Vec::with_capacity(step.num_scheduled_tokens.len());
        let mut sample_rows = Vec::new(); // batch index
        let mut flat_last = Vec::new(); // flat index of a sampling request's last token
        let mut prompt_rows = Vec::new(); // (batch index, flat index of the chunk's first token)
        let mut patches = Vec::new(); // (flat index, in-flight token) of tokens still on the device
        let mut flat = 0usize;
        for (i, (id, n)) in step.num_scheduled_tokens.iter().enumerate() {
            if failed_ids.contains(id.as_str()) {
                continue;
            }
            // apply_step failed the requests these would refuse.
            let s = self.requests.get(id).ok_or_else(|| anyhow!("scheduled request {id} was never sent"))?;
            let end = s.num_computed + n;
            ensure!(end <= s.tokens.len(), "request {id}: {n} tokens scheduled past its known tokens");
            chunks.push(SeqChunk { start: s.num_computed, tokens: &s.tokens[s.num_computed..end], block_ids: &s.block_ids });
            if s.prompt_logprobs.is_some() {
                prompt_rows.push((i, flat));
            }
            for d in s.deferred.iter().filter(|d| (s.num_computed..end).contains(&d.pos)) {
                patches.push((flat + d.pos - s.num_computed, *d));
            }
            flat += n;
            if end == s.tokens.len() {
                sample_rows.push(i);
                flat_last.push(flat as i32 - 1);
            }
        }
        if chunks.is_empty() {
            return Ok(PendingStep::nothing(&step.num_scheduled_tokens));
        }
        let mut batch = self.build_batch(&chunks)?;
        drop(chunks);
        if !patches.is_empty() {
            batch.token_ids = self.patched_tokens(&batch.token_ids, &patches)?;
        }

        let mut keys = Vec::with_capacity(sample_rows.len());
        for &i in &sample_rows {
            let s = &self.requests[&step.num_scheduled_tokens[i].0];
            let key = match s.sampling.seed {
                Some(seed) => mix_seed(seed, (s.tokens.len() - s.num_prompt) as u64),
                None => {
                    self.draws += 1;
                    mix_seed(self.seed, self.draws)
                }
            };
            keys.push(key);
        }

        let model = &self.model;
        let cache = self.cache.as_mut().ok_or_else(|| anyhow!("the KV cache is not allocated"))?;
        let hidden = model.forward(&batch, cache)?;
        let logits = if sample_rows.is_empty() {
            None
        } else {
            let last = hidden.take_axis(&Array::from_slice(&flat_last, &[flat_last.len() as i32]), 0)?;
            Some(model.logits(&last)?)
        };

        // vLLM's rules: position p reports the logprob of prompt token p + 1; a request's rows are
        // returned with the step that reaches its last prompt token (it samples then).
        let mut prompt_chunks = Vec::with_capacity(prompt_rows.len());
        for &(i, first_flat) in &prompt_rows {
            let (id, n) = &step.num_scheduled_tokens[i];
            let s = &self.requests[id];
            let Some(buf) = &s.prompt_logprobs else { continue };
            let start = s.num_computed;
            let remaining = s.num_prompt as isize - start as isize - 1;
            let (rows, complete) = if *n as isize <= remaining { (*n as isize, false) } else { (remaining, true) };
            let top = if rows > 0 {
                let rows = rows as i32;
                let idx = Array::from_iter(first_flat as i32..first_flat as i32 + rows, &[rows]);
                let logits = model.logits(&hidden.take_axis(&idx, 0)?)?;
                // Prompt tokens skip the sampling processors: processed modes equal raw ones here.
                let scores = self.logprobs_mode.scores(&logits)?;
                let targets = Array::from_slice(&s.tokens[start + 1..start + 1 + rows as usize], &[rows]);
                Some(gather_logprobs(&scores, buf.cols as i32 - 1, &targets)?)
            } else {
                None
            };
            prompt_chunks.push(PromptChunk { req_id: id.clone(), start, top, complete });
        }

        let mut outputs: Vec<&Array> = cache.arrays().collect();
        outputs.extend(logits.iter());
        let t1 = std::time::Instant::now();
        async_eval(outputs).context("submitting the step")?;
        let timing = StepTiming {
            num_tokens: batch.num_tokens,
            num_seqs: step.num_scheduled_tokens.len(),
            build: (t1 - t0).as_secs_f64(),
            submit: t1.elapsed().as_secs_f64(),
            device_tokens: patches.len(),
            ..Default::default()
        };
        for (id, n) in &step.num_scheduled_tokens {
            if let Some(s) = self.requests.get_mut(id).filter(|_| !failed_ids.contains(id.as_str())) {
                s.num_computed += n;
            }
        }
        Ok(PendingStep {
            scheduled: step.num_scheduled_tokens.clone(),
            sample_rows,
            keys,
            logits,
            prompt_chunks,
            timing,
            failed: Vec::new(),
        })
    }

    /// Token ids `base` `[T]` with the positions of `patches` taken from in-flight steps' ids on
    /// the device (their values are not on the host yet).
    fn patched_tokens(&self, base: &Array, patches: &[(usize, Deferred)]) -> Result<Array> {
        let t = base.shape()[0] as usize;
        let mut sources: Vec<Array> = Vec::new();
        let mut offsets: HashMap<u64, usize> = HashMap::new();
        let (mut idx, mut mask) = (vec![0i32; t], vec![false; t]);
        for &(flat, d) in patches {
            let offset = match offsets.get(&d.seq) {
                Some(&o) => o,
                None => {
                    let ids = self
                        .in_flight
                        .iter()
                        .find(|f| f.seq == d.seq)
                        .and_then(|f| f.ids.clone())
                        .ok_or_else(|| anyhow!("a deferred token's step {} is no longer in flight", d.seq))?;
                    let o = sources.iter().map(|a| a.shape()[0] as usize).sum();
                    sources.push(ids);
                    offsets.insert(d.seq, o);
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

    /// The second half of a step, waiting for it: [`Self::sample_submit`] then [`Self::collect`].
    pub fn sample_step(&mut self, grammar: Option<&GrammarBitmask>) -> Result<StepOutput> {
        ensure!(self.in_flight.is_empty(), "sample_step with submitted steps not collected");
        self.sample_submit(grammar)?;
        self.collect()
    }

    /// The second half of a step: apply the grammar bitmask (structured-output requests), choose
    /// the tokens, gather the logprobs asked for, and submit all of it without waiting. The chosen
    /// tokens stay on the device: a step scheduled before they are collected reads them there
    /// (vLLM's async scheduling). [`Self::collect`] returns them, oldest step first.
    pub fn sample_submit(&mut self, grammar: Option<&GrammarBitmask>) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some(p) = self.pending.take() else {
            self.in_flight.push_back(InFlight::done(seq, Vec::new(), Vec::new()));
            return Ok(());
        };
        let t3 = std::time::Instant::now();
        let (ids, top) = match catching(|| self.choose_tokens(&p, grammar)) {
            Ok(chosen) => chosen,
            Err(e) => {
                log::error!("sampling a step of {} requests failed: {e:#}", p.scheduled.len());
                let mut failed = p.failed;
                self.fail_all(&p.scheduled, &mut failed, &e);
                self.in_flight.push_back(InFlight::done(seq, p.scheduled, failed));
                return Ok(());
            }
        };
        // Placeholders for the chosen tokens: the requests' lengths (positions, seeds of the next
        // draws) are known now; the values arrive with `resolve`.
        for (row, &i) in p.sample_rows.iter().enumerate() {
            let s = self.requests.get_mut(&p.scheduled[i].0).unwrap();
            s.deferred.push(Deferred { seq, pos: s.tokens.len(), row });
            s.tokens.push(0);
        }
        let f = InFlight {
            seq,
            scheduled: p.scheduled,
            sample_rows: p.sample_rows,
            ids,
            top,
            prompt_chunks: p.prompt_chunks,
            timing: StepTiming { sample_build: t3.elapsed().as_secs_f64(), ..p.timing },
            host: None,
            failed: p.failed,
        };
        if let Err(e) = async_eval(f.arrays()) {
            let e = anyhow::Error::from(e).context("submitting the sampler");
            log::error!("a step of {} requests failed: {e:#}", f.scheduled.len());
            let mut failed = f.failed;
            self.fail_all(&f.scheduled, &mut failed, &e);
            self.in_flight.push_back(InFlight::done(seq, f.scheduled, failed));
            return Ok(());
        }
        self.in_flight.push_back(f);
        Ok(())
    }

    /// The step's tokens and the logprobs asked for, chosen on the device (not evaluated).
    #[allow(clippy::type_complexity)]
    fn choose_tokens(
        &mut self,
        p: &PendingStep,
        grammar: Option<&GrammarBitmask>,
    ) -> Result<(Option<Array>, Option<(Vec<i32>, usize, TopLogprobs)>)> {
        self.injected(FaultStage::Sample)?;
        // Penalties and bad words read a request's tokens on the host: bring in the ones still in
        // flight first (the step then waits for the previous one, as without async scheduling).
        let needs_host = p.sample_rows.iter().any(|&i| {
            let s = &self.requests[&p.scheduled[i].0];
            !s.deferred.is_empty() && s.sampling.needs_history()
        });
        if needs_host {
            for i in 0..self.in_flight.len() {
                self.resolve(i)?;
            }
        }
        let Some(mut logits) = p.logits.clone() else { return Ok((None, None)) };
        for &i in &p.sample_rows {
            let s = self.requests.get_mut(&p.scheduled[i].0).unwrap();
            if s.sampling.has_penalties() {
                let (prompt, output) = s.tokens.split_at(s.num_prompt);
                s.counts.update(prompt, output);
            }
        }
        let state = |i: usize| &self.requests[&p.scheduled[i].0];
        if let Some(g) = grammar.filter(|g| !g.req_ids.is_empty()) {
            ensure!(
                g.words.len() == g.req_ids.len() * g.width,
                "grammar bitmask has {} words for {} requests of width {}",
                g.words.len(),
                g.req_ids.len(),
                g.width
            );
            let row_of: HashMap<&str, usize> =
                p.sample_rows.iter().enumerate().map(|(r, &i)| (p.scheduled[i].0.as_str(), r)).collect();
            // Requests the grammar covers that do not sample this step have no row here.
            let masked: Vec<(usize, &[i32])> = g
                .req_ids
                .iter()
                .enumerate()
                .filter_map(|(j, id)| row_of.get(id.as_str()).map(|&r| (r, &g.words[j * g.width..(j + 1) * g.width])))
                .collect();
            if !masked.is_empty() {
                let v = logits.shape()[1] as usize;
                logits = logits.add(bitmask_to_additive(p.sample_rows.len(), v, &masked)?)?;
            }
        }
        let rows: Vec<Row> = p
            .sample_rows
            .iter()
            .zip(&p.keys)
            .map(|(&i, &key)| {
                let s = state(i);
                let (prompt, output) = s.tokens.split_at(s.num_prompt);
                Row { params: &s.sampling, key, prompt, output, counts: Some(&s.counts) }
            })
            .collect();
        let (ids, used) = choose(&logits, &rows, self.logprobs_mode.is_processed())?;
        // Sampled-token logprobs, for the rows that ask, from the logits the mode names.
        let want: Vec<i32> =
            (0..rows.len() as i32).filter(|&r| rows[r as usize].params.logprobs.is_some()).collect();
        let top = if want.is_empty() {
            None
        } else {
            let k = want
                .iter()
                .map(|&r| self.resolve_num_logprobs(rows[r as usize].params.logprobs.unwrap()))
                .max()
                .unwrap();
            let source = used.as_ref().unwrap_or(&logits);
            let idx = Array::from_slice(&want, &[want.len() as i32]);
            let scores = self.logprobs_mode.scores(&source.take_axis(&idx, 0)?)?;
            Some((want, k, gather_logprobs(&scores, k as i32, &ids.take_axis(&idx, 0)?)?))
        };
        Ok((Some(ids), top))
    }

    /// Wait for in-flight step `i` and put its tokens in place of their placeholders.
    fn resolve(&mut self, i: usize) -> Result<()> {
        let Self { in_flight, requests, .. } = self;
        let f = &mut in_flight[i];
        if f.host.is_some() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        eval(f.arrays()).context("running the step")?;
        f.timing.wait += t.elapsed().as_secs_f64();
        let host = f.ids.as_ref().map(|a| a.as_slice::<i32>().to_vec()).unwrap_or_default();
        for (row, &b) in f.sample_rows.iter().enumerate() {
            // Requests finished or preempted meanwhile no longer wait for this token.
            let Some(s) = requests.get_mut(&f.scheduled[b].0) else { continue };
            if let Some(k) = s.deferred.iter().position(|d| d.seq == f.seq && d.row == row) {
                let d = s.deferred.remove(k);
                s.tokens[d.pos] = host[row];
            }
        }
        f.host = Some(host);
        Ok(())
    }

    /// The oldest submitted step's output, waiting for it if needed.
    pub fn collect(&mut self) -> Result<StepOutput> {
        ensure!(!self.in_flight.is_empty(), "no submitted step to collect");
        let resolved = catching(|| {
            if self.in_flight[0].host.is_none() {
                self.injected(FaultStage::Device)?;
            }
            self.resolve(0)
        });
        if let Err(e) = resolved {
            // The device could not compute the step: its requests fail. If the KV cache itself
            // cannot be computed any more, no later step can run and the engine must stop.
            log::error!("a step failed on the device: {e:#}");
            let f = self.in_flight.pop_front().unwrap();
            let mut failed = f.failed;
            self.fail_all(&f.scheduled, &mut failed, &e);
            if let Some(cache) = &self.cache {
                eval(cache.arrays()).context("the KV cache cannot be computed after a failed step; the engine stops")?;
            }
            return Ok(StepOutput {
                sampled_token_ids: vec![Vec::new(); f.scheduled.len()],
                req_ids: f.scheduled.into_iter().map(|(id, _)| id).collect(),
                failed,
                ..Default::default()
            });
        }
        let f = self.in_flight.pop_front().unwrap();
        if !f.scheduled.is_empty() {
            if self.timings.len() >= MAX_TIMINGS {
                self.timings.remove(0);
            }
            self.timings.push(f.timing);
        }
        let mut out = StepOutput {
            req_ids: f.scheduled.iter().map(|(id, _)| id.clone()).collect(),
            sampled_token_ids: vec![Vec::new(); f.scheduled.len()],
            failed: f.failed,
            ..Default::default()
        };
        let sampled = f.host.unwrap_or_default();
        for (&i, &tok) in f.sample_rows.iter().zip(&sampled) {
            out.sampled_token_ids[i].push(tok);
        }
        if let Some((want, k, t)) = f.top {
            // One row per request of the step; the rows of `t` are the sampling rows that asked.
            let mut lp = Logprobs::zeros(f.scheduled.len(), k + 1);
            lp.fill(want.iter().map(|&r| f.sample_rows[r as usize]), &t)?;
            out.logprobs = Some(lp);
        }
        for c in f.prompt_chunks {
            let Some(s) = self.requests.get_mut(&c.req_id) else { continue };
            let Some(buf) = s.prompt_logprobs.as_mut() else { continue };
            if let Some(top) = &c.top {
                buf.fill(c.start..c.start + top.ranks.shape()[0] as usize, top)?;
            }
            if c.complete {
                out.prompt_logprobs.push((c.req_id, s.prompt_logprobs.take().unwrap()));
            }
        }
        Ok(out)
    }

    /// Logits of every token of a batch of explicit chunks (req_id is informational). For tests of
    /// the paged path: KV of positions before each chunk's start must already be in its blocks.
    pub fn step_logits(&mut self, chunks: &[SeqChunk]) -> Result<Array> {
        let batch = self.build_batch(chunks)?;
        let model = &self.model;
        let cache = self.cache.as_mut().ok_or_else(|| anyhow!("the KV cache is not allocated"))?;
        let hidden = model.forward(&batch, cache)?;
        let logits = model.logits(&hidden)?;
        eval([&logits].into_iter().chain(cache.arrays()))?;
        Ok(logits)
    }

    /// Engine-alone generation: all prompts batched, one block table each, `max_tokens` new tokens
    /// (fewer for a prompt that emits a stop token). Pipelined as vLLM's async scheduling runs the
    /// runner: step i + 1 is built and submitted, reading step i's tokens on the device, before
    /// step i's tokens are read to the host; a request that stopped has its extra token dropped.
    /// `pipeline` false waits for each step's tokens before building the next.
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
        let num_blocks = self.cache_mut()?.num_blocks;
        ensure!(self.cache_mut()?.num_groups() == 1, "generate runs on a KV cache of one group");
        ensure!(self.in_flight.is_empty() && self.pending.is_none(), "generate while a step is in flight");
        let mut next_block = 0i32;
        let mut step = SchedulerStep::default();
        for (i, p) in prompts.iter().enumerate() {
            ensure!(!p.is_empty(), "prompt {i} is empty");
            let need = (p.len() + max_tokens).div_ceil(bs) as i32;
            ensure!(
                (next_block + need) as usize <= num_blocks,
                "generate: the KV cache has {num_blocks} blocks, too few for these prompts and max_tokens"
            );
            let id = format!("generate-{i}");
            step.new_requests.push(NewRequest {
                req_id: id.clone(),
                prompt_token_ids: p.clone(),
                block_ids: vec![(next_block..next_block + need).collect()],
                num_computed_tokens: 0,
                sampling: sampling.clone(),
            });
            step.num_scheduled_tokens.push((id, p.len()));
            next_block += need;
        }
        let n = prompts.len();
        let mut outputs: Vec<Vec<i32>> = vec![Vec::new(); n];
        let mut done = vec![max_tokens == 0; n];
        // Tokens sampled or in flight per request (what the next step may schedule).
        let mut scheduled = vec![0usize; n];
        let index = |id: &str| -> usize { id["generate-".len()..].parse().unwrap() };
        if max_tokens == 0 {
            step.num_scheduled_tokens.clear();
        }
        let mut finished: Vec<String> = Vec::new();
        loop {
            if !step.num_scheduled_tokens.is_empty() {
                for (id, _) in &step.num_scheduled_tokens {
                    scheduled[index(id)] += 1;
                }
                self.forward_step(&step)?;
                self.sample_submit(None)?;
            }
            // The next step, from what is known now (the tokens of the step just submitted are not).
            let mut next = SchedulerStep { finished_req_ids: std::mem::take(&mut finished), ..Default::default() };
            for i in 0..n {
                if done[i] || scheduled[i] >= max_tokens {
                    continue;
                }
                let id = format!("generate-{i}");
                let s = &self.requests[&id];
                next.cached_requests.push(CachedRequest {
                    req_id: id.clone(),
                    resumed: false,
                    new_block_ids: None,
                    num_computed_tokens: s.num_computed,
                    num_output_tokens: s.tokens.len() - s.num_prompt,
                    all_token_ids: None,
                });
                next.num_scheduled_tokens.push((id, 1));
            }
            if self.in_flight.len() >= depth || (next.num_scheduled_tokens.is_empty() && !self.in_flight.is_empty()) {
                let out = self.collect()?;
                if let Some((id, reason)) = out.failed.first() {
                    bail!("request {id} failed: {reason}");
                }
                for (id, toks) in out.req_ids.iter().zip(&out.sampled_token_ids) {
                    let i = index(id);
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
                next.num_scheduled_tokens.retain(|(id, _)| !done[index(id)]);
                next.cached_requests.retain(|c| !done[index(&c.req_id)]);
            }
            if next.num_scheduled_tokens.is_empty() && self.in_flight.is_empty() {
                next.finished_req_ids.append(&mut finished);
                self.forward_step(&next)?; // drop finished requests
                break;
            }
            step = next;
        }
        Ok(outputs)
    }

    pub fn dtype_name(&self) -> &'static str {
        dtype_name(self.dtype)
    }
}

/// Record that request `id` failed, and why.
fn fail(failed: &mut Vec<(String, String)>, id: &str, reason: String) {
    log::error!("request {id} failed: {reason}");
    failed.push((id.to_string(), reason));
}

/// `f`'s result, with a panic inside it turned into an error (a step must not take the engine
/// down with it; the panic's message is kept).
fn catching<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("internal error (panic): {msg}"))
        }
    }
}
