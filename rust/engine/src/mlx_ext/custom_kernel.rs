//! MLX custom CUDA kernels (`mlx::core::fast::cuda_kernel`, which mlx-rs does not wrap): a kernel
//! body compiled by MLX at first use (NVRTC) and cached per template instantiation.

use std::ffi::{c_char, CString};

use anyhow::{anyhow, ensure, Result};
use mlx_rs::{Array, Dtype, Stream};

#[derive(Debug, Clone, Copy)]
pub enum TemplateArg {
    Dtype(Dtype),
    Int(i32),
}

/// An output the launch allocates (the kernel must write all of it).
pub struct Output<'a> {
    pub shape: &'a [i32],
    pub dtype: Dtype,
}

pub struct CudaKernel {
    raw: mlx_sys::mlx_fast_cuda_kernel,
    name: String,
}

struct Strings(mlx_sys::mlx_vector_string);

impl Strings {
    fn new(items: &[&str]) -> Result<Self> {
        let v = Strings(unsafe { mlx_sys::mlx_vector_string_new() });
        for s in items {
            let c = CString::new(*s)?;
            ensure!(unsafe { mlx_sys::mlx_vector_string_append_value(v.0, c.as_ptr()) } == 0, "appending {s:?}");
        }
        Ok(v)
    }
}

impl Drop for Strings {
    fn drop(&mut self) {
        unsafe { mlx_sys::mlx_vector_string_free(self.0) };
    }
}

struct Config(mlx_sys::mlx_fast_cuda_kernel_config);

impl Drop for Config {
    fn drop(&mut self) {
        unsafe { mlx_sys::mlx_fast_cuda_kernel_config_free(self.0) };
    }
}

struct Arrays(mlx_sys::mlx_vector_array);

impl Drop for Arrays {
    fn drop(&mut self) {
        unsafe { mlx_sys::mlx_vector_array_free(self.0) };
    }
}

impl CudaKernel {
    /// `source` is the kernel body; each input `x` is a `const T* x` of its dtype (with `x_shape`,
    /// `x_strides`, `x_ndim` when the body names them), each output a `T* out`. Inputs are made
    /// row-contiguous before the launch (a no-op for arrays that already are).
    pub fn new(name: &str, inputs: &[&str], outputs: &[&str], source: &str, header: &str) -> Result<Self> {
        let (cname, csource, cheader) = (CString::new(name)?, CString::new(source)?, CString::new(header)?);
        let (ins, outs) = (Strings::new(inputs)?, Strings::new(outputs)?);
        let raw = unsafe {
            mlx_sys::mlx_fast_cuda_kernel_new(cname.as_ptr(), ins.0, outs.0, csource.as_ptr(), cheader.as_ptr(), true, 0)
        };
        ensure!(!raw.ctx.is_null(), "creating the CUDA kernel {name}");
        Ok(Self { raw, name: name.to_string() })
    }

    /// Launch over `grid` threads (not blocks) in blocks of `block` threads. Lazy like any MLX op;
    /// the kernel compiles and runs when an output is evaluated.
    ///
    /// # Safety
    /// The body must stay inside its inputs' and outputs' buffers for these shapes, template
    /// arguments and launch dimensions, and write every output element.
    pub unsafe fn apply(
        &self,
        inputs: &[&Array],
        outputs: &[Output],
        grid: (i32, i32, i32),
        block: (i32, i32, i32),
        template: &[(&str, TemplateArg)],
    ) -> Result<Vec<Array>> {
        let what = || format!("launching the CUDA kernel {}", self.name);
        let config = Config(mlx_sys::mlx_fast_cuda_kernel_config_new());
        let check = |status: i32| -> Result<()> { ensure!(status == 0, "{}", what()); Ok(()) };
        for o in outputs {
            check(mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(
                config.0,
                o.shape.as_ptr(),
                o.shape.len(),
                o.dtype.into(),
            ))?;
        }
        check(mlx_sys::mlx_fast_cuda_kernel_config_set_grid(config.0, grid.0, grid.1, grid.2))?;
        check(mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(config.0, block.0, block.1, block.2))?;
        for (name, arg) in template {
            let cname = CString::new(*name)?;
            let p: *const c_char = cname.as_ptr();
            check(match *arg {
                TemplateArg::Dtype(d) => mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_dtype(config.0, p, d.into()),
                TemplateArg::Int(v) => mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_int(config.0, p, v),
            })?;
        }
        let ins = Arrays(mlx_sys::mlx_vector_array_new());
        for a in inputs {
            check(mlx_sys::mlx_vector_array_append_value(ins.0, a.as_ptr()))?;
        }
        let mut outs = Arrays(mlx_sys::mlx_vector_array_new());
        let stream = Stream::thread_local_or_default();
        check(mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs.0, self.raw, ins.0, config.0, stream.as_ptr()))?;
        let n = mlx_sys::mlx_vector_array_size(outs.0);
        let mut arrays = Vec::with_capacity(n);
        for i in 0..n {
            let mut a = mlx_sys::mlx_array_new();
            if mlx_sys::mlx_vector_array_get(&mut a, outs.0, i) != 0 {
                mlx_sys::mlx_array_free(a);
                return Err(anyhow!("{}: reading output {i}", what()));
            }
            arrays.push(Array::from_ptr(a));
        }
        Ok(arrays)
    }
}

impl Drop for CudaKernel {
    fn drop(&mut self) {
        unsafe { mlx_sys::mlx_fast_cuda_kernel_free(self.raw) };
    }
}
