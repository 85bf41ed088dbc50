//! `vllm_metal_rs._core`: the PyO3 surface of the engine.
//!
//! Once per step the worker hands vLLM's `SchedulerOutput` to `ModelRunner.execute_model`; its
//! fields are read here, in Rust, and the step runs without touching Python again.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use engine::batch::SeqChunk;
use engine::mlx_ext::device::DeviceKind;
use engine::runner::{self, CachedRequest, GrammarBitmask, Logprobs, NewRequest, RunnerOptions, SchedulerStep, StepOutput};
use engine::sampler::{self, Row, SamplingParams};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PySet};

create_exception!(_core, EngineError, PyRuntimeError, "An error of the vllm-metal-rs engine.");

/// One line: the error and its causes, outermost first.
fn engine_err(e: anyhow::Error) -> PyErr {
    EngineError::new_err(format!("{e:#}"))
}

// ---- logging: Rust `log` records go to Python's `logging` (vLLM's handlers) ----

struct PyLogger;
static LOGGER: PyLogger = PyLogger;
static PY_LOGGER: OnceLock<Py<PyAny>> = OnceLock::new();

impl log::Log for PyLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Some(logger) = PY_LOGGER.get() else { return };
        let level = match record.level() {
            log::Level::Error => 40,
            log::Level::Warn => 30,
            log::Level::Info => 20,
            log::Level::Debug | log::Level::Trace => 10,
        };
        let msg = record.args().to_string();
        Python::attach(|py| {
            let _ = logger.call_method1(py, "log", (level, msg));
        });
    }

    fn flush(&self) {}
}

/// Route the engine's log records to `logging.getLogger("vllm.vllm_metal_rs.engine")`.
#[pyfunction]
#[pyo3(signature = (debug = false))]
fn init_logging(py: Python<'_>, debug: bool) -> PyResult<()> {
    if PY_LOGGER.get().is_none() {
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("vllm.vllm_metal_rs.engine",))?
            .unbind();
        let _ = PY_LOGGER.set(logger);
        let _ = log::set_logger(&LOGGER);
    }
    log::set_max_level(if debug { log::LevelFilter::Debug } else { log::LevelFilter::Info });
    Ok(())
}

/// The MLX backend of this process: backend, device, blas, memory_size.
#[pyfunction]
fn backend_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let backend = engine::mlx_ext::device::backend();
    d.set_item("backend", backend)?;
    d.set_item("device", if backend == "cpu" { "cpu" } else { "gpu" })?;
    let blas = engine::mlx_ext::blas::active_blas();
    d.set_item("blas_fast", engine::mlx_ext::blas::is_fast(&blas))?;
    d.set_item("blas", blas)?;
    d.set_item("memory_size", engine::mlx_ext::device::memory_size())?;
    Ok(d)
}

// ---- reading vLLM objects ----

fn block_ids_of(groups: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<i32>>> {
    // One list per KV-cache group.
    groups.extract()
}

/// Attribute of a vLLM object, or key of a dict (tests and benchmarks pass dicts); None if absent.
fn field<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    let value = match obj.cast::<PyDict>() {
        Ok(d) => d.get_item(name)?,
        Err(_) => obj.getattr_opt(name)?,
    };
    Ok(value.filter(|v| !v.is_none()))
}

fn field_or<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(obj: &Bound<'py, PyAny>, name: &str, default: T) -> PyResult<T> {
    match field(obj, name)? {
        Some(v) => v.extract().map_err(Into::into),
        None => Ok(default),
    }
}

// Values cross from Python with Python's ranges: an int may be any size, a float any double.
// Each is brought into the engine's range here, once, so that no value can fail a step later.

/// A Python int clamped into `[lo, hi]` (an int beyond i64 saturates by its sign). A float
/// where vLLM let one through counts by its integer part; NaN is an error of the request.
fn int_in(v: &Bound<'_, PyAny>, name: &str, lo: i64, hi: i64) -> PyResult<i64> {
    let x = if v.is_instance_of::<PyInt>() {
        match v.extract::<i64>() {
            Ok(x) => x,
            Err(_) if v.gt(0)? => i64::MAX,
            Err(_) => i64::MIN,
        }
    } else if let Ok(f) = v.cast::<PyFloat>() {
        let f = f.value();
        if f.is_nan() {
            return Err(PyValueError::new_err(format!("{name} is NaN")));
        }
        f as i64 // saturates
    } else {
        return Err(PyValueError::new_err(format!("{name} must be an integer, got {}", v.get_type().name()?)));
    };
    Ok(x.clamp(lo, hi))
}

fn int_field(obj: &Bound<'_, PyAny>, name: &str, lo: i64, hi: i64) -> PyResult<Option<i64>> {
    field(obj, name)?.map(|v| int_in(&v, name, lo, hi)).transpose()
}

/// A token id: an int that no vocabulary can hold is an error of the request (vLLM checks ids
/// against the vocabulary before they get here; the engine checks them again against the model).
fn token_id(v: &Bound<'_, PyAny>, name: &str) -> PyResult<i32> {
    let x = int_in(v, name, i64::MIN, i64::MAX)?;
    i32::try_from(x).map_err(|_| PyValueError::new_err(format!("{name}: token id {x} is out of range")))
}

fn token_ids(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<i32>> {
    v.try_iter()?.map(|t| token_id(&t?, name)).collect()
}

/// A float as f32: NaN is an error of the request; magnitudes beyond f32 saturate at its
/// largest finite value (infinities would turn into NaN in the sampler's arithmetic).
fn finite_f32(x: f64, name: &str) -> PyResult<f32> {
    if x.is_nan() {
        return Err(PyValueError::new_err(format!("{name} is NaN")));
    }
    Ok(x.clamp(-f32::MAX as f64, f32::MAX as f64) as f32)
}

fn float_field(obj: &Bound<'_, PyAny>, name: &str, default: f32) -> PyResult<f32> {
    match field(obj, name)? {
        Some(v) => finite_f32(v.extract::<f64>()?, name),
        None => Ok(default),
    }
}

/// vLLM's `SamplingParams` (or a dict with the same field names), brought into the engine's
/// ranges: `top_k` beyond i32 is "no top-k" like any top_k above the vocabulary; `min_tokens`
/// is bounded by `max_tokens`; a seed is taken modulo 2^64; logprob counts beyond i32 mean
/// "all" like any count above the vocabulary.
fn sampling_of(params: &Bound<'_, PyAny>) -> PyResult<SamplingParams> {
    if params.is_none() {
        return Ok(SamplingParams::default());
    }
    let d = SamplingParams::default();
    let logit_bias: Vec<(i32, f32)> = match field(params, "logit_bias")? {
        Some(b) => {
            let b = b.cast_into::<PyDict>()?;
            let mut v = Vec::with_capacity(b.len());
            for (t, bias) in b.iter() {
                v.push((token_id(&t, "logit_bias")?, finite_f32(bias.extract::<f64>()?, "logit_bias value")?));
            }
            v.sort_by_key(|&(t, _)| t);
            v
        }
        None => Vec::new(),
    };
    let ints = |name: &str| -> PyResult<Vec<i32>> {
        field(params, name)?.map(|v| token_ids(&v, name)).transpose().map(Option::unwrap_or_default)
    };
    // vLLM keeps EOS (and generation-config EOS ids) with the stop ids in all_stop_token_ids (a set).
    let mut stop = ints("all_stop_token_ids")?;
    if stop.is_empty() {
        stop = ints("stop_token_ids")?;
    }
    stop.sort_unstable();
    let words = field(params, "bad_words_token_ids")?.or(field(params, "bad_words")?);
    let bad_words = match words {
        Some(w) => w.try_iter()?.map(|word| token_ids(&word?, "bad_words")).collect::<PyResult<_>>()?,
        None => Vec::new(),
    };
    let i32_max = i32::MAX as i64;
    let mut min_tokens = int_field(params, "min_tokens", 0, u32::MAX as i64)?.unwrap_or(0);
    if let Some(max_tokens) = int_field(params, "max_tokens", 0, u32::MAX as i64)? {
        min_tokens = min_tokens.min(max_tokens);
    }
    let seed = match field(params, "seed")? {
        Some(s) if s.is_instance_of::<PyInt>() => Some(s.bitand(u64::MAX)?.extract::<u64>()?),
        Some(s) => return Err(PyValueError::new_err(format!("seed must be an integer, got {}", s.get_type().name()?))),
        None => None,
    };
    Ok(SamplingParams {
        temperature: float_field(params, "temperature", 1.0)?,
        top_k: int_field(params, "top_k", -1, i32_max)?.map_or(d.top_k, |k| k as i32),
        top_p: float_field(params, "top_p", d.top_p)?,
        min_p: float_field(params, "min_p", d.min_p)?,
        seed,
        presence_penalty: float_field(params, "presence_penalty", d.presence_penalty)?,
        frequency_penalty: float_field(params, "frequency_penalty", d.frequency_penalty)?,
        repetition_penalty: float_field(params, "repetition_penalty", d.repetition_penalty)?,
        logit_bias,
        allowed_token_ids: field(params, "allowed_token_ids")?.map(|v| token_ids(&v, "allowed_token_ids")).transpose()?,
        bad_words,
        min_tokens: min_tokens as usize,
        stop_token_ids: stop,
        logprobs: int_field(params, "logprobs", -1, i32_max)?.map(|k| k as i32),
        prompt_logprobs: int_field(params, "prompt_logprobs", -1, i32_max)?.map(|k| k as i32),
    })
}

/// Rows of a standalone sampling call: dicts of SamplingParams fields plus "prompt", "output"
/// (token lists) and "key" (PRNG key seed).
fn rows_of(rows: &Bound<'_, PyList>) -> PyResult<Vec<(SamplingParams, u64, Vec<i32>, Vec<i32>)>> {
    rows.iter()
        .map(|r| {
            Ok((
                sampling_of(&r)?,
                field_or(&r, "key", 0u64)?,
                field_or(&r, "prompt", Vec::new())?,
                field_or(&r, "output", Vec::new())?,
            ))
        })
        .collect()
}

/// Apply `f` to `logits` (`[R, V]` float32 numpy) and the rows; float32 numpy back.
fn with_rows<'py>(
    py: Python<'py>,
    logits: numpy::PyReadonlyArray2<'py, f32>,
    rows: &Bound<'py, PyList>,
    f: impl FnOnce(&mlx_rs::Array, &[Row]) -> anyhow::Result<mlx_rs::Array> + Send,
) -> PyResult<mlx_rs::Array> {
    let view = logits.as_array();
    let shape = view.shape().to_vec();
    let data: Vec<f32> = view.iter().copied().collect();
    let owned = rows_of(rows)?;
    py.detach(|| {
        let x = mlx_rs::Array::from_slice(&data, &[shape[0] as i32, shape[1] as i32]);
        let rows: Vec<Row> = owned
            .iter()
            .map(|(params, key, prompt, output)| Row { params, key: *key, prompt, output, counts: None })
            .collect();
        let out = f(&x, &rows)?;
        out.eval()?;
        Ok(out)
    })
    .map_err(engine_err)
}

/// `(token_ids, logprobs, ranks)` as numpy arrays `[rows, cols]`, `[rows, cols]`, `[rows]`.
fn logprobs_to_numpy<'py>(py: Python<'py>, lp: Logprobs) -> PyResult<Bound<'py, PyAny>> {
    let rows = lp.ranks.len();
    let ids = PyArray1::from_vec(py, lp.token_ids).reshape([rows, lp.cols])?;
    let lps = PyArray1::from_vec(py, lp.logprobs).reshape([rows, lp.cols])?;
    let ranks = PyArray1::from_vec(py, lp.ranks);
    Ok((ids, lps, ranks).into_pyobject(py)?.into_any())
}

fn to_numpy_f32<'py>(py: Python<'py>, a: &mlx_rs::Array) -> PyResult<Bound<'py, PyAny>> {
    let shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
    Ok(PyArray1::from_vec(py, a.as_slice::<f32>().to_vec()).reshape(shape)?.into_any())
}

/// Logits after allowed tokens, bad words, logit bias, min_tokens and penalties.
#[pyfunction]
fn process_logits<'py>(py: Python<'py>, logits: numpy::PyReadonlyArray2<'py, f32>, rows: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyAny>> {
    let out = with_rows(py, logits, rows, |x, r| sampler::process_logits(x, r))?;
    to_numpy_f32(py, &out)
}

/// The logits a random draw uses: processed, divided by temperature, min_p / top-k / top-p applied.
#[pyfunction]
fn filter_logits<'py>(py: Python<'py>, logits: numpy::PyReadonlyArray2<'py, f32>, rows: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyAny>> {
    let out = with_rows(py, logits, rows, |x, r| sampler::filter_logits(&sampler::process_logits(x, r)?, r))?;
    to_numpy_f32(py, &out)
}

/// One token per row, as the engine would choose it.
#[pyfunction]
fn sample_tokens<'py>(py: Python<'py>, logits: numpy::PyReadonlyArray2<'py, f32>, rows: &Bound<'py, PyList>) -> PyResult<Vec<i32>> {
    let out = with_rows(py, logits, rows, |x, r| sampler::sample(x, r))?;
    Ok(out.as_slice::<i32>().to_vec())
}

type GrammarWords = (Vec<String>, usize, Vec<i32>);

fn grammar_words(grammar: Option<(Vec<String>, numpy::PyReadonlyArray2<'_, i32>)>) -> Option<GrammarWords> {
    grammar.map(|(ids, mask)| {
        let view = mask.as_array();
        (ids, view.shape()[1], view.iter().copied().collect::<Vec<i32>>())
    })
}

/// `(req_ids, sampled_token_ids, logprobs, prompt_logprobs, failed)` of a step; `failed` maps
/// the requests the step could not serve to the reason.
fn step_output_to_py<'py>(py: Python<'py>, out: StepOutput) -> PyResult<Bound<'py, PyAny>> {
    let logprobs = match out.logprobs {
        Some(lp) => logprobs_to_numpy(py, lp)?,
        None => py.None().into_bound(py),
    };
    let prompt = PyDict::new(py);
    for (id, lp) in out.prompt_logprobs {
        prompt.set_item(id, logprobs_to_numpy(py, lp)?)?;
    }
    let failed = PyDict::new(py);
    for (id, reason) in out.failed {
        failed.set_item(id, reason)?;
    }
    Ok((out.req_ids, out.sampled_token_ids, logprobs, prompt, failed).into_pyobject(py)?.into_any())
}

fn new_request(r: &Bound<'_, PyAny>, req_id: &str) -> PyResult<NewRequest> {
    let prompt = r.getattr("prompt_token_ids")?;
    if prompt.is_none() {
        return Err(PyValueError::new_err("prompt embeddings are not supported, send token ids"));
    }
    Ok(NewRequest {
        prompt_token_ids: token_ids(&prompt, "prompt_token_ids")?,
        block_ids: block_ids_of(&r.getattr("block_ids")?)?,
        num_computed_tokens: r.getattr("num_computed_tokens")?.extract()?,
        sampling: sampling_of(&r.getattr("sampling_params")?)?,
        req_id: req_id.to_string(),
    })
}

fn scheduler_step(so: &Bound<'_, PyAny>) -> PyResult<SchedulerStep> {
    let mut step = SchedulerStep::default();
    for id in so.getattr("finished_req_ids")?.try_iter()? {
        step.finished_req_ids.push(id?.extract()?);
    }
    let num_sched = so.getattr("num_scheduled_tokens")?;
    let num_sched = num_sched.cast::<PyDict>()?;
    for r in so.getattr("scheduled_new_reqs")?.cast::<PyList>()?.iter() {
        let req_id: String = r.getattr("req_id")?.extract()?;
        // A request that cannot be read fails alone; the rest of the step runs.
        match new_request(&r, &req_id) {
            Ok(req) => step.new_requests.push(req),
            Err(e) => step.rejected.push((req_id, format!("request cannot be read: {e}"))),
        }
    }
    let cached = so.getattr("scheduled_cached_reqs")?;
    let ids: Vec<String> = cached.getattr("req_ids")?.extract()?;
    if !ids.is_empty() {
        let resumed = cached.getattr("resumed_req_ids")?;
        let resumed = resumed.cast::<PySet>()?;
        let all_tokens = cached.getattr("all_token_ids")?;
        let all_tokens = all_tokens.cast::<PyDict>()?;
        let new_blocks = cached.getattr("new_block_ids")?;
        let computed: Vec<usize> = cached.getattr("num_computed_tokens")?.extract()?;
        let outputs: Vec<usize> = cached.getattr("num_output_tokens")?.extract()?;
        for (i, req_id) in ids.into_iter().enumerate() {
            let blocks = new_blocks.get_item(i)?;
            step.cached_requests.push(CachedRequest {
                resumed: resumed.contains(&req_id)?,
                new_block_ids: if blocks.is_none() { None } else { Some(block_ids_of(&blocks)?) },
                num_computed_tokens: computed[i],
                num_output_tokens: outputs[i],
                all_token_ids: all_tokens.get_item(&req_id)?.map(|t| t.extract()).transpose()?,
                req_id,
            });
        }
    }
    // Runner order: new requests, then cached ones, as the scheduler listed them (the step's
    // output lists them in this order too); requests that could not be read come last.
    let order = step
        .new_requests
        .iter()
        .map(|r| &r.req_id)
        .chain(step.cached_requests.iter().map(|r| &r.req_id))
        .chain(step.rejected.iter().map(|(id, _)| id));
    let mut scheduled = Vec::with_capacity(num_sched.len());
    for id in order {
        if let Some(n) = num_sched.get_item(id)? {
            scheduled.push((id.clone(), n.extract::<usize>()?));
        }
    }
    if scheduled.len() != num_sched.len() {
        return Err(EngineError::new_err(
            "scheduler output schedules a request that is neither new nor cached",
        ));
    }
    step.num_scheduled_tokens = scheduled;
    Ok(step)
}

// ---- the runner ----

/// The Rust model runner: weights, paged KV cache, per-request state, sampling.
#[pyclass(name = "ModelRunner", module = "vllm_metal_rs._core")]
struct PyModelRunner {
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
    #[pyo3(signature = (model_path, *, block_size = 16, device = None, dtype = None, gather_attention = false))]
    fn new(
        py: Python<'_>,
        model_path: PathBuf,
        block_size: usize,
        device: Option<String>,
        dtype: Option<String>,
        gather_attention: bool,
    ) -> PyResult<Self> {
        let device = device.map(|d| d.parse::<DeviceKind>()).transpose().map_err(engine_err)?;
        let opts = RunnerOptions { block_size, device, dtype, gather_attention };
        let r = py
            .detach(|| runner::ModelRunner::load(&model_path, &opts))
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
            device: match r.device {
                DeviceKind::Cpu => "cpu",
                DeviceKind::Gpu => "gpu",
            },
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
    /// Per layer, its sliding window in tokens (None: full attention).
    #[getter]
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.lock().config.layer_windows()
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

    fn profile_peak_memory(&self, py: Python<'_>, num_tokens: usize) -> PyResult<usize> {
        py.detach(|| self.lock().profile_peak_memory(num_tokens)).map_err(engine_err)
    }

    /// `layer_group` / `layer_storage`: vLLM's KV-cache plan (each layer's group and shared
    /// tensor); default: one group, one storage per layer.
    #[pyo3(signature = (num_blocks, layer_group=None, layer_storage=None))]
    fn allocate_kv_cache(
        &self,
        py: Python<'_>,
        num_blocks: usize,
        layer_group: Option<Vec<usize>>,
        layer_storage: Option<Vec<usize>>,
    ) -> PyResult<()> {
        py.detach(|| {
            let mut r = self.lock();
            match (layer_group, layer_storage) {
                (Some(g), Some(s)) => r.allocate_kv_cache_groups(num_blocks, g, s),
                (None, None) => r.allocate_kv_cache(num_blocks),
                _ => Err(anyhow::anyhow!("pass both layer_group and layer_storage, or neither")),
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

    /// The first half of a vLLM step: request state updated, the forward submitted. The tokens
    /// come from `sample_tokens`.
    fn execute_model(&self, py: Python<'_>, scheduler_output: &Bound<'_, PyAny>) -> PyResult<()> {
        let step = scheduler_step(scheduler_output)?;
        py.detach(|| self.lock().forward_step(&step)).map_err(engine_err)
    }

    /// The second half: `(req_ids, sampled_token_ids, logprobs, prompt_logprobs, failed)`, where logprobs is
    /// None or `(token_ids, logprobs, ranks)` numpy arrays with one row per request, and
    /// prompt_logprobs maps the requests whose prefill ended to the same triple for the whole
    /// prompt. `grammar`: None, or `(req_ids, bitmask)` with the int32 bitmask `[len(req_ids), W]`.
    #[pyo3(signature = (grammar = None))]
    fn sample_tokens<'py>(
        &self,
        py: Python<'py>,
        grammar: Option<(Vec<String>, numpy::PyReadonlyArray2<'py, i32>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
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
    /// submitted; a step scheduled next reads them on the device. `collect` returns them.
    #[pyo3(signature = (grammar = None))]
    fn submit_tokens<'py>(
        &self,
        py: Python<'py>,
        grammar: Option<(Vec<String>, numpy::PyReadonlyArray2<'py, i32>)>,
    ) -> PyResult<()> {
        let grammar = grammar_words(grammar);
        py.detach(|| {
            let g = grammar.as_ref().map(|(ids, width, words)| GrammarBitmask { req_ids: ids, words, width: *width });
            self.lock().sample_submit(g.as_ref())
        })
        .map_err(engine_err)
    }

    /// The oldest submitted step's output, as `sample_tokens` returns it (waits for it).
    fn collect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let out = py.detach(|| self.lock().collect()).map_err(engine_err)?;
        step_output_to_py(py, out)
    }

    /// Logits `[T, vocab]` (float32) of every token of explicit `(req_id, tokens, start, block_ids)` chunks.
    fn step_logits<'py>(&self, py: Python<'py>, batch: Vec<(String, Vec<i32>, usize, Vec<i32>)>) -> PyResult<Bound<'py, PyAny>> {
        let logits = py
            .detach(|| {
                let chunks: Vec<SeqChunk> = batch
                    .iter()
                    .map(|(_, tokens, start, blocks)| SeqChunk {
                        start: *start,
                        tokens,
                        block_ids: std::slice::from_ref(blocks),
                    })
                    .collect();
                self.lock().step_logits(&chunks)
            })
            .map_err(engine_err)?;
        to_numpy_f32(py, &logits)
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add_class::<PyModelRunner>()?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(process_logits, m)?)?;
    m.add_function(wrap_pyfunction!(filter_logits, m)?)?;
    m.add_function(wrap_pyfunction!(sample_tokens, m)?)?;
    Ok(())
}
