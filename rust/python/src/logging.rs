//! The engine's `log` records, handed to Python's `logging` (vLLM's handlers and format).

use std::sync::OnceLock;

use pyo3::prelude::*;

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
pub fn init_logging(py: Python<'_>, debug: bool) -> PyResult<()> {
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
