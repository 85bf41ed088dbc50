"""The vLLM platform whose model execution is the Rust engine on MLX."""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_metal_rs import envs

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.vllm_metal_rs.platform")

WORKER_CLS = "vllm_metal_rs.worker.MetalWorker"
_V2_RUNNER_VAR = "VLLM_USE_V2_MODEL_RUNNER"

# Order matters: vLLM maps a float32 checkpoint under dtype="auto" to the first entry, and we
# want such a checkpoint to stay float32. bf16/f16 checkpoints keep their own dtype.
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Known to vLLM as soon as this module loads, even if the entry point was bypassed.
envs.register_with_vllm()


def _v2_runner_requested() -> bool:
    raw = os.environ.get(_V2_RUNNER_VAR)
    try:
        return raw is not None and int(raw) != 0
    except ValueError:
        return False


class _Unsupported(ValueError):
    """A configuration this platform cannot honour; the message is one line."""


class _UnsupportedRequest(VLLMValidationError, ValueError):
    """A request this platform cannot honour: HTTP 400 from the server, ValueError offline."""


def _reject(condition: bool, message: str) -> None:
    if condition:
        raise _Unsupported(f"vllm-metal-rs: {message}")


def _spawn_if_mlx_ran() -> None:
    """Start vLLM's engine process with spawn when this process has already run MLX work.

    MLX runs work on threads it starts on first use; a forked child inherits their locks but not
    the threads, and its first evaluation waits forever. Fork stays the default otherwise (it
    starts faster), as vLLM itself does for CUDA.
    """
    method_var = "VLLM_WORKER_MULTIPROC_METHOD"
    if os.environ.get(method_var):
        return
    import mlx.core as mx

    if mx.get_peak_memory() > 0:
        logger.info(
            "vllm-metal-rs: MLX already ran in this process; starting the engine with spawn "
            "(a forked engine would deadlock in MLX)"
        )
        os.environ[method_var] = "spawn"


class MetalPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "metal"
    # Tensors crossing the vLLM boundary are host tensors; the engine owns device memory.
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    ray_device_key: str = ""
    dist_backend: str = "gloo"
    additional_env_vars: list[str] = list(envs.environment_variables)

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return list(_SUPPORTED_DTYPES)

    # --- kernels and attention: the Rust engine does all of it -------------------------------

    @classmethod
    def import_kernels(cls) -> None:
        # The default imports vllm._C, a CUDA/CPU extension we never call.
        return None

    @classmethod
    def import_ir_kernels(cls) -> None:
        # The default imports vllm.kernels (triton, aiter, ...); vLLM's "native" IR ops suffice
        # because no torch model runs on this platform.
        return None

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        # Only torch attention layers ask for this, and this platform builds none.
        raise NotImplementedError(
            "vllm-metal-rs: attention runs inside the Rust engine; there is no torch attention "
            "backend on the metal platform"
        )

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: VllmConfig) -> None:
        # The default asks torch attention backends; check_and_update_config already chose.
        return None

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        # The engine keeps one block table per KV-cache group (Gemma's local and global layers).
        return True

    # --- device ------------------------------------------------------------------------------

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        try:
            import mlx.core as mx

            dev = mx.gpu if envs.mlx_device() == "gpu" else mx.cpu
            name = mx.device_info(dev).get("device_name")
            return f"MLX {name}" if name else "MLX"
        except Exception:
            return "MLX"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        from vllm_metal_rs import _core

        return _core.device_total_memory(envs.mlx_device())

    @classmethod
    def get_current_memory_usage(cls, device: Any = None) -> float:
        import mlx.core as mx

        return float(mx.get_active_memory())

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def inference_mode(cls):
        # no_grad works both as a context manager and a decorator; torch barely runs here.
        return torch.no_grad()

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        # MLX picks its device once, when the engine is built.
        return None

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        # The engine draws from its own keys, seeded at load (ModelRunner.set_seed) and per
        # request; no global generator here affects a token.
        return None

    @classmethod
    def check_if_supports_dtype(cls, dtype: torch.dtype) -> None:
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"vllm-metal-rs: dtype {dtype} is not supported; use float32, bfloat16 or float16"
            )

    # --- configuration -----------------------------------------------------------------------

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        # Bad VLLM_METAL_* values fail here, in the front-end process, before anything starts.
        envs.validate_all()

        cls._reject_unsupported(vllm_config)

        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = WORKER_CLS
            mc = vllm_config.model_config
            if mc is not None and mc.runner_type == "pooling" and _architecture(mc) in _encoders():
                from vllm_metal_rs.pooling import ENCODER_WORKER_CLS

                parallel_config.worker_cls = ENCODER_WORKER_CLS

        # vLLM's scheduler, taught to finish the requests a step could not serve (the engine
        # forgets them and goes on; see scheduler.py).
        from vllm_metal_rs.scheduler import ASYNC_SCHEDULER_CLS, SCHEDULER_CLS

        sched = vllm_config.scheduler_config
        ours = ASYNC_SCHEDULER_CLS if sched.async_scheduling else SCHEDULER_CLS
        _reject(
            sched.scheduler_cls not in (None, SCHEDULER_CLS, ASYNC_SCHEDULER_CLS),
            f"scheduler_cls={sched.scheduler_cls!r} is not supported; the platform uses {ours}, "
            "which finishes requests the engine could not serve",
        )
        sched.scheduler_cls = ours

        cache_config = vllm_config.cache_config
        if cache_config is not None and not cache_config.user_specified_block_size:
            cache_config.block_size = envs.block_size()

        # The Rust engine executes eagerly; torch.compile and CUDA graphs have nothing to act on.
        from vllm.config import CompilationMode, CUDAGraphMode

        compilation_config = vllm_config.compilation_config
        compilation_config.mode = CompilationMode.NONE
        compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        compilation_config.cudagraph_capture_sizes = []
        compilation_config.max_cudagraph_capture_size = 0

        if vllm_config.model_config is not None:
            vllm_config.model_config.enforce_eager = True

        # Async scheduling (vLLM's default) is supported: the runner keeps each step's sampled
        # tokens on the device for the next step, which is built and submitted while the current
        # one runs; `--no-async-scheduling` returns every step's tokens before the next is built.

        _spawn_if_mlx_ran()

        # The scheduler shapes its output for the "V1" or "V2" model runner (resumed requests as
        # cached requests vs. as new requests with prefill_token_ids), and picks V2 wherever
        # Triton is usable. The engine reads the V1 shape; vLLM offers no config field for this,
        # only the variable, which the engine-core process inherits from this one.
        os.environ[_V2_RUNNER_VAR] = "0"
        # Some features (watermarking, HiSparse) force V2 regardless of the variable.
        _reject(
            bool(getattr(vllm_config, "use_v2_model_runner", False)),
            "this configuration needs vLLM's V2 model runner, which the engine does not serve",
        )

    @classmethod
    def _reject_unsupported(cls, vllm_config: VllmConfig) -> None:
        pc = vllm_config.parallel_config
        one_process = "the metal platform runs the model in one process"
        _reject(
            pc.tensor_parallel_size > 1,
            f"tensor_parallel_size={pc.tensor_parallel_size} is not supported ({one_process}); "
            "use tensor_parallel_size=1",
        )
        _reject(
            pc.pipeline_parallel_size > 1,
            f"pipeline_parallel_size={pc.pipeline_parallel_size} is not supported "
            f"({one_process}); use pipeline_parallel_size=1",
        )
        _reject(
            pc.data_parallel_size > 1,
            f"data_parallel_size={pc.data_parallel_size} is not supported ({one_process}); "
            "use data_parallel_size=1",
        )
        _reject(
            getattr(pc, "decode_context_parallel_size", 1) > 1
            or getattr(pc, "prefill_context_parallel_size", 1) > 1,
            "context parallelism is not supported",
        )
        _reject(
            _v2_runner_requested(),
            f"{_V2_RUNNER_VAR}=1 is not supported; the engine reads the V1 scheduler output",
        )
        _reject(vllm_config.lora_config is not None, "LoRA is not supported")
        _reject(
            vllm_config.speculative_config is not None, "speculative decoding is not supported"
        )
        _reject(
            getattr(vllm_config, "kv_transfer_config", None) is not None,
            "KV cache transfer (kv_transfer_config) is not supported",
        )

        cache_config = vllm_config.cache_config
        if cache_config is not None:
            _reject(
                cache_config.cache_dtype != "auto",
                f"kv_cache_dtype={cache_config.cache_dtype!r} is not supported; the KV cache "
                "uses the model dtype (kv_cache_dtype='auto')",
            )
            # Linear-attention states: the conv window in the model dtype, the ssm state in a
            # float dtype.
            _reject(
                cache_config.mamba_cache_dtype != "auto",
                f"mamba_cache_dtype={cache_config.mamba_cache_dtype!r} is not supported; the "
                "linear-attention states use the model dtype (mamba_cache_dtype='auto')",
            )
            ssm = cache_config.mamba_ssm_cache_dtype
            _reject(
                ssm not in ("auto", "float32", "float16", "bfloat16"),
                f"mamba_ssm_cache_dtype={ssm!r} is not supported; supported are auto, float32, "
                "float16, bfloat16",
            )

        mc = vllm_config.model_config
        if mc is None:
            return
        if mc.runner_type == "pooling":
            _check_pooling(vllm_config)
        mm = mc.multimodal_config
        if mm is not None and not getattr(mm, "language_model_only", False) and _architecture(mc) in _decoders():
            # The engine runs the text stack of this multimodal checkpoint (Qwen3.5, Gemma 4,
            # Qwen2-VL, whose images run in the engine alone so far); vLLM then refuses image,
            # video and audio inputs itself.
            logger.info(
                "vllm-metal-rs: %s runs its text stack here; image, video and audio inputs are refused",
                _architecture(mc),
            )
            mm.language_model_only = True
        _reject(
            mm is not None and not getattr(mm, "language_model_only", False),
            f"multimodal model {_architecture(mc)} is not supported; the engine runs the text "
            "stack of the multimodal architectures it lists (Qwen3.5, Gemma 4, Qwen2-VL)",
        )
        # gpt-oss as published: MXFP4 experts, which the engine reads itself.
        openai_mxfp4 = mc.quantization in ("mxfp4", "gpt_oss_mxfp4") and _architecture(mc) == "GptOssForCausalLM"
        _reject(
            mc.quantization is not None and not openai_mxfp4,
            f"quantization={mc.quantization!r} is not supported; the engine reads the "
            "checkpoint's own weights (safetensors or GGUF) and no vLLM quantization method",
        )
        _reject(getattr(mc, "enable_prompt_embeds", False), "prompt embeddings are not supported")
        window = getattr(getattr(mc, "hf_text_config", None), "sliding_window", None)
        _reject(
            bool(getattr(mc, "disable_sliding_window", False)) and bool(window),
            "disable_sliding_window is not supported; the engine applies the model's "
            f"sliding window ({window} tokens) from config.json",
        )
        _reject(
            bool(getattr(mc, "logits_processors", None)),
            "custom logits_processors are not supported; the engine samples in Rust",
        )
        cls.check_if_supports_dtype(mc.dtype)

    @classmethod
    def validate_request(cls, processed_inputs: Any, params: Any) -> None:
        # Fields the engine does not compute; they would otherwise be silently ignored.
        for field, what in (
            ("logprob_token_ids", "logprob_token_ids are"),
            ("prompt_logprob_token_ids", "prompt_logprob_token_ids are"),
            ("thinking_token_budget", "thinking_token_budget is"),
        ):
            if getattr(params, field, None) is not None:
                raise _UnsupportedRequest(f"vllm-metal-rs: {what} not supported", parameter=field)
        # vLLM lets a float or an int beyond 64 bits through some integer fields offline; the
        # engine-core process would then fail to decode the request and stop reading requests.
        for name in _INT_FIELDS:
            value = getattr(params, name, None)
            if value is not None and not (
                isinstance(value, numbers.Integral) and -(2**63) <= value < 2**63
            ):
                raise _UnsupportedRequest(
                    f"vllm-metal-rs: {name} must be an integer in [-2**63, 2**63), got {value!r}",
                    parameter=name,
                )
        # vLLM compares ids with the vocabulary's bounds, which NaN passes, and does not look at
        # bias values; the engine needs integer ids and finite biases.
        prompt = processed_inputs.get("prompt_token_ids") if isinstance(processed_inputs, dict) else None
        _check_token_ids(prompt, "prompt_token_ids")
        _check_token_ids(getattr(params, "allowed_token_ids", None), "allowed_token_ids")
        _check_token_ids(getattr(params, "stop_token_ids", None), "stop_token_ids")
        bias = getattr(params, "logit_bias", None) or {}
        _check_token_ids(bias.keys(), "logit_bias")
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in bias.values()):
            raise _UnsupportedRequest(
                "vllm-metal-rs: logit_bias values must be finite numbers", parameter="logit_bias"
            )
        _check_grammar(getattr(params, "structured_outputs", None))


def _check_grammar(structured: Any) -> None:
    """A grammar the engine core's grammar compiler (xgrammar, which vLLM's "auto" backend ends
    up compiling with) cannot parse is a bad request. vLLM's own check can let such a grammar
    through to the engine core, where it fails the request with HTTP 500."""
    grammar = getattr(structured, "grammar", None)
    if not grammar:
        return
    import xgrammar as xgr
    from vllm.v1.structured_output.utils import grammar_is_likely_lark

    try:
        if grammar_is_likely_lark(grammar):
            xgr.Grammar.from_lark(grammar)
        else:
            xgr.Grammar.from_ebnf(grammar)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _UnsupportedRequest(
            f"vllm-metal-rs: structured_outputs.grammar is not a valid grammar: {reason}",
            parameter="structured_outputs",
        ) from None


def _architecture(mc: Any) -> str:
    archs = list(getattr(getattr(mc, "hf_config", None), "architectures", None) or [])
    return archs[0] if archs else "?"


def _decoders() -> list[str]:
    from vllm_metal_rs import _core

    return _core.decoder_architectures()


def _encoders() -> list[str]:
    from vllm_metal_rs import _core

    return _core.encoder_architectures()


def _check_pooling(vllm_config: VllmConfig) -> None:
    """Pooling runs the engine's encoder families, and its decoder families as embedders (and
    as rerankers vLLM converts with from_2_way_softmax)."""
    from vllm_metal_rs import _core

    mc = vllm_config.model_config
    arch = _architecture(mc)
    encoders = _encoders()
    decoders = _core.decoder_architectures()
    is_encoder = arch in encoders
    base = arch.replace("ForSequenceClassification", "ForCausalLM")
    _reject(
        not is_encoder and arch not in decoders and base not in decoders,
        f"pooling is not supported for {arch}; the engine pools encoder models"
        f" ({', '.join(encoders)}) and its decoder families",
    )
    pooler = mc.pooler_config
    task = getattr(pooler, "task", None)
    _reject(
        task not in (None, "embed", "classify"),
        f"pooling task {task!r} is not supported; the engine serves 'embed' (embedding models)"
        " and 'classify' (classifiers, cross-encoders, rerankers)",
    )
    kind = getattr(pooler, "seq_pooling_type", None)
    _reject(
        kind not in ("MEAN", "CLS", "LAST"),
        f"pooling type {kind!r} is not supported; supported are MEAN, CLS, LAST",
    )
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    prefix_caching = cache is not None and bool(cache.enable_prefix_caching)
    # Encoders keep no KV cache and run prompts whole; a decoder pooling the mean or the first
    # token needs the whole prompt in one step too. vLLM turns these off unless forced on.
    whole = "encoder models" if is_encoder else f"{kind} pooling"
    if is_encoder or kind != "LAST":
        _reject(
            bool(sched.enable_chunked_prefill),
            f"chunked prefill is not supported for {whole}: their prompts run whole",
        )
        _reject(prefix_caching, f"prefix caching is not supported for {whole}")
    _reject(bool(sched.async_scheduling), "async scheduling is not supported for pooling models")


# SamplingParams' integer fields, as the engine-core request carries them.
_INT_FIELDS = (
    "n",
    "seed",
    "top_k",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "truncate_prompt_tokens",
)


def _check_token_ids(ids: Any, field: str) -> None:
    if ids is not None and not all(isinstance(t, numbers.Integral) for t in ids):
        raise _UnsupportedRequest(f"vllm-metal-rs: {field} must be integers", parameter=field)

