"""Put an optimised BLAS ahead of the reference BLAS bundled with Linux MLX CPU wheels.

The `mlx-cpu` wheel links a reference BLAS (a 64x576x1536 float32 matmul: ~70 ms; OpenBLAS: <1 ms).
Loading OpenBLAS with RTLD_GLOBAL before libmlx is loaded makes MLX's `cblas_*` calls resolve to
it. `vllm_metal_rs._core.backend_info()["blas"]` reports where they resolved.
"""

from __future__ import annotations

import ctypes
import sys

_CANDIDATES = (
    "libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread (through ldconfig)
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so",
)

loaded: str | None = None


def preload() -> str | None:
    """Load OpenBLAS globally (Linux only; macOS MLX uses Accelerate). Returns what was loaded."""
    global loaded
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    for name in _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        break
    return loaded
