// The extension is installed as site-packages/vllm_metal_rs/_core*.so and loads the libmlx of the
// installed `mlx` wheel (site-packages/mlx/lib), the same one Python's `mlx` uses.
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap();
    if target_os == "macos" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,@loader_path/../mlx/lib");
    } else {
        println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../mlx/lib");
    }
    // `cargo test` of this crate (not used by the package) can still find the wheel's library.
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
