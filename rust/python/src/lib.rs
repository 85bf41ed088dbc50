//! `vllm_metal_rs._core`: the PyO3 surface of the engine.
//!
//! Once per step the worker hands vLLM's `SchedulerOutput` to `ModelRunner.execute_model`; its
//! fields are read here, in Rust (`vllm.rs`), and the step runs without touching Python again.
//! `python/vllm_metal_rs/_core.pyi` types everything this module exports.

mod logging;
mod runner;
mod testing;
mod vllm;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(_core, EngineError, PyRuntimeError, "An error of the vllm-metal-rs engine.");

/// One line: the error and its causes, outermost first.
fn engine_err(e: anyhow::Error) -> PyErr {
    EngineError::new_err(format!("{e:#}"))
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add_class::<runner::PyModelRunner>()?;
    m.add_class::<runner::PyStepOutput>()?;
    m.add_function(wrap_pyfunction!(logging::init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(testing::process_logits, m)?)?;
    m.add_function(wrap_pyfunction!(testing::filter_logits, m)?)?;
    m.add_function(wrap_pyfunction!(testing::sample_tokens, m)?)?;
    Ok(())
}

