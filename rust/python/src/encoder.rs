//! `EncoderRunner`: the engine's encoder models as a Python class (embeddings).

use std::path::PathBuf;
use std::sync::Mutex;

use engine::encoder::head::ClassifyOptions;
use engine::encoder::pooling::{PoolOptions, PoolingKind};
use engine::encoder::runner::{EncoderOptions, EncoderRunner};
use engine::encoder::EncoderInput;
use engine::mlx_ext::device::DeviceKind;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine_err;
use crate::vllm::encoder_step;

/// One encoder step's output: the served requests in step order with their vectors, and the
/// requests that failed with the reason.
#[pyclass(name = "PoolingOutput", module = "vllm_metal_rs._core", frozen, get_all)]
pub struct PyPoolingOutput {
    req_ids: Vec<String>,
    vectors: Vec<Py<PyArray1<f32>>>,
    failed: Py<PyDict>,
}

#[pyclass(name = "EncoderRunner", module = "vllm_metal_rs._core")]
pub struct PyEncoderRunner {
    #[pyo3(get)]
    hidden_size: usize,
    #[pyo3(get)]
    max_positions: usize,
    #[pyo3(get)]
    weights_nbytes: usize,
    #[pyo3(get)]
    device: &'static str,
    inner: Mutex<EncoderRunner>,
}

fn inputs<'a>(tokens: &'a [Vec<i32>], token_types: &'a Option<Vec<Option<Vec<i32>>>>) -> PyResult<Vec<EncoderInput<'a>>> {
    if let Some(tt) = token_types {
        if tt.len() != tokens.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} token type lists for {} inputs",
                tt.len(),
                tokens.len()
            )));
        }
    }
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(i, t)| EncoderInput {
            tokens: t,
            token_types: token_types.as_ref().and_then(|tt| tt[i].as_deref()),
        })
        .collect())
}

impl PyEncoderRunner {
    fn lock(&self) -> std::sync::MutexGuard<'_, EncoderRunner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl PyEncoderRunner {
    #[new]
    #[pyo3(signature = (model_path, *, device = None, dtype = None))]
    fn new(py: Python<'_>, model_path: PathBuf, device: Option<String>, dtype: Option<String>) -> PyResult<Self> {
        let device = device.map(|d| d.parse::<DeviceKind>()).transpose().map_err(engine_err)?;
        let opts = EncoderOptions { device, dtype };
        let r = py.detach(|| EncoderRunner::load(&model_path, &opts)).map_err(engine_err)?;
        Ok(Self {
            hidden_size: r.hidden_size(),
            max_positions: r.max_positions(),
            weights_nbytes: r.weights_nbytes,
            device: r.device.name(),
            inner: Mutex::new(r),
        })
    }

    /// "classify" for a model with a classifier head (cross-encoders), else "embed".
    #[getter]
    fn task(&self) -> &'static str {
        self.lock().task()
    }

    #[getter]
    fn num_labels(&self) -> Option<usize> {
        self.lock().num_labels()
    }

    /// vLLM's pooler config for the model: pooling (MEAN, CLS or LAST), the classifier's
    /// activation (identity, sigmoid, softmax) and the logit affine.
    #[pyo3(signature = (pooling, *, activation = "identity", logit_mean = 0.0, logit_sigma = 1.0))]
    fn configure(&self, pooling: &str, activation: &str, logit_mean: f32, logit_sigma: f32) -> PyResult<()> {
        let mut r = self.lock();
        r.pooling = pooling.parse().map_err(engine_err)?;
        r.classify = ClassifyOptions { logit_mean, logit_sigma, activation: activation.parse().map_err(engine_err)? };
        Ok(())
    }

    /// Make the next batch fail once, as an MLX error would (tests of fault isolation).
    fn inject_fault(&self) {
        self.lock().inject_fault()
    }

    /// vLLM's SchedulerOutput in: every scheduled request embedded whole.
    fn execute_model(&self, py: Python<'_>, scheduler_output: &Bound<'_, PyAny>) -> PyResult<PyPoolingOutput> {
        let (requests, rejected) = encoder_step(scheduler_output)?;
        let out = py.detach(|| self.lock().execute(&requests));
        let failed = PyDict::new(py);
        for (id, reason) in rejected.into_iter().chain(out.failed) {
            log::warn!("request {id} failed: {reason}");
            failed.set_item(id, reason)?;
        }
        Ok(PyPoolingOutput {
            req_ids: out.req_ids,
            vectors: out.vectors.into_iter().map(|v| PyArray1::from_vec(py, v).unbind()).collect(),
            failed: failed.unbind(),
        })
    }

    /// One float32 vector per input (`pooling`: MEAN, CLS or LAST; `dimensions` per input or
    /// None; `normalize`: vLLM's use_activation): embeddings, or a classifier's scores.
    #[pyo3(signature = (token_ids, *, pooling, normalize, dimensions = None, token_type_ids = None))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<Vec<i32>>,
        pooling: &str,
        normalize: bool,
        dimensions: Option<Vec<Option<usize>>>,
        token_type_ids: Option<Vec<Option<Vec<i32>>>>,
    ) -> PyResult<Vec<Bound<'py, PyArray1<f32>>>> {
        let kind: PoolingKind = pooling.parse().map_err(engine_err)?;
        let dims = dimensions.unwrap_or_else(|| vec![None; token_ids.len()]);
        if dims.len() != token_ids.len() {
            return Err(pyo3::exceptions::PyValueError::new_err("one dimensions entry per input"));
        }
        let opts: Vec<PoolOptions> = dims.into_iter().map(|dimensions| PoolOptions { dimensions, use_activation: normalize }).collect();
        let inputs = inputs(&token_ids, &token_type_ids)?;
        let out = py
            .detach(|| self.lock().embed(&inputs, kind, &opts))
            .map_err(engine_err)?;
        Ok(out.into_iter().map(|v| PyArray1::from_vec(py, v)).collect())
    }

    /// The last hidden states `[T, hidden]` (float32) of the flattened inputs, and each input's
    /// (first row, length).
    #[pyo3(signature = (token_ids, *, token_type_ids = None))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<Vec<i32>>,
        token_type_ids: Option<Vec<Option<Vec<i32>>>>,
    ) -> PyResult<(Bound<'py, PyAny>, Vec<(usize, usize)>)> {
        let inputs = inputs(&token_ids, &token_type_ids)?;
        let (h, spans) = py
            .detach(|| self.lock().hidden_states(&inputs))
            .map_err(engine_err)?;
        let rows = spans.iter().map(|s| s.1).sum::<usize>();
        let arr = PyArray1::from_vec(py, h).reshape([rows, self.hidden_size])?.into_any();
        Ok((arr, spans))
    }
}
