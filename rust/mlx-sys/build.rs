//! Builds mlx-c against the MLX that is installed as a Python wheel, and links that wheel's `libmlx`
//! dynamically, so that the Python `mlx` package and this extension share one libmlx per process.
//!
//! The crates.io `mlx-sys` builds MLX itself with CMake (fetching it from the network) and links
//! macOS frameworks; neither works on Linux, and building MLX twice would give two libmlx in one
//! process. Here:
//!   1. the MLX wheel is found through Python (or `MLX_DIR`),
//!   2. the unmodified mlx-c sources come from the crates.io `mlx-sys` package (downloaded, not built,
//!      by `cargo metadata`; or `MLX_C_DIR`),
//!   3. a build-time copy of mlx-c is bridged to the installed headers and compiled with `cc`,
//!   4. bindgen generates the same bindings mlx-rs expects.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

const MLX_C_CRATE_VERSION: &str = "0.7.0";

fn main() {
    for var in ["MLX_DIR", "MLX_C_DIR", "PYO3_PYTHON", "VIRTUAL_ENV"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let csrc = manifest.join("csrc");

    let mlx = find_mlx_wheel();
    let mlx_include = mlx.join("include");
    let mlx_lib = mlx.join("lib");
    println!("cargo:rerun-if-changed={}", mlx_include.join("mlx/ops.h").display());

    let mlx_c = prepare_mlx_c(&out, &mlx_include);

    // mlx-c only declares its half-precision types on aarch64 (from arm_fp16.h); mlx-rs needs them
    // everywhere. Elsewhere they are MLX's own half types for C++, and 2-byte types for bindgen.
    let native_half = target_arch == "aarch64";

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(&mlx_c)
        .include(&mlx_include)
        .flag("-include")
        .flag(csrc.join("mlxc_compat.h").to_str().unwrap())
        .warnings(false)
        .extra_warnings(false);
    if !native_half {
        build.define("HAS_FLOAT16", None).define("HAS_BFLOAT16", None);
    }
    let mut sources: Vec<PathBuf> = fs::read_dir(mlx_c.join("mlx/c"))
        .expect("reading mlx-c sources")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    sources.sort();
    build.files(&sources);
    // Engine helpers beyond mlx-c, declared in src/lib.rs.
    build.file(csrc.join("host_zeros.cpp"));
    build.compile("mlxc");

    if target_os != "macos" {
        // mlx-rs seeds its RNG from macOS's mach_approximate_time.
        cc::Build::new()
            .file(csrc.join("mach_time.c"))
            .compile("mlx_sys_mach_time");
    }

    println!("cargo:rustc-link-search=native={}", mlx_lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if target_os == "macos" {
        println!("cargo:rustc-link-lib=dylib=c++");
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
    // A dependency's rpath does not reach the final link: dependents read this (DEP_MLX_LIBDIR) and
    // set their own.
    println!("cargo::metadata=libdir={}", mlx_lib.display());

    generate_bindings(&mlx_c, &csrc, native_half, &out);
}

/// The directory of the installed `mlx` package (the one with `include/` and `lib/`).
fn find_mlx_wheel() -> PathBuf {
    if let Some(dir) = env::var_os("MLX_DIR") {
        return PathBuf::from(dir);
    }
    let mut pythons: Vec<String> = Vec::new();
    if let Ok(p) = env::var("PYO3_PYTHON") {
        pythons.push(p);
    }
    if let Ok(venv) = env::var("VIRTUAL_ENV") {
        pythons.push(format!("{venv}/bin/python"));
    }
    pythons.push("python3".into());
    let script = "import mlx\nfor p in mlx.__path__: print(p)";
    for python in &pythons {
        let Ok(output) = Command::new(python).args(["-c", script]).output() else {
            continue;
        };
        if !output.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let dir = PathBuf::from(line.trim());
            if dir.join("include/mlx/mlx.h").is_file() && dir.join("lib").is_dir() {
                return dir;
            }
        }
    }
    panic!(
        "mlx-sys: no MLX wheel with headers found (tried {pythons:?}). Install `mlx[cpu]==0.32.4` \
         (Linux), `mlx==0.32.4` (macOS) or `mlx[cuda13]==0.32.4`, or set MLX_DIR to its package directory."
    );
}

/// A build-time copy of mlx-c, bridged to the installed MLX headers.
fn prepare_mlx_c(out: &Path, mlx_include: &Path) -> PathBuf {
    let src = find_mlx_c_source(out);
    let dst = out.join("mlx-c");
    let _ = fs::remove_dir_all(&dst);
    copy_dir(&src.join("mlx/c"), &dst.join("mlx/c"));

    // MLX 0.32.3 added `global_scale` to gather_qmm, before `sorted_indices`; mlx-c 0.7.0 predates it.
    let ops_h = fs::read_to_string(mlx_include.join("mlx/ops.h")).expect("reading mlx/ops.h");
    let gather_qmm_decl = ops_h
        .split("gather_qmm(")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("");
    if gather_qmm_decl.contains("global_scale") {
        let ops_cpp = dst.join("mlx/c/ops.cpp");
        let text = fs::read_to_string(&ops_cpp).unwrap();
        let start = text
            .find("mlx::core::gather_qmm(")
            .expect("mlx-c ops.cpp: gather_qmm call not found");
        let rel = text[start..]
            .find("sorted_indices,")
            .expect("mlx-c ops.cpp: gather_qmm sorted_indices argument not found");
        let at = start + rel;
        let patched = format!("{}std::nullopt, {}", &text[..at], &text[at..]);
        fs::write(&ops_cpp, patched).unwrap();
    }
    dst
}

fn find_mlx_c_source(out: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("MLX_C_DIR") {
        return PathBuf::from(dir);
    }
    let crate_dir = format!("mlx-sys-{MLX_C_CRATE_VERSION}");
    // Already unpacked in the registry (any earlier download)?
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = &cargo_home {
        if let Ok(entries) = fs::read_dir(home.join("registry/src")) {
            for entry in entries.flatten() {
                let candidate = entry.path().join(&crate_dir).join("src/mlx-c");
                if candidate.join("mlx/c/mlx.h").is_file() {
                    return candidate;
                }
            }
        }
    }
    // Otherwise let cargo download (not build) the crates.io package through a throw-away manifest.
    let probe = out.join("fetch-mlx-c");
    fs::create_dir_all(probe.join("src")).unwrap();
    fs::write(
        probe.join("Cargo.toml"),
        format!(
            "[package]\nname = \"fetch-mlx-c\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nmlx-sys = {{ version = \"={MLX_C_CRATE_VERSION}\", default-features = false }}\n\n\
             [workspace]\n"
        ),
    )
    .unwrap();
    fs::write(probe.join("src/lib.rs"), "").unwrap();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(probe.join("Cargo.toml"))
        .output()
        .expect("running cargo metadata to download mlx-c");
    if !output.status.success() {
        panic!(
            "mlx-sys: could not download the mlx-c sources (crates.io mlx-sys {MLX_C_CRATE_VERSION}): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let json = String::from_utf8_lossy(&output.stdout);
    let needle = format!("{crate_dir}/Cargo.toml");
    let manifest_path = json
        .split("\"manifest_path\":\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|p| p.ends_with(&needle))
        .unwrap_or_else(|| panic!("mlx-sys: {needle} not in cargo metadata output"));
    Path::new(manifest_path).parent().unwrap().join("src/mlx-c")
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            fs::copy(entry.path(), &to).unwrap();
        }
    }
}

fn generate_bindings(mlx_c: &Path, csrc: &Path, native_half: bool, out: &Path) {
    let mut headers: Vec<PathBuf> = fs::read_dir(mlx_c.join("mlx/c"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "h"))
        .collect();
    headers.sort();
    let mut builder = bindgen::Builder::default()
        .rust_target("1.73.0".parse().expect("rust-version"))
        .clang_arg(format!("-I{}", mlx_c.display()))
        .blocklist_function("malloc")
        .blocklist_function("realloc");
    if !native_half {
        // mlx-rs reads `float16_t.0` (bindgen's __fp16 wrapper) and `bfloat16_t` as a bare u16.
        builder = builder
            .clang_args(["-DHAS_FLOAT16", "-DHAS_BFLOAT16", "-include"])
            .clang_arg(csrc.join("bindgen_half.h").to_str().unwrap())
            .blocklist_type("float16_t")
            .raw_line("#[repr(transparent)]")
            .raw_line("#[derive(Debug, Default, Copy, Clone, Hash, PartialEq, Eq)]")
            .raw_line("pub struct __BindgenFloat16(pub u16);")
            .raw_line("pub type float16_t = __BindgenFloat16;");
    }
    for h in &headers {
        builder = builder.header(h.to_string_lossy());
    }
    builder
        .generate()
        .expect("mlx-sys: generating bindings")
        .write_to_file(out.join("bindings.rs"))
        .expect("mlx-sys: writing bindings");
}
