//! Raw mlx-c bindings, generated at build time against the installed MLX wheel (see build.rs).
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

extern "C" {
    /// Zeros on MLX's CPU allocator, its whole pages left for the kernel to zero (csrc/host_zeros.cpp).
    /// 0: `res` holds the array; 1: not MLX's CPU allocator (use `zeros`); 2: allocation failed.
    pub fn mlx_sys_host_zeros(res: *mut mlx_array, shape: *const ::std::os::raw::c_int, dim: ::std::os::raw::c_int, dtype: mlx_dtype) -> ::std::os::raw::c_int;
}
