//! `ModelRunner`: the engine's runner as a Python class, one call per half-step.

use std::path::PathBuf;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use engine::batch::SeqChunk;
use engine::multimodal::{ImageGrid, RequestImages};
use engine::mlx_ext::device::DeviceKind;
use engine::encoder::head::ClassifyOptions;
use engine::runner::{self, DecoderHead, DecoderPooling, GrammarBitmask, Logprobs, RunnerOptions, StepId, StepOutput};
use engine::sampler::SamplingParams;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::engine_err;
use crate::testing::to_numpy_f32;
use crate::vllm::scheduler_step;

fn logprobs_to_numpy<'py>(py: Python<'py>, lp: Logprobs) -> PyResult<Bound<'py, PyAny>> {
    let rows = lp.ranks.len();
    let ids = PyArray1::from_vec(py, lp.token_ids).reshape([rows, lp.cols])?;
    let lps = PyArray1::from_vec(py, lp.logprobs).reshape([rows, lp.cols])?;
    let ranks = PyArray1::from_vec(py, lp.ranks);
    Ok((ids, lps, ranks).into_pyobject(py)?.into_any())
}

type GrammarWords = (Vec<String>, usize, Vec<i32>);

fn grammar_words(grammar: Option<(Vec<String>, numpy::PyReadonlyArray2<'_, i32>)>) -> Option<GrammarWords> {
    grammar.map(|(ids, mask)| {
        let view = mask.as_array();
        (ids, view.shape()[1], view.iter().copied().collect::<Vec<i32>>())
    })
}

/// One step's output, as vLLM's `ModelRunnerOutput` needs it. `pooled` (pooling models): per
/// request, its float32 vector or scores when its prompt ended in this step, else None. `logprobs` is None or
/// `(token_ids, logprobs, ranks)` numpy arrays with one row per request; `prompt_logprobs` maps
/// the requests whose prefill ended to the same triple for the whole prompt; `failed` maps the
/// requests the step could not serve to the reason (the engine has forgotten them).
#[pyclass(name = "StepOutput", module = "vllm_metal_rs._core", frozen, get_all)]
pub struct PyStepOutput {
    step_id: Option<u64>,
    req_ids: Vec<String>,
    sampled_token_ids: Vec<Vec<i32>>,
    logprobs: Option<Py<PyAny>>,
    prompt_logprobs: Py<PyDict>,
    failed: Py<PyDict>,
    pooled: Vec<Option<Py<PyArray1<f32>>>>,
}

fn step_output_to_py(py: Python<'_>, out: StepOutput) -> PyResult<PyStepOutput> {
    let logprobs = out.logprobs.map(|lp| logprobs_to_numpy(py, lp).map(Bound::unbind)).transpose()?;
    let prompt = PyDict::new(py);
    for (id, lp) in out.prompt_logprobs {
        prompt.set_item(id, logprobs_to_numpy(py, lp)?)?;
    }
    let failed = PyDict::new(py);
    for (id, reason) in out.failed {
        failed.set_item(id, reason)?;
    }
    Ok(PyStepOutput {
        step_id: out.step_id.map(|id| id.0),
        req_ids: out.req_ids,
        sampled_token_ids: out.sampled_token_ids,
        logprobs,
        prompt_logprobs: prompt.unbind(),
        failed: failed.unbind(),
        pooled: out.pooled.into_iter().map(|v| v.map(|v| PyArray1::from_vec(py, v).unbind())).collect(),
    })
}

/// A request's images, prepared once (`ModelRunner.prepare_images`): the vision tower's rows and
/// the prompt's M-RoPE positions.
#[pyclass(name = "RequestImages", module = "vllm_metal_rs._core", frozen)]
pub struct PyRequestImages {
    inner: Arc<Mutex<RequestImages>>,
    #[pyo3(get)]
    num_placeholders: usize,
}

/// The Rust model runner: weights, paged KV cache, per-request state, sampling.
#[pyclass(name = "ModelRunner", module = "vllm_metal_rs._core")]
pub struct PyModelRunner {
    inner: Mutex<runner::ModelRunner>,
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    block_size: usize,
    kv_cache_dtype: &'static str,
    weights_nbytes: usize,
    max_position_embeddings: Option<usize>,
    device: &'static str,
}

impl PyModelRunner {
    fn lock(&self) -> std::sync::MutexGuard<'_, runner::ModelRunner> {
        // A panic inside a step poisons the lock; the state is still consistent enough to report.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl PyModelRunner {
    #[new]
    /// `progress(done, total)`: called with the bytes of weights materialized so far (a
    /// progress bar); an exception it raises is logged and loading goes on.
    #[pyo3(signature = (model_path, *, block_size = 16, device = None, dtype = None, gather_attention = false, ssm_dtype = None, progress = None))]
    fn new(
        py: Python<'_>,
        model_path: PathBuf,
        block_size: usize,
        device: Option<String>,
        dtype: Option<String>,
        gather_attention: bool,
        ssm_dtype: Option<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let device = device.map(|d| d.parse::<DeviceKind>()).transpose().map_err(engine_err)?;
        let opts = RunnerOptions { block_size, device, dtype, gather_attention, ssm_dtype };
        let mut report = |done: usize, total: usize| {
            if let Some(cb) = &progress {
                Python::attach(|py| {
                    if let Err(e) = cb.call1(py, (done, total)) {
                        log::warn!("weight loading progress callback failed: {e}");
                    }
                });
            }
        };
        let r = py
            .detach(|| runner::ModelRunner::load_with_progress(&model_path, &opts, &mut report))
            .map_err(engine_err)?;
        Ok(Self {
            num_layers: r.num_layers(),
            num_kv_heads: r.config.num_kv_heads(),
            head_dim: r.config.head_dim(),
            vocab_size: r.config.vocab_size,
            block_size: r.block_size,
            kv_cache_dtype: r.dtype_name(),
            weights_nbytes: r.weights_nbytes,
            max_position_embeddings: r.config.max_position_embeddings,
            device: r.device.name(),
            inner: Mutex::new(r),
        })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.num_layers
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.block_size
    }
    #[getter]
    fn kv_cache_dtype(&self) -> &'static str {
        self.kv_cache_dtype
    }
    #[getter]
    fn weights_nbytes(&self) -> usize {
        self.weights_nbytes
    }
    /// Per layer that keeps K/V (fewer than num_layers when layers share another's: Gemma 4),
    /// its (KV heads, head size, sliding window in tokens or None for full attention).
    #[getter]
    fn kv_layers(&self) -> Vec<(usize, usize, Option<usize>)> {
        self.lock().kv_layers().iter().map(|l| (l.shape.kv_heads, l.shape.head_dim, l.window)).collect()
    }
    /// The layers that keep a recurrent state instead of K/V (linear attention).
    #[getter]
    fn linear_attention_layers(&self) -> Vec<usize> {
        self.lock().linear_attention_layers()
    }
    /// The linear-attention state: (conv shape, ssm shape, ssm dtype name); None without such
    /// layers. The conv state has the KV cache dtype.
    #[getter]
    fn state_geometry(&self) -> Option<((usize, usize), (usize, usize, usize), &'static str)> {
        self.lock().state_geometry().map(|g| {
            ((g.conv[0], g.conv[1]), (g.ssm[0], g.ssm[1], g.ssm[2]), engine::dtype::dtype_name(g.ssm_dtype))
        })
    }
    #[getter]
    fn max_position_embeddings(&self) -> Option<usize> {
        self.max_position_embeddings
    }
    #[getter]
    fn device(&self) -> &'static str {
        self.device
    }
    #[getter]
    fn num_blocks(&self) -> usize {
        self.lock().num_blocks()
    }

    fn kv_bytes_per_block(&self) -> usize {
        self.lock().kv_bytes_per_block()
    }

    fn set_seed(&self, seed: u64) {
        self.lock().set_seed(seed)
    }

    /// Bytes a forward of `num_tokens` allocates beyond the weights, measured on that forward.
    fn profile_peak_memory(&self, py: Python<'_>, num_tokens: usize) -> PyResult<usize> {
        py.detach(|| self.lock().profile_peak_memory(num_tokens)).map_err(engine_err)
    }

    /// The KV budget's bound of `profile_peak_memory(num_tokens)`, from small measurements.
    fn activation_peak(&self, py: Python<'_>, num_tokens: usize) -> PyResult<usize> {
        py.detach(|| self.lock().activation_peak(num_tokens)).map(|p| p.bytes).map_err(engine_err)
    }

    /// Bytes vLLM may give to the KV cache (see the engine's `kv_cache_budget`); max_model_len
    /// None when vLLM fits the length to the cache.
    #[pyo3(signature = (memory_fraction, max_num_batched_tokens, max_model_len=None))]
    fn kv_cache_budget(
        &self,
        py: Python<'_>,
        memory_fraction: f64,
        max_num_batched_tokens: usize,
        max_model_len: Option<usize>,
    ) -> PyResult<usize> {
        let req = runner::KvBudgetRequest { memory_fraction, max_num_batched_tokens, max_model_len };
        py.detach(|| self.lock().kv_cache_budget(req)).map_err(engine_err)
    }

    /// `layer_group` / `layer_storage` / `group_block_size`: vLLM's KV-cache plan (each KV
    /// layer's group and shared tensor, each group's block size); default: one group of
    /// `block_size` blocks, one storage per KV layer. `state_block_size`: tokens per
    /// linear-attention state block (vLLM's mamba_block_size; None: the whole context).
    #[pyo3(signature = (num_blocks, layer_group=None, layer_storage=None, group_block_size=None, state_block_size=None))]
    fn allocate_kv_cache(
        &self,
        py: Python<'_>,
        num_blocks: usize,
        layer_group: Option<Vec<usize>>,
        layer_storage: Option<Vec<usize>>,
        group_block_size: Option<Vec<usize>>,
        state_block_size: Option<usize>,
    ) -> PyResult<()> {
        py.detach(|| {
            let mut r = self.lock();
            match (layer_group, layer_storage, group_block_size) {
                (Some(g), Some(s), Some(b)) => r.allocate_kv_cache_groups(num_blocks, g, s, b, state_block_size),
                (None, None, None) => r.allocate_kv_cache(num_blocks),
                _ => Err(anyhow::anyhow!("pass layer_group, layer_storage and group_block_size together, or none")),
            }
        })
        .map_err(engine_err)
    }

    /// Host timings of the steps run since the last call: one dict per step with num_tokens,
    /// num_seqs and build / submit / sample_build / wait in seconds.
    fn take_step_profile<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for t in self.lock().take_step_profile() {
            let d = PyDict::new(py);
            d.set_item("num_tokens", t.num_tokens)?;
            d.set_item("num_seqs", t.num_seqs)?;
            d.set_item("build", t.build)?;
            d.set_item("submit", t.submit)?;
            d.set_item("sample_build", t.sample_build)?;
            d.set_item("wait", t.wait)?;
            d.set_item("device_tokens", t.device_tokens)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Make the next step fail once at `stage` ("forward", "sample" or "device"), for tests of
    /// fault isolation: the step's requests fail, the engine serves the next.
    fn inject_fault(&self, stage: &str) -> PyResult<()> {
        let stage = stage.parse().map_err(engine_err)?;
        self.lock().inject_fault(stage);
        Ok(())
    }

    /// What reported logprobs are computed from: vLLM's `logprobs_mode` name.
    fn set_logprobs_mode(&self, mode: &str) -> PyResult<()> {
        let mode = mode.parse().map_err(engine_err)?;
        self.lock().set_logprobs_mode(mode);
        Ok(())
    }

    /// The first half of a vLLM step: request state updated, the forward submitted; False when the
    /// step schedules nothing (finished requests only). The tokens come from `sample_tokens` or
    /// `submit_tokens` + `collect`.
    fn execute_model(&self, py: Python<'_>, scheduler_output: &Bound<'_, PyAny>) -> PyResult<bool> {
        let step = scheduler_step(scheduler_output)?;
        let runs = !step.num_scheduled_tokens.is_empty();
        py.detach(|| self.lock().forward_step(&step)).map_err(engine_err)?;
        Ok(runs)
    }

    /// A pooling model's step: request state updated, forward, and the pooled vectors (or scores)
    /// of the requests whose prompt ends in this step.
    fn pool_model(&self, py: Python<'_>, scheduler_output: &Bound<'_, PyAny>) -> PyResult<PyStepOutput> {
        let step = scheduler_step(scheduler_output)?;
        let out = py
            .detach(|| {
                let mut r = self.lock();
                r.forward_step(&step)?;
                r.pool_step()
            })
            .map_err(engine_err)?;
        step_output_to_py(py, out)
    }

    /// Make this runner a pooling model's: `pooling` MEAN, CLS or LAST; `classifier_tokens`:
    /// None for embeddings, else the token ids whose logits are the classifier's (with
    /// `two_way`: [negative, positive], one label, as vLLM's from_2_way_softmax); `activation`,
    /// `logit_mean`, `logit_sigma`: how the classifier's logits become scores.
    #[pyo3(signature = (pooling, *, classifier_tokens = None, two_way = false, activation = "identity", logit_mean = 0.0, logit_sigma = 1.0))]
    fn set_pooling(
        &self,
        pooling: &str,
        classifier_tokens: Option<Vec<i32>>,
        two_way: bool,
        activation: &str,
        logit_mean: f32,
        logit_sigma: f32,
    ) -> PyResult<()> {
        let head = match classifier_tokens {
            None => DecoderHead::Embed,
            Some(tokens) => DecoderHead::TokenLogits { tokens, two_way },
        };
        let p = DecoderPooling {
            kind: pooling.parse().map_err(engine_err)?,
            head,
            classify: ClassifyOptions { logit_mean, logit_sigma, activation: activation.parse().map_err(engine_err)? },
        };
        self.lock().set_pooling(Some(p)).map_err(engine_err)
    }

    /// The pooling task this runner serves ("embed", "classify"), None for generation.
    #[getter]
    fn pooling_task(&self) -> Option<&'static str> {
        self.lock().pooling().map(|p| p.task())
    }

    /// The second half, waiting for the tokens. `grammar`: None, or `(req_ids, bitmask)` with the
    /// int32 bitmask `[len(req_ids), W]` of vLLM's structured-output requests.
    #[pyo3(signature = (grammar = None))]
    fn sample_tokens<'py>(
        &self,
        py: Python<'py>,
        grammar: Option<(Vec<String>, numpy::PyReadonlyArray2<'py, i32>)>,
    ) -> PyResult<PyStepOutput> {
        let grammar = grammar_words(grammar);
        let out = py
            .detach(|| {
                let g = grammar.as_ref().map(|(ids, width, words)| GrammarBitmask { req_ids: ids, words, width: *width });
                self.lock().sample_step(g.as_ref())
            })
            .map_err(engine_err)?;
        step_output_to_py(py, out)
    }

    /// The second half without waiting (vLLM's async scheduling): the tokens are chosen and
    /// submitted; a step scheduled next reads them on the device. Returns the step's id, which
    /// `collect` takes.
    #[pyo3(signature = (grammar = None))]
    fn submit_tokens<'py>(
        &self,
        py: Python<'py>,
        grammar: Option<(Vec<String>, numpy::PyReadonlyArray2<'py, i32>)>,
    ) -> PyResult<u64> {
        let grammar = grammar_words(grammar);
        py.detach(|| {
            let g = grammar.as_ref().map(|(ids, width, words)| GrammarBitmask { req_ids: ids, words, width: *width });
            self.lock().sample_submit(g.as_ref())
        })
        .map(|id| id.0)
        .map_err(engine_err)
    }

    /// The output of submitted step `step_id`, as `sample_tokens` returns it (waits for it). Steps
    /// are collected in submission order: another step than the oldest is an error.
    fn collect(&self, py: Python<'_>, step_id: u64) -> PyResult<PyStepOutput> {
        let out = py.detach(|| self.lock().collect(Some(StepId(step_id)))).map_err(engine_err)?;
        step_output_to_py(py, out)
    }

    /// Logits `[T, vocab]` (float32) of every token of explicit `(req_id, tokens, start, block_ids)`
    /// chunks; `images` maps a request id to its `prepare_images` (its placeholders in a chunk take
    /// the tower's rows, its tokens their M-RoPE positions).
    #[pyo3(signature = (batch, images = None))]
    fn step_logits<'py>(
        &self,
        py: Python<'py>,
        batch: Vec<(String, Vec<i32>, usize, Vec<i32>)>,
        images: Option<HashMap<String, Py<PyRequestImages>>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let images = images.unwrap_or_default();
        let per_chunk: Vec<Option<Arc<Mutex<RequestImages>>>> =
            batch.iter().map(|(id, ..)| images.get(id).map(|i| i.get().inner.clone())).collect();
        let logits = py
            .detach(|| {
                let guards: Vec<Option<std::sync::MutexGuard<'_, RequestImages>>> =
                    per_chunk.iter().map(|i| i.as_ref().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))).collect();
                let chunks: Vec<SeqChunk> = batch
                    .iter()
                    .zip(&guards)
                    .map(|((_, tokens, start, blocks), img)| SeqChunk {
                        start: *start,
                        tokens,
                        block_ids: std::slice::from_ref(blocks),
                        images: img.as_deref(),
                    })
                    .collect();
                self.lock().step_logits(&chunks)
            })
            .map_err(engine_err)?;
        to_numpy_f32(py, &logits)
    }

    /// A few tokens through prefill, decode and sampling on the allocated cache, so that the
    /// first request does not pay MLX's first-use work; leaves no request, draw or timing behind.
    fn warm_up(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.lock().warm_up()).map_err(engine_err)
    }

    /// A request's images for `step_logits`: `prompt` (its token ids, with each image's run of
    /// placeholder tokens), `pixel_values` `[patches, patch features]` float32 and
    /// `image_grid_thw` as transformers' image processor gives them. Runs the vision tower once.
    fn prepare_images(
        &self,
        py: Python<'_>,
        prompt: Vec<i32>,
        pixel_values: numpy::PyReadonlyArray2<'_, f32>,
        image_grid_thw: Vec<[i64; 3]>,
    ) -> PyResult<PyRequestImages> {
        let view = pixel_values.as_array();
        let shape = [view.shape()[0] as i32, view.shape()[1] as i32];
        let data: Vec<f32> = view.iter().copied().collect();
        let grids = image_grid_thw
            .iter()
            .map(|&[t, h, w]| {
                let ok = t > 0 && h > 0 && w > 0;
                ok.then(|| ImageGrid { t: t as usize, h: h as usize, w: w as usize })
                    .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("image_grid_thw row {:?} has a non-positive entry", [t, h, w])))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let prepared = py
            .detach(|| self.lock().prepare_images(&prompt, &mlx_rs::Array::from_slice(&data, &shape), &grids))
            .map_err(engine_err)?;
        let num_placeholders = prepared.positions.placeholders.len();
        Ok(PyRequestImages { inner: Arc::new(Mutex::new(prepared)), num_placeholders })
    }

    /// Engine-alone generation (no vLLM): all prompts batched; greedy when temperature == 0.
    /// `pipeline`: build each step while the previous one runs (as with vLLM's async scheduling);
    /// false waits for each step's tokens first.
    #[pyo3(signature = (
        prompts, max_tokens, *, temperature = 0.0, top_k = -1, top_p = 1.0, min_p = 0.0, seed = None,
        presence_penalty = 0.0, frequency_penalty = 0.0, repetition_penalty = 1.0, stop_token_ids = None,
        pipeline = true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<i32>>,
        max_tokens: usize,
        temperature: f32,
        top_k: i32,
        top_p: f32,
        min_p: f32,
        seed: Option<u64>,
        presence_penalty: f32,
        frequency_penalty: f32,
        repetition_penalty: f32,
        stop_token_ids: Option<Vec<i32>>,
        pipeline: bool,
    ) -> PyResult<Vec<Vec<i32>>> {
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            ..Default::default()
        };
        let stops = stop_token_ids.unwrap_or_default();
        py.detach(|| self.lock().generate(&prompts, max_tokens, &params, &stops, pipeline))
            .map_err(engine_err)
    }
}

