//! Elementwise chains run as one MLX-compiled function on GPUs, where every small op costs a
//! kernel launch; elsewhere op by op (compiling for the CPU backend means running a C++ compiler).

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::Result;
use mlx_rs::{error::Exception, Array, Device, DeviceType};

/// A function of arrays that `fused` may compile. It must infer every shape from its inputs
/// (compiled once for any shapes): no reshapes to fixed shapes, slices or gathers of fixed sizes.
pub type ArrayFn = fn(&[Array]) -> std::result::Result<Array, Exception>;

pub type CompiledFn = Box<dyn FnMut(&[Array]) -> std::result::Result<Vec<Array>, Exception>>;

thread_local! {
    static COMPILED: RefCell<HashMap<usize, CompiledFn>> = RefCell::new(HashMap::new());
}

/// `f(args)`: compiled on a GPU (traced once per thread), plain elsewhere.
pub fn fused(f: ArrayFn, args: &[Array]) -> Result<Array> {
    if !matches!(Device::default().get_type(), Ok(DeviceType::Gpu)) {
        return Ok(f(args)?);
    }
    COMPILED.with(|cell| {
        let mut map = cell.borrow_mut();
        let g = map.entry(f as usize).or_insert_with(|| compiled(f));
        Ok(g(args)?.remove(0))
    })
}

/// `f` compiled by MLX for inputs of any shape.
pub fn compiled(f: ArrayFn) -> CompiledFn {
    let g = move |args: &[Array]| -> std::result::Result<Vec<Array>, Exception> { Ok(vec![f(args)?]) };
    let mut c = mlx_rs::transforms::compile::compile(g, true);
    Box::new(move |args: &[Array]| c(args))
}
