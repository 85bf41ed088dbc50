// The extension is installed as site-packages/vllm_metal_rs/_core*.so and loads the libmlx of the
// installed `mlx` wheel (site-packages/mlx/lib), the same one Python's `mlx` uses.
fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap();
    if target_os == "macos" {
        println!("cargo:rustc-link-arg=-Wl,-rpath,@loader_path/../mlx/lib");
    } else {
        println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../mlx/lib");
    }
    // Second choice, the build environment's wheel: an editable install (`maturin develop`, as
    // install.sh does) keeps the module in python/vllm_metal_rs/, where the relative path above
    // does not reach site-packages.
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
