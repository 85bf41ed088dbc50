//! What the engine needs from MLX beyond mlx-rs: the backend and default device, MLX custom CUDA
//! kernels, which BLAS serves CPU matmuls, and compiled elementwise chains. The only module of
//! the engine that calls `mlx_sys` or other C functions directly.

pub mod blas;
pub mod custom_kernel;
pub mod device;
pub mod fuse;
