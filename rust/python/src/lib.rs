//! `vllm_metal_rs._core`: the PyO3 surface of the engine.
//!
//! Once per step the worker hands vLLM's `SchedulerOutput` to `ModelRunner.execute_model`; its
//! fields are read here, in Rust (`vllm.rs`), and the step runs without touching Python again.
//! `python/vllm_metal_rs/_core.pyi` types everything this module exports.

mod encoder;
mod logging;
mod runner;
mod testing;
mod vllm;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use engine::mlx_ext::device::DeviceKind;

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

fn parse_device(device: Option<&str>) -> PyResult<Option<DeviceKind>> {
    device.map(str::parse::<DeviceKind>).transpose().map_err(engine_err)
}

/// "gpu" or "cpu": the device the engine runs on when `device` (or nothing) is asked for.
#[pyfunction]
#[pyo3(signature = (device=None))]
fn resolve_device(device: Option<&str>) -> PyResult<&'static str> {
    Ok(engine::mlx_ext::device::resolve(parse_device(device)?).map_err(engine_err)?.name())
}

/// Bytes of memory behind the device the engine runs on for `device`.
#[pyfunction]
#[pyo3(signature = (device=None))]
fn device_total_memory(device: Option<&str>) -> PyResult<usize> {
    let kind = engine::mlx_ext::device::resolve(parse_device(device)?).map_err(engine_err)?;
    Ok(engine::mlx_ext::device::total_memory(kind))
}

/// GGUF architecture (llama.cpp's name) -> the config architectures of the families loading it.
#[pyfunction]
fn gguf_architectures() -> Vec<(&'static str, Vec<&'static str>)> {
    engine::gguf::architectures()
}

/// The GGUF checkpoint of `model_dir` (config.json + one .gguf) as float32 safetensors under HF
/// names at `out_file`; returns the number of tensors.
#[pyfunction]
fn gguf_to_safetensors(py: Python<'_>, model_dir: std::path::PathBuf, out_file: std::path::PathBuf) -> PyResult<usize> {
    py.detach(|| engine::gguf::export_float32(&model_dir, &out_file)).map_err(engine_err)
}

/// The config architectures of the decoder families the engine runs.
#[pyfunction]
fn decoder_architectures() -> Vec<&'static str> {
    engine::models::architectures().collect()
}

/// The config architectures of the encoder families (pooling models) the engine runs.
#[pyfunction]
fn encoder_architectures() -> Vec<&'static str> {
    engine::encoder::architectures().collect()
}

/// The KV block size (tokens) vLLM must use for the model at `config_json` in `dtype`: the
/// smallest multiple of `block_size` whose K/V page holds a linear-attention state, with the ssm
/// state in `ssm_dtype` (None: the config's rule); `block_size` for models without such layers.
#[pyfunction]
#[pyo3(signature = (config_json, dtype, block_size, ssm_dtype=None))]
fn required_block_size(config_json: std::path::PathBuf, dtype: &str, block_size: usize, ssm_dtype: Option<String>) -> PyResult<usize> {
    let run = || -> anyhow::Result<usize> {
        let mut config = engine::config::ModelConfig::from_file(&config_json)?;
        if ssm_dtype.is_some() {
            config.mamba_ssm_dtype = ssm_dtype.clone();
        }
        let dtype = engine::dtype::parse_dtype(dtype)?;
        engine::runner::ModelRunner::required_block_size(&config, dtype, block_size)
    };
    run().map_err(engine_err)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add_class::<runner::PyModelRunner>()?;
    m.add_class::<runner::PyStepOutput>()?;
    m.add_class::<runner::PyRequestImages>()?;
    m.add_class::<encoder::PyEncoderRunner>()?;
    m.add_class::<encoder::PyPoolingOutput>()?;
    m.add_function(wrap_pyfunction!(logging::init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(backend_info, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    m.add_function(wrap_pyfunction!(device_total_memory, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_architectures, m)?)?;
    m.add_function(wrap_pyfunction!(encoder_architectures, m)?)?;
    m.add_function(wrap_pyfunction!(decoder_architectures, m)?)?;
    m.add_function(wrap_pyfunction!(required_block_size, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_to_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(testing::process_logits, m)?)?;
    m.add_function(wrap_pyfunction!(testing::filter_logits, m)?)?;
    m.add_function(wrap_pyfunction!(testing::sample_tokens, m)?)?;
    Ok(())
}

