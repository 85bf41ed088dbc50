//! The model runner: weights, the paged KV cache, the request table and the step.
//!
//! One vLLM step is two calls. `forward_step`: apply the scheduler's step to the request table,
//! plan it (pure host data), build its tensors once, run the forward and submit it with the
//! logits of the sampling rows. `sample_submit`: choose the tokens on the device (the grammar
//! bitmask arrives in between) and submit them; `collect` later returns the oldest step's output.
//! A request the step cannot serve fails alone; a step that fails fails its own requests; the
//! engine goes on either way.

mod generate;
mod logprobs;
mod memory;
mod pipeline;
mod plan;
mod pooling;
mod requests;
mod sampling;
mod schedule;

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use mlx_rs::{
    transforms::{async_eval, eval},
    Array, Dtype,
};

pub use logprobs::Logprobs;
pub use memory::{ActivationPeak, KvBudgetRequest};
pub use pipeline::{StepId, StepTiming};
pub use pooling::{DecoderHead, DecoderPooling};
pub use schedule::{CachedRequest, GrammarBitmask, NewRequest, SchedulerStep};

use crate::batch::{KvGroups, SeqChunk, StepBatch};
use crate::multimodal::{ImageGrid, MropePositions, RequestImages};
use crate::config::ModelConfig;
use crate::dtype::{compute_dtype, dtype_name};
use crate::kv_cache::{KvShape, PagedKvCache, StateGeometry};
use crate::mlx_ext::device::{self, DeviceKind};
use crate::models::{self, CausalLm, KvLayer};
use crate::paged_attention::AttentionBackend;
use crate::sampler::LogprobsMode;
use crate::weights::{WeightOptions, WeightSource, Weights};
use pipeline::{InFlight, PendingStep, Pipeline};
use plan::{Draws, StepPlan};
use requests::{Failures, Limits, RequestTable};

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
    /// dtype of linear-attention ssm states (None: the config's `mamba_ssm_dtype`, else the
    /// model dtype).
    pub ssm_dtype: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub step_id: Option<StepId>,
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
    /// Pooling models: per request of `req_ids`, its vector (or scores) when its prompt ended.
    pub pooled: Vec<Option<Vec<f32>>>,
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

/// Step timings kept for profiling (the most recent ones).
const MAX_TIMINGS: usize = 4096;

pub struct ModelRunner {
    pub config: ModelConfig,
    pub block_size: usize,
    pub device: DeviceKind,
    pub dtype: Dtype,
    pub weights_nbytes: usize,
    gather_attention: bool,
    /// How attention reads the KV pages; chosen when the cache is allocated.
    attention: AttentionBackend,
    model: Box<dyn CausalLm>,
    cache: Option<PagedKvCache>,
    table: RequestTable,
    /// Draws of requests without their own seed come from this stream.
    draws: Draws,
    logprobs_mode: LogprobsMode,
    pipeline: Pipeline,
    timings: VecDeque<StepTiming>,
    /// A failure to raise once at this stage of the next step (tests of fault isolation).
    fault: Option<FaultStage>,
    /// A pooling model's output (None: generation).
    pooling: Option<DecoderPooling>,
    /// What each KV-cache group's block tables serve (set with the cache).
    kv_groups: KvGroups,
}

impl ModelRunner {
    pub fn load(model_path: &Path, opts: &RunnerOptions) -> Result<Self> {
        Self::load_with_progress(model_path, opts, &mut |_, _| {})
    }

    /// `load`, calling `progress(done, total)` (bytes of weights materialized) as it goes.
    pub fn load_with_progress(model_path: &Path, opts: &RunnerOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let start = std::time::Instant::now();
        ensure!(opts.block_size > 0, "block_size must be positive");
        let device = device::select(opts.device)?;
        let config_dir = if model_path.is_file() { model_path.parent().unwrap_or(Path::new(".")) } else { model_path };
        let mut config = ModelConfig::from_file(&config_dir.join("config.json"))?;
        if let Some(name) = &opts.ssm_dtype {
            config.mamba_ssm_dtype = Some(name.clone());
        }
        let source = WeightSource::locate(model_path)?;
        let dtype = compute_dtype(device, opts.dtype.as_deref(), config.checkpoint_dtype())?;
        let mut weights = Weights::load(&source, &config, WeightOptions { dtype, dequantize: device == DeviceKind::Cpu })?;
        weights.prefix_bare_decoder();
        let model = models::load(&config, &mut weights)
            .with_context(|| format!("building the model from {}", model_path.display()))?;
        let leftover = weights.leftover();
        if !leftover.is_empty() {
            log::warn!("{} checkpoint tensors unused, e.g. {}", leftover.len(), leftover[0]);
        }
        drop(weights);
        let arrays = model.weights();
        crate::weights::materialize(&arrays, progress)?;
        let weights_nbytes = arrays.iter().map(|a| a.nbytes()).sum::<usize>();
        log::info!(
            "loaded {} from {} ({}) on {:?}: {} layers, {} in {}, {:.1} MiB, {:.2}s",
            config.architectures.first().map(String::as_str).unwrap_or("?"),
            model_path.display(),
            match &source { WeightSource::Gguf(_) => "gguf", WeightSource::Safetensors(_) => "safetensors" },
            device,
            config.num_hidden_layers,
            if arrays.iter().any(|a| a.dtype() == Dtype::Uint32) { "quantized" } else { "dense" },
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
            table: RequestTable::default(),
            draws: Draws::default(),
            logprobs_mode: LogprobsMode::default(),
            pipeline: Pipeline::default(),
            timings: VecDeque::new(),
            fault: None,
            pooling: None,
            kv_groups: KvGroups::default(),
        })
    }

    /// The window of the model's sliding-window layers (families have one size at most).
    pub fn sliding_window(&self) -> Option<usize> {
        self.config.layer_windows().into_iter().flatten().max()
    }

    /// A step's tensors, for this model's windows and this cache's attention.
    fn build_batch(&self, chunks: &[SeqChunk]) -> Result<StepBatch> {
        let block_sizes = self.cache.as_ref().map_or_else(|| vec![self.block_size], |c| c.group_block_size.clone());
        StepBatch::build(chunks, &block_sizes, self.sliding_window(), self.attention, &self.kv_groups)
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    /// The layers that keep K/V (fewer than the model's when some reuse another's: Gemma 4).
    pub fn kv_layers(&self) -> Vec<KvLayer> {
        self.config.kv_layers()
    }

    /// Seed for draws of requests without their own seed.
    pub fn set_seed(&mut self, seed: u64) {
        self.draws = Draws { seed, count: 0 };
    }

    /// The timings of the steps run since the last call (at most the last 4096).
    pub fn take_step_profile(&mut self) -> Vec<StepTiming> {
        std::mem::take(&mut self.timings).into()
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

    /// One group, one storage per layer; linear-attention states in each request's first block.
    pub fn allocate_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        let n = self.kv_layers().len();
        self.allocate_kv_cache_groups(num_blocks, vec![0; n], (0..n).collect(), vec![self.block_size], None)
    }

    /// Layers that keep a recurrent state instead of K/V (Gated DeltaNet).
    pub fn linear_attention_layers(&self) -> Vec<usize> {
        (0..self.num_layers()).filter(|&i| self.config.is_linear_attention(i)).collect()
    }

    /// The recurrent state of the linear-attention layers, if the model has any.
    pub fn state_geometry(&self) -> Option<StateGeometry> {
        self.model.state_geometry()
    }

    /// The KV cache as vLLM plans it: each KV layer's KV-cache group (its block tables) and
    /// storage (shared by one layer of each group), and each group's block size (for the groups
    /// of linear-attention layers, the block size of the pages their states are padded to);
    /// `state_block_size`: tokens per state block of the linear-attention groups (vLLM's
    /// `mamba_block_size`; None: the whole context).
    pub fn allocate_kv_cache_groups(
        &mut self,
        num_blocks: usize,
        layer_group: Vec<usize>,
        layer_storage: Vec<usize>,
        group_block_size: Vec<usize>,
        state_block_size: Option<usize>,
    ) -> Result<()> {
        let shapes: Vec<_> = self.kv_layers().iter().map(|l| l.shape).collect();
        ensure!(
            layer_group.len() == shapes.len(),
            "KV-cache plan covers {} layers, the model keeps K/V in {}",
            layer_group.len(),
            shapes.len()
        );
        if let Some(geo) = self.state_geometry() {
            let page = self.kv_bytes_per_block() / self.num_layers();
            ensure!(
                geo.bytes(self.dtype) <= page,
                "a linear-attention state ({} bytes) does not fit one block's K/V page ({page} bytes): block_size {} \
                 is below {}",
                geo.bytes(self.dtype),
                self.block_size,
                min_state_block_size(&self.config, self.dtype, &geo, self.block_size)
            );
        }
        let num_groups = layer_group.iter().max().map_or(1, |m| m + 1);
        let linear = self.linear_attention_layers();
        let mut groups = KvGroups { attention: vec![false; num_groups], state_block_size: vec![None; num_groups] };
        for (layer, &g) in layer_group.iter().enumerate() {
            if linear.contains(&layer) {
                groups.state_block_size[g] = Some(state_block_size.unwrap_or(usize::MAX));
            } else {
                groups.attention[g] = true;
            }
        }
        self.kv_groups = groups;
        self.cache = None;
        let cache = PagedKvCache::with_groups(layer_group, layer_storage, group_block_size, shapes, num_blocks, self.dtype)?;
        let max_head_dim = cache.shapes.iter().map(|s| s.head_dim).max().unwrap_or(0);
        self.attention = AttentionBackend::choose(self.gather_attention, max_head_dim, cache.dtype, self.model.attention_features());
        log::info!(
            "KV cache: {num_blocks} blocks of {:?} tokens, {} KV-cache group(s), {:.1} MiB; decode attention {}",
            cache.group_block_size,
            cache.num_groups(),
            cache.arrays().map(|a| a.nbytes()).sum::<usize>() as f64 / (1 << 20) as f64,
            self.attention.describe()
        );
        self.cache = Some(cache);
        Ok(())
    }

    /// The smallest multiple of `block_size` whose K/V page holds a linear-attention state
    /// (`block_size` itself for models without such layers): what vLLM's block size must be.
    pub fn required_block_size(config: &ModelConfig, dtype: Dtype, block_size: usize) -> Result<usize> {
        let ssm = config.ssm_dtype(dtype)?;
        Ok(match config.state_geometry(ssm)? {
            Some(geo) => min_state_block_size(config, dtype, &geo, block_size),
            None => block_size,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.num_blocks)
    }

    /// What the request table checks requests against.
    fn limits(&self) -> Limits {
        Limits { vocab_size: self.config.vocab_size, kv: self.cache.as_ref().map(|c| (c.num_groups(), c.num_blocks)) }
    }

    /// The first half of a step: update the request table, plan, build the batch, submit the
    /// forward (MLX computes it while the caller prepares the grammar bitmask).
    ///
    /// A request the step cannot serve (unreadable, out-of-range tokens, inconsistent with what
    /// the engine knows) fails alone; an error of the forward itself fails the step's requests.
    /// Either way the failed requests are forgotten and reported in the step's output, and the
    /// engine goes on. Only an engine-level inconsistency is an `Err`.
    pub fn forward_step(&mut self, step: &SchedulerStep) -> Result<()> {
        ensure!(!self.pipeline.has_pending(), "a step is submitted twice without sampling its tokens");
        let t0 = Instant::now();
        let vocab = self.config.vocab_size;
        let limits = self.limits();
        let failed = self.table.apply(step, limits, |k| resolve_num_logprobs(k, vocab) + 1);
        if step.num_scheduled_tokens.is_empty() {
            return Ok(());
        }
        let pending = match catching(|| self.submit_forward(step, &failed, t0)) {
            Ok(p) => PendingStep { failed, ..p },
            Err(e) => {
                let mut failed = failed;
                self.fail_all(&step.num_scheduled_tokens, &mut failed, &e);
                PendingStep::nothing(StepPlan::nothing(&step.num_scheduled_tokens), failed)
            }
        };
        self.pipeline.set_pending(pending)
    }

    fn submit_forward(&mut self, step: &SchedulerStep, failed: &Failures, t0: Instant) -> Result<PendingStep> {
        self.injected(FaultStage::Forward)?;
        let plan = StepPlan::new(&self.table, &step.num_scheduled_tokens, failed, &mut self.draws)?;
        if plan.running.is_empty() {
            return Ok(PendingStep::nothing(plan, Vec::new()));
        }
        let mut batch = self.build_batch(&plan.chunks(&self.table)?)?;
        if !plan.device_tokens.is_empty() {
            batch.token_ids = self.pipeline.device_tokens(&batch.token_ids, &plan.device_tokens)?;
        }
        let model = self.model.as_ref();
        let cache = allocated(&mut self.cache)?;
        let hidden = model.forward(&batch, cache)?;
        let pooled = self.submit_pooled(&plan, &hidden)?;
        let logits = match plan.last_tokens.len() {
            _ if self.pooling.is_some() => None,
            0 => None,
            n => Some(model.logits(&hidden.take_axis(&Array::from_slice(&plan.last_tokens, &[n as i32]), 0)?)?),
        };
        let cache = allocated(&mut self.cache)?;
        let prompt_chunks = logprobs::prompt_chunks(model, &hidden, &plan.prompt_rows, &self.table, self.logprobs_mode)?;
        let t1 = Instant::now();
        async_eval(cache.arrays().chain(logits.iter()).chain(pooled.iter())).context("submitting the step")?;
        let timing = StepTiming {
            num_tokens: plan.num_tokens,
            num_seqs: plan.running.len(),
            build: (t1 - t0).as_secs_f64(),
            submit: t1.elapsed().as_secs_f64(),
            device_tokens: plan.device_tokens.len(),
            ..Default::default()
        };
        for &i in &plan.running {
            let (id, n) = &plan.scheduled[i];
            self.table.get_mut(id).expect("planned requests are in the table").num_computed += n;
        }
        Ok(PendingStep { plan, logits, pooled, prompt_chunks, timing, failed: Vec::new() })
    }

    /// The second half of a step, waiting for it: [`Self::sample_submit`] then [`Self::collect`].
    pub fn sample_step(&mut self, grammar: Option<&GrammarBitmask>) -> Result<StepOutput> {
        ensure!(self.pipeline.num_in_flight() == 0, "sample_step with submitted steps not collected");
        let id = self.sample_submit(grammar)?;
        self.collect(Some(id))
    }

    /// The second half of a step: apply the grammar bitmask (structured-output requests), choose
    /// the tokens, gather the logprobs asked for, and submit all of it without waiting. The chosen
    /// tokens stay on the device: a step scheduled before they are collected reads them there
    /// (vLLM's async scheduling). [`Self::collect`] returns them, oldest step first.
    pub fn sample_submit(&mut self, grammar: Option<&GrammarBitmask>) -> Result<StepId> {
        let (id, pending) = self.pipeline.take_pending();
        let Some(p) = pending else {
            self.pipeline.push(InFlight::done(id, Vec::new(), Vec::new()));
            return Ok(id);
        };
        let t = Instant::now();
        let chosen = catching(|| {
            self.injected(FaultStage::Sample)?;
            if sampling::needs_host_tokens(&p.plan, &self.table) {
                self.pipeline.resolve_all(&mut self.table)?;
            }
            let vocab = self.config.vocab_size;
            sampling::choose_tokens(&p, &mut self.table, grammar, self.logprobs_mode, |k| resolve_num_logprobs(k, vocab))
        });
        let (ids, logprobs) = match chosen {
            Ok(chosen) => chosen,
            Err(e) => return Ok(self.fail_step(id, p.plan.scheduled, p.failed, e.context("sampling"))),
        };
        for (row, &i) in p.plan.sample_rows.iter().enumerate() {
            self.table.get_mut(&p.plan.scheduled[i].0).expect("sampling requests are in the table").push_pending(id, row);
        }
        let step = InFlight {
            id,
            scheduled: p.plan.scheduled,
            sample_rows: p.plan.sample_rows,
            ids,
            logprobs,
            prompt_chunks: p.prompt_chunks,
            timing: StepTiming { sample_build: t.elapsed().as_secs_f64(), ..p.timing },
            host: None,
            failed: p.failed,
        };
        if let Err(e) = async_eval(step.arrays()) {
            let e = anyhow::Error::from(e).context("submitting the sampler");
            return Ok(self.fail_step(id, step.scheduled, step.failed, e));
        }
        self.pipeline.push(step);
        Ok(id)
    }

    /// A step whose requests all fail with `e` (those not failed already), queued in place of it.
    fn fail_step(&mut self, id: StepId, scheduled: Vec<(String, usize)>, mut failed: Failures, e: anyhow::Error) -> StepId {
        self.fail_all(&scheduled, &mut failed, &e);
        self.pipeline.push(InFlight::done(id, scheduled, failed));
        id
    }

    /// The requests of `scheduled` not failed yet fail with `e` and are forgotten (one log line
    /// for the step, naming them).
    fn fail_all(&mut self, scheduled: &[(String, usize)], failed: &mut Failures, e: &anyhow::Error) {
        let mut ids = Vec::new();
        for (id, _) in scheduled {
            if !failed.iter().any(|(f, _)| f == id) {
                self.table.forget(id);
                failed.push((id.clone(), format!("the engine failed this step: {e:#}")));
                ids.push(id.as_str());
            }
        }
        log::error!("a step failed: {e:#}; its requests fail: {}", ids.join(", "));
    }

    /// The oldest submitted step's output (which must be `expected` when given), waiting for it.
    pub fn collect(&mut self, expected: Option<StepId>) -> Result<StepOutput> {
        let resolved = catching(|| {
            if self.pipeline.oldest_on_device() {
                self.injected(FaultStage::Device)?;
            }
            self.pipeline.resolve(0, &mut self.table)
        });
        let f = self.pipeline.pop_oldest(expected)?;
        if let Err(e) = resolved {
            // The device could not compute the step: its requests fail. If the KV cache itself
            // cannot be computed any more, no later step can run and the engine must stop.
            let mut failed = f.failed;
            self.fail_all(&f.scheduled, &mut failed, &e.context("on the device"));
            if let Some(cache) = &self.cache {
                eval(cache.arrays()).context("the KV cache cannot be computed after a failed step; the engine stops")?;
            }
            return Ok(StepOutput {
                step_id: Some(f.id),
                sampled_token_ids: vec![Vec::new(); f.scheduled.len()],
                req_ids: f.scheduled.into_iter().map(|(id, _)| id).collect(),
                failed,
                ..Default::default()
            });
        }
        if !f.scheduled.is_empty() {
            if self.timings.len() >= MAX_TIMINGS {
                self.timings.pop_front();
            }
            self.timings.push_back(f.timing);
        }
        let mut out = StepOutput {
            step_id: Some(f.id),
            req_ids: f.scheduled.iter().map(|(id, _)| id.clone()).collect(),
            sampled_token_ids: vec![Vec::new(); f.scheduled.len()],
            failed: f.failed,
            ..Default::default()
        };
        for (&i, &tok) in f.sample_rows.iter().zip(f.host.iter().flatten()) {
            out.sampled_token_ids[i].push(tok);
        }
        if let Some(lp) = f.logprobs {
            // One row per request of the step; the rows of `top` are the sampling rows that asked.
            let mut rows = Logprobs::zeros(f.scheduled.len(), lp.k + 1);
            rows.fill(lp.rows.iter().map(|&r| f.sample_rows[r as usize]), &lp.top)?;
            out.logprobs = Some(rows);
        }
        out.prompt_logprobs = logprobs::accumulate(f.prompt_chunks, &mut self.table)?;
        Ok(out)
    }

    /// A request's images for the steps that run it (`SeqChunk::images`): the vision tower runs
    /// once here over `[patches, patch features]` pixel values, and the prompt's M-RoPE positions
    /// are laid out from its placeholders.
    pub fn prepare_images(&self, prompt: &[i32], pixel_values: &Array, grids: &[ImageGrid]) -> Result<RequestImages> {
        let layout = self.model.image_layout().with_context(|| {
            format!("{} takes no images", self.config.architectures.first().map(String::as_str).unwrap_or("this model"))
        })?;
        let positions = MropePositions::new(&layout, prompt, grids)?;
        let embeds = catching(|| {
            let e = self.model.embed_images(pixel_values, grids)?;
            e.eval()?;
            Ok(e)
        })
        .context("running the vision tower")?;
        RequestImages::new(positions, embeds)
    }

    pub fn step_logits(&mut self, chunks: &[SeqChunk]) -> Result<Array> {
        let batch = self.build_batch(chunks)?;
        let model = &self.model;
        let cache = allocated(&mut self.cache)?;
        let hidden = model.forward(&batch, cache)?;
        let logits = model.logits(&hidden)?;
        eval([&logits].into_iter().chain(cache.arrays()))?;
        Ok(logits)
    }

    /// Engine-alone generation: all prompts batched, one block table each, `max_tokens` new tokens
    /// (fewer for a prompt that emits a stop token). Pipelined as vLLM's async scheduling runs the
    /// runner: step i + 1 is built and submitted, reading step i's tokens on the device, before
    /// step i's tokens are read to the host; a request that stopped has its extra token dropped.

    pub fn dtype_name(&self) -> &'static str {
        dtype_name(self.dtype)
    }
}

/// The KV cache, which steps need allocated (a free function: callers hold the model too).
fn min_state_block_size(config: &ModelConfig, dtype: Dtype, geo: &StateGeometry, align: usize) -> usize {
    let shape = KvShape { kv_heads: config.num_kv_heads(), head_dim: config.head_dim() };
    let per_token = PagedKvCache::bytes_per_block(&[shape], 1, dtype);
    geo.bytes(dtype).div_ceil(per_token * align) * align
}

fn allocated(cache: &mut Option<PagedKvCache>) -> Result<&mut PagedKvCache> {
    cache.as_mut().ok_or_else(|| anyhow!("the KV cache is not allocated"))
}

/// A request's logprob count: `-1` (all tokens) is the vocabulary size.
fn resolve_num_logprobs(k: i32, vocab: usize) -> usize {
    if k < 0 { vocab } else { k as usize }
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
