// Test and bench binaries of this crate load libmlx from the installed wheel: give them its rpath.
// (The Python extension sets its own, relative rpath.)
fn main() {
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
