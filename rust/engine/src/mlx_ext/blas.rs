//! Which BLAS serves MLX's CPU matmuls in this process.
//!
//! The Linux `mlx-cpu` wheel bundles a reference BLAS (~90x slower than OpenBLAS for our shapes);
//! the Python package loads OpenBLAS globally before libmlx so `cblas_sgemm` resolves there. This
//! reports where the symbol actually resolved, for the start-up log.

use std::ffi::CStr;

/// Path of the library that provides `cblas_sgemm`, or a description when it cannot be told.
pub fn active_blas() -> String {
    if cfg!(target_os = "macos") {
        return "Accelerate".to_string();
    }
    unsafe {
        let sym = libc::dlsym(libc::RTLD_DEFAULT, c"cblas_sgemm".as_ptr());
        if sym.is_null() {
            return "unknown (cblas_sgemm not resolved)".to_string();
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(sym, &mut info) == 0 || info.dli_fname.is_null() {
            return "unknown".to_string();
        }
        CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()
    }
}

/// True when the active BLAS is an optimised one (OpenBLAS, Accelerate, MKL, BLIS).
pub fn is_fast(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["openblas", "accelerate", "mkl", "blis"].iter().any(|k| n.contains(k))
}
