//! Reading vLLM's objects: `SchedulerOutput`, `SamplingParams` and `PoolingParams`, once per
//! step, into the engine's `SchedulerStep` (or an encoder's requests). Values are brought into
//! the engine's ranges here, once.

use engine::encoder::pooling::{PoolOptions, PoolingParams};
use engine::encoder::runner::EncoderRequest;
use engine::runner::{CachedRequest, NewRequest, SchedulerStep};
use engine::sampler::SamplingParams;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PySet};

use crate::EngineError;

fn block_ids_of(groups: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<i32>>> {
    // One list per KV-cache group.
    groups.extract()
}

/// Attribute of a vLLM object (None if it is None), or key of a dict (the sampler's test
/// functions take dicts; None if absent). A vLLM object without the attribute is an error: a
/// field vLLM renamed must fail loudly at the first step, not read as a default.
fn field<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    let value = match obj.cast::<PyDict>() {
        Ok(d) => d.get_item(name)?,
        Err(_) => Some(obj.getattr(name)?),
    };
    Ok(value.filter(|v| !v.is_none()))
}

pub fn field_or<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(obj: &Bound<'py, PyAny>, name: &str, default: T) -> PyResult<T> {
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
pub fn sampling_of(params: &Bound<'_, PyAny>) -> PyResult<SamplingParams> {
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
fn new_request(r: &Bound<'_, PyAny>, req_id: &str) -> PyResult<NewRequest> {
    let prompt = r.getattr("prompt_token_ids")?;
    if prompt.is_none() {
        return Err(PyValueError::new_err("prompt embeddings are not supported, send token ids"));
    }
    // A pooling model's requests carry pooling parameters instead of sampling ones.
    let pooling = r.getattr("pooling_params")?;
    let (sampling, pooling) = if pooling.is_none() {
        (sampling_of(&r.getattr("sampling_params")?)?, None)
    } else {
        (SamplingParams::default(), Some(pooling_params_of(&pooling)?))
    };
    Ok(NewRequest {
        prompt_token_ids: token_ids(&prompt, "prompt_token_ids")?,
        block_ids: block_ids_of(&r.getattr("block_ids")?)?,
        num_computed_tokens: r.getattr("num_computed_tokens")?.extract()?,
        sampling,
        pooling,
        req_id: req_id.to_string(),
    })
}

pub fn scheduler_step(so: &Bound<'_, PyAny>) -> PyResult<SchedulerStep> {
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


/// The pooling requests of a step for an encoder model: (requests, rejected with the reason).
/// Encoder prompts run whole in one step (vLLM turns chunked prefill off for them).
pub fn encoder_step(so: &Bound<'_, PyAny>) -> PyResult<(Vec<EncoderRequest>, Vec<(String, String)>)> {
    let num_sched = so.getattr("num_scheduled_tokens")?;
    let num_sched = num_sched.cast::<PyDict>()?;
    let mut requests = Vec::new();
    let mut rejected = Vec::new();
    for r in so.getattr("scheduled_new_reqs")?.cast::<PyList>()?.iter() {
        let req_id: String = r.getattr("req_id")?.extract()?;
        let scheduled: usize = num_sched.get_item(&req_id)?.map(|n| n.extract()).transpose()?.unwrap_or(0);
        match encoder_request(&r, &req_id, scheduled) {
            Ok(req) => requests.push(req),
            Err(e) => rejected.push((req_id, format!("request cannot be served: {e}"))),
        }
    }
    let cached: Vec<String> = so.getattr("scheduled_cached_reqs")?.getattr("req_ids")?.extract()?;
    for req_id in cached {
        rejected.push((req_id, "an encoder request must run whole in one step".to_string()));
    }
    Ok((requests, rejected))
}

fn encoder_request(r: &Bound<'_, PyAny>, req_id: &str, scheduled: usize) -> PyResult<EncoderRequest> {
    let prompt = r.getattr("prompt_token_ids")?;
    if prompt.is_none() {
        return Err(PyValueError::new_err("prompt embeddings are not supported, send token ids"));
    }
    let tokens = token_ids(&prompt, "prompt_token_ids")?;
    if scheduled != tokens.len() {
        return Err(PyValueError::new_err(format!(
            "{scheduled} of {} prompt tokens scheduled; encoder prompts run whole (chunked prefill must be off)",
            tokens.len()
        )));
    }
    let params = r.getattr("pooling_params")?;
    if params.is_none() {
        return Err(PyValueError::new_err("the request has no pooling parameters"));
    }
    let PoolingParams { task, options } = pooling_params_of(&params)?;
    // Cross-encoder pairs: token type 1 from this index on (vLLM's compressed form).
    let extra = field(&params, "extra_kwargs")?;
    let first_type_one = match &extra {
        Some(e) => match e.cast::<PyDict>()?.get_item("compressed_token_type_ids")? {
            Some(k) => Some(int_in(&k, "compressed_token_type_ids", 0, tokens.len() as i64)? as usize),
            None => None,
        },
        None => None,
    };
    let token_types = first_type_one.map(|k| (0..tokens.len()).map(|i| i32::from(i >= k)).collect());
    Ok(EncoderRequest {
        req_id: req_id.to_string(),
        tokens,
        token_types,
        task,
        options,
    })
}

/// vLLM's PoolingParams: the task, use_activation and dimensions (`verify` filled them from the
/// pooler config; None means the default).
fn pooling_params_of(params: &Bound<'_, PyAny>) -> PyResult<PoolingParams> {
    let task: Option<String> = field(params, "task")?.map(|t| t.extract()).transpose()?;
    let use_activation: bool = field_or(params, "use_activation", true)?;
    let dimensions = int_field(params, "dimensions", 0, i64::from(i32::MAX))?.map(|d| d as usize);
    Ok(PoolingParams { task, options: PoolOptions { dimensions, use_activation } })
}
