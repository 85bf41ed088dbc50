"""vLLM platform plugin that runs models on Apple's MLX through a Rust engine.

vLLM calls :func:`register` (entry point ``vllm.platform_plugins``: ``metal``) in every process it
starts, before it picks a platform.
"""

from __future__ import annotations

import logging

from vllm_metal_rs import _blas

# Before anything loads libmlx (mlx.core or our _core): see _blas.
_blas.preload()

__all__ = ["register"]

# Under the vllm namespace so records reach vLLM's handler and honour VLLM_LOGGING_LEVEL.
logger = logging.getLogger("vllm.vllm_metal_rs")

PLATFORM_CLS = "vllm_metal_rs.platform.MetalPlatform"


def register() -> str | None:
    """Return the platform class path when MLX is usable here, else None (plugin inactive).

    Runs in every vLLM process, so it stays cheap and never raises: an exception would only be
    logged at debug level by vLLM and hide the reason the platform is missing.
    """
    try:
        # Done even when MLX is missing: the user may have set our variables anyway, and vLLM
        # should not call them unknown.
        from vllm_metal_rs import envs

        envs.register_with_vllm()
    except Exception as e:  # a vLLM without environment_variables must not break detection
        logger.debug("could not register vllm-metal-rs environment variables: %s", e)

    try:
        import mlx.core  # noqa: F401
    except Exception as e:  # ImportError, or OSError when libmlx fails to load
        logger.warning("vllm-metal-rs platform inactive: cannot import mlx.core (%s)", e)
        return None
    return PLATFORM_CLS
