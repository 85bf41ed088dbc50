"""Environment variables of the Metal platform.

Every accessor reads ``os.environ`` on each call, so a value changed before the engine starts is
seen. A malformed value raises a one-line ``ValueError`` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

VLLM_METAL_MEMORY_FRACTION = "VLLM_METAL_MEMORY_FRACTION"
VLLM_METAL_BLOCK_SIZE = "VLLM_METAL_BLOCK_SIZE"
VLLM_MLX_DEVICE = "VLLM_MLX_DEVICE"
VLLM_METAL_DEBUG = "VLLM_METAL_DEBUG"

# GPU backends (unified memory on Macs): half of the device. The CPU backend gets less (its KV
# cache lives in ordinary RAM beside everything else), but enough for the activation bound of
# vllm.LLM's default 8,192-token steps (the CPU's attention materializes its scores) beside a
# small model on a 24 GB machine.
DEFAULT_MEMORY_FRACTION = 0.5
DEFAULT_MEMORY_FRACTION_CPU = 0.3
DEFAULT_BLOCK_SIZE = 16

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _raw(name: str) -> str | None:
    # An empty value counts as unset, as a shell `VAR=` usually means "no preference".
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def memory_fraction() -> float:
    """Fraction of total device memory for weights + activations + KV cache."""
    raw = _raw(VLLM_METAL_MEMORY_FRACTION)
    if raw is None:
        return DEFAULT_MEMORY_FRACTION if mlx_device() == "gpu" else DEFAULT_MEMORY_FRACTION_CPU
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:  # also false for NaN
        raise ValueError(
            f"{VLLM_METAL_MEMORY_FRACTION} must be a number in (0, 1], got {raw!r}"
        )
    return value


def block_size() -> int:
    """KV cache block size in tokens, used when the user gives no --block-size."""
    raw = _raw(VLLM_METAL_BLOCK_SIZE)
    if raw is None:
        return DEFAULT_BLOCK_SIZE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{VLLM_METAL_BLOCK_SIZE} must be a positive integer, got {raw!r}")
    return value


def mlx_device() -> str:
    """"gpu" or "cpu": the MLX device the engine runs on. The engine decides; this passes it the
    variable's ask (none: the GPU whenever MLX has one)."""
    raw = _raw(VLLM_MLX_DEVICE)
    value = None if raw is None else raw.lower()
    if value not in (None, "gpu", "cpu"):
        raise ValueError(f"{VLLM_MLX_DEVICE} must be 'gpu' or 'cpu', got {raw!r}")
    from vllm_metal_rs import _core

    try:
        return _core.resolve_device(value)
    except _core.EngineError as e:
        raise ValueError(f"{VLLM_MLX_DEVICE}={raw}: {e}") from None


def debug() -> bool:
    """Whether the Rust engine emits debug-level log records."""
    raw = _raw(VLLM_METAL_DEBUG)
    if raw is None:
        return False
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{VLLM_METAL_DEBUG} must be a boolean (1/0, true/false), got {raw!r}")


environment_variables: dict[str, Callable[[], Any]] = {
    VLLM_METAL_MEMORY_FRACTION: memory_fraction,
    VLLM_METAL_BLOCK_SIZE: block_size,
    VLLM_MLX_DEVICE: mlx_device,
    VLLM_METAL_DEBUG: debug,
}


def validate_all() -> None:
    """Parse every variable once so a bad value fails at configuration time."""
    for getter in environment_variables.values():
        getter()


def register_with_vllm() -> None:
    """Make vLLM treat our variables as known.

    ``Platform.validate_environ`` warns about (or, with --fail-on-environ-validation, rejects)
    every ``VLLM_*`` variable missing from ``vllm.envs.environment_variables``; adding our
    getters there also lets ``vllm.envs.VLLM_METAL_*`` resolve like vLLM's own variables.
    """
    import vllm.envs as vllm_envs

    for name, getter in environment_variables.items():
        vllm_envs.environment_variables.setdefault(name, getter)

