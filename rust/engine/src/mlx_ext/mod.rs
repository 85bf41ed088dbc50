//! What the engine needs from MLX beyond mlx-rs: the backend and default device, MLX custom CUDA
//! kernels, which BLAS serves CPU matmuls, compiled elementwise chains, and quantized ops in
//! modes mlx-rs does not pass (MXFP4). The only module of
//! the engine that calls `mlx_sys` or other C functions directly.

pub mod alloc;
pub mod blas;
pub mod custom_kernel;
pub mod device;
pub mod fuse;
pub mod quant;
