//! The sampler alone, for tests against vLLM's own sampling code: logits rows in, processed or
//! filtered logits or chosen tokens out. Not used by the serving path.

use engine::sampler::{self, Row, SamplingParams};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::engine_err;
use crate::vllm::{field_or, sampling_of};

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
pub fn to_numpy_f32<'py>(py: Python<'py>, a: &mlx_rs::Array) -> PyResult<Bound<'py, PyAny>> {
    let shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
    Ok(PyArray1::from_vec(py, a.as_slice::<f32>().to_vec()).reshape(shape)?.into_any())
}

/// Logits after allowed tokens, bad words, logit bias, min_tokens and penalties.
#[pyfunction]
pub fn process_logits<'py>(py: Python<'py>, logits: numpy::PyReadonlyArray2<'py, f32>, rows: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyAny>> {
    let out = with_rows(py, logits, rows, |x, r| sampler::process_logits(x, r))?;
    to_numpy_f32(py, &out)
}

/// The logits a random draw uses: processed, divided by temperature, min_p / top-k / top-p applied.
#[pyfunction]
pub fn filter_logits<'py>(py: Python<'py>, logits: numpy::PyReadonlyArray2<'py, f32>, rows: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyAny>> {
    let out = with_rows(py, logits, rows, |x, r| sampler::filter_logits(&sampler::process_logits(x, r)?, r))?;
    to_numpy_f32(py, &out)
}

/// One token per row, as the engine would choose it.
#[pyfunction]
pub fn sample_tokens<'py>(py: Python<'py>, logits: numpy::PyReadonlyArray2<'py, f32>, rows: &Bound<'py, PyList>) -> PyResult<Vec<i32>> {
    let out = with_rows(py, logits, rows, |x, r| sampler::sample(x, r))?;
    Ok(out.as_slice::<i32>().to_vec())
}

