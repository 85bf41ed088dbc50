"""vLLM worker that hands every step to the Rust engine.

Python stays a thin shell: the engine core's scheduler output goes to the Rust runner once per
step, as is, and the runner does all per-request and per-token work.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    AsyncModelRunnerOutput,
    LogprobsLists,
    LogprobsTensors,
    ModelRunnerOutput,
)
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from vllm_metal_rs import envs
from vllm_metal_rs.scheduler import MetalModelRunnerOutput

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from vllm_metal_rs import _core as _core_types

logger = logging.getLogger("vllm.vllm_metal_rs.worker")

# The runner's KV cache dtype names, as torch dtypes for vLLM's KV cache spec.
_KV_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in _KV_DTYPES.items()}

# Only the layout name matters to vLLM here (the engine owns the cache memory); this one is
# [layer, block, token, head, dim], the layout the engine keeps.
_KV_CACHE_LAYOUT = "LBNHC"

_engine_logging_ready = False


def _layer_key(layer: int, linear: bool = False) -> str:
    """The name vLLM's KV-cache plan knows layer `layer` by."""
    return f"model.layers.{layer}.linear_attn" if linear else f"model.layers.{layer}.self_attn.attn"


def _config_json(path: str) -> str:
    """config.json of a checkpoint directory, or beside a GGUF file."""
    return os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")


def _core():
    try:
        from vllm_metal_rs import _core
    except ImportError as e:
        raise ImportError(
            f"vllm-metal-rs: the Rust engine module vllm_metal_rs._core cannot be imported ({e}); "
            "reinstall the vllm-metal-rs package"
        ) from e
    return _core


def __getattr__(name: str) -> Any:
    # MetalModelRunner is the Rust runner class itself; resolved lazily so this module imports
    # (and the worker class resolves) even where the extension is missing.
    if name == "MetalModelRunner":
        return _core().ModelRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _init_engine_logging() -> None:
    """Route the engine's log records to logging.getLogger("vllm.vllm_metal_rs.engine")."""
    global _engine_logging_ready
    if _engine_logging_ready:
        return
    debug = envs.debug()
    if debug:
        _enable_debug_output()
    _core().init_logging(debug)
    _engine_logging_ready = True


def _enable_debug_output() -> None:
    # vLLM's handler drops records below VLLM_LOGGING_LEVEL (INFO by default); when it would,
    # give our loggers a handler of their own with vLLM's formatter so debug records show.
    ours = logging.getLogger("vllm.vllm_metal_rs")
    ours.setLevel(logging.DEBUG)
    vllm_handlers = logging.getLogger("vllm").handlers
    if vllm_handlers and all(h.level <= logging.DEBUG for h in vllm_handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setLevel(logging.DEBUG)
    if vllm_handlers:
        handler.setFormatter(vllm_handlers[0].formatter)
    ours.addHandler(handler)
    ours.propagate = False


def _resolve_model_path(model: str, revision: str | None, download_dir: str | None) -> str:
    """A local directory or file for the engine; a hub id is fetched (or found in the cache)."""
    if os.path.exists(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=model,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=["*.json", "*.safetensors", "*.gguf"],
        )
    except Exception as e:
        raise ValueError(
            f"vllm-metal-rs: model {model!r} is not a local path and could not be fetched ({e})"
        ) from e


class _WeightsProgress:
    """vLLM's loading progress bar (its format) over the engine's progress in bytes; off when
    vLLM's use_tqdm_on_load is."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None

    def __enter__(self) -> _WeightsProgress | None:
        return self if self._enabled else None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm
            from vllm.model_executor.model_loader.weight_utils import _BAR_FORMAT

            self._bar = tqdm(
                total=max(1, round(total / 2**20)),
                desc="Loading weights (MiB)",
                bar_format=_BAR_FORMAT,
            )
        self._bar.update(round(done / 2**20) - self._bar.n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


class MetalWorker(WorkerBase):
    """One worker per engine; the Rust runner holds the weights and the KV cache."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        local_rank: int,
        rank: int,
        distributed_init_method: str,
        is_driver_worker: bool = False,
    ) -> None:
        super().__init__(
            vllm_config=vllm_config,
            local_rank=local_rank,
            rank=rank,
            distributed_init_method=distributed_init_method,
            is_driver_worker=is_driver_worker,
        )
        self.model_runner: _core_types.ModelRunner | None = None
        self.mlx_device: str | None = None
        # Async scheduling: sample_tokens submits and returns; vLLM schedules and submits the
        # next step (which reads these tokens on the device) before it collects them.
        self._async = bool(vllm_config.scheduler_config.async_scheduling)

    # --- lifecycle, in the order the engine calls it ------------------------------------------

    def init_device(self) -> None:
        from vllm.utils.torch_utils import set_random_seed

        self.mlx_device = envs.mlx_device()
        # vLLM builds host tensors against this; MLX memory is managed by the engine.
        self.device = torch.device("cpu")
        _init_engine_logging()
        set_random_seed(self.model_config.seed)
        info = _core().backend_info()
        logger.info(
            "vllm-metal-rs: MLX backend %s (blas %s), engine device %s",
            info.get("backend"),
            info.get("blas"),
            self.mlx_device,
        )

    def _checkpoint(self, load_dummy_weights: bool) -> tuple[str, str]:
        """The model's local path and the engine's name of vLLM's dtype."""
        if load_dummy_weights:
            raise ValueError("vllm-metal-rs: dummy weights are not supported")
        mc = self.model_config
        path = _resolve_model_path(mc.model, mc.revision, self.load_config.download_dir)
        dtype = _DTYPE_NAMES.get(mc.dtype)
        if dtype is None:
            raise ValueError(f"vllm-metal-rs: dtype {mc.dtype} is not supported")
        return path, dtype

    def _state_block_sizes(self, path: str, dtype: str, ssm_dtype: str | None) -> None:
        """A hybrid model's linear-attention state lives in one KV block: the engine says how
        large a block must be for it (vLLM's CUDA path raises the block size the same way); with
        prefix caching, states are kept per block ("align" mode)."""
        cc = self.cache_config
        need = _core().required_block_size(_config_json(path), dtype, cc.block_size, ssm_dtype)
        if need != cc.block_size:
            logger.info(
                "vllm-metal-rs: KV block size %d tokens, so that a block holds a linear-attention "
                "state (was %d)",
                need,
                cc.block_size,
            )
            cc.block_size = need
        if cc.mamba_cache_mode == "align":
            cc.mamba_block_size = cc.block_size

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        mc = self.model_config
        path, dtype = self._checkpoint(load_dummy_weights)
        cc = self.cache_config
        # The platform accepted these (check_and_update_config): vLLM's choice for the ssm state.
        ssm = cc.mamba_ssm_cache_dtype
        ssm_dtype = None if ssm == "auto" else str(ssm)
        if mc.runner_type != "pooling":
            self._state_block_sizes(path, dtype, ssm_dtype)
        with _WeightsProgress(self.load_config.use_tqdm_on_load) as progress:
            self.model_runner = _core().ModelRunner(
                path,
                block_size=cc.block_size,
                device=self.mlx_device,
                dtype=dtype,
                ssm_dtype=ssm_dtype,
                progress=progress,
            )
        r = self.model_runner
        # Draws of requests without their own seed follow the engine seed, as on other platforms.
        r.set_seed(mc.seed or 0)
        r.set_logprobs_mode(str(mc.logprobs_mode))
        if mc.runner_type == "pooling":
            from vllm_metal_rs.pooling import configure_decoder_pooling

            configure_decoder_pooling(r, mc)
        logger.info(
            "vllm-metal-rs: loaded %s: %d layers, %d KV heads x %d, %s, weights %.2f GiB",
            path,
            r.num_layers,
            r.num_kv_heads,
            r.head_dim,
            r.kv_cache_dtype,
            r.weights_nbytes / 2**30,
        )

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        r = self._runner()
        try:
            dtype = _KV_DTYPES[r.kv_cache_dtype]
        except KeyError:
            raise ValueError(
                f"vllm-metal-rs: engine reported unknown KV cache dtype {r.kv_cache_dtype!r}"
            ) from None
        # One spec per layer that keeps K/V (Gemma 4's KV-shared layers read another's), in its
        # own shape. Sliding-window layers get vLLM's sliding-window spec, so that the block
        # manager frees blocks that left the window. A model mixing both kinds (Gemma) gets one
        # KV-cache group per kind from vLLM's hybrid manager, each with its own block tables (and,
        # when the kinds' rows differ in size, its own block size: one page size for all).
        specs: list[KVCacheSpec] = []
        for kv_heads, head_size, window in r.kv_layers:
            shape = dict(
                block_size=self.cache_config.block_size,
                num_kv_heads=kv_heads,
                head_size=head_size,
                dtype=dtype,
            )
            specs.append(
                SlidingWindowSpec(**shape, sliding_window=window)
                if window
                else FullAttentionSpec(**shape)
            )
        linear = set(r.linear_attention_layers)
        if linear:
            # Linear-attention layers keep a state per request (vLLM's Mamba-style spec, placed
            # by its hybrid manager), padded to the K/V page of one block.
            (conv, ssm, ssm_dtype) = r.state_geometry
            state = MambaSpec(
                shapes=(conv, ssm),
                dtypes=(dtype, _KV_DTYPES[ssm_dtype]),
                block_size=self.cache_config.mamba_block_size or self.model_config.max_model_len,
                page_size_padded=specs[min(linear)].page_size_bytes,
                mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
                mamba_cache_mode=self.cache_config.mamba_cache_mode,
            )
            specs = [state if i in linear else s for i, s in enumerate(specs)]
        # vLLM sizes the pool with the spec and the engine allocates with its own geometry: they
        # must agree, or blocks would overrun (or waste) the memory vLLM planned.
        spec_bytes = sum(s.page_size_bytes for s in specs)
        if spec_bytes != r.kv_bytes_per_block():
            raise RuntimeError(
                f"vllm-metal-rs: KV bytes per block differ: vLLM's spec {spec_bytes}, the engine "
                f"{r.kv_bytes_per_block()}"
            )
        return {_layer_key(i, i in linear): s for i, s in enumerate(specs)}

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # The base asks torch attention backends, of which this platform has none.
        return [_KV_CACHE_LAYOUT]

    def determine_available_memory(self) -> int:
        """Bytes vLLM may give to the KV cache: kv_cache_memory_bytes when set, else the engine's
        budget for this configuration."""
        user_bytes = self.cache_config.kv_cache_memory_bytes
        if user_bytes is not None:
            logger.info(
                "vllm-metal-rs: KV cache %.2f GiB (kv_cache_memory_bytes)", user_bytes / 2**30
            )
            return int(user_bytes)
        # With max_model_len=-1 (auto-fit) vLLM shrinks the length to the cache itself.
        auto_fit = getattr(self.model_config, "original_max_model_len", None) == -1
        return self._runner().kv_cache_budget(
            envs.memory_fraction(),
            self.scheduler_config.max_num_batched_tokens,
            None if auto_fit else self.model_config.max_model_len,
        )

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        r = self._runner()
        num_kv_layers = len(r.kv_layers)
        linear = set(r.linear_attention_layers)
        index = {_layer_key(i, i in linear): i for i in range(num_kv_layers)}
        # Each layer's KV-cache group (whose block tables it uses) and storage: vLLM overlays the
        # groups' tensors from byte 0, so layers at the same byte offset share memory (one layer
        # of each group; a block id belongs to one group at a time).
        layer_group: list[int | None] = [None] * num_kv_layers
        group_block_size = []
        for g, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            # A state group's pages are the K/V pages of one attention block (padded to them).
            is_state = isinstance(spec, MambaSpec)
            group_block_size.append(self.cache_config.block_size if is_state else spec.block_size)
            for name in group.layer_names:
                layer_group[index[name]] = g
        starts: list[int | None] = [None] * num_kv_layers
        for tensor in kv_cache_config.kv_cache_tensors:
            for pos, name in enumerate(tensor.layers):
                starts[index[name]] = tensor.offset + pos * tensor.layer_stride
        if None in layer_group or None in starts:
            raise ValueError("vllm-metal-rs: vLLM's KV-cache plan does not place every layer")
        storage_of = {s: i for i, s in enumerate(sorted(set(starts)))}
        num_blocks = kv_cache_config.num_blocks
        self.cache_config.num_gpu_blocks = num_blocks
        r.allocate_kv_cache(
            num_blocks,
            layer_group,
            [storage_of[s] for s in starts],
            group_block_size,
            self.cache_config.mamba_block_size if linear else None,
        )

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # Nothing is compiled ahead of time, but MLX does first-use work (the CPU backend builds
        # its fused kernels) that the first request would otherwise pay: a few tokens run now.
        r = self._runner()
        if r.pooling_task is None:
            r.warm_up()
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def get_supported_tasks(self) -> tuple[str, ...]:
        return (self._runner().pooling_task or "generate",)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        r = self._runner()
        if r.pooling_task is not None:
            # A pooling model's step ends here: vectors instead of tokens.
            return _model_runner_output(r.pool_model(scheduler_output))
        # The forward is submitted here and runs while the engine core computes the grammar
        # bitmask; the tokens come from sample_tokens (vLLM calls it when this returns None).
        if not r.execute_model(scheduler_output):
            # Nothing ran; finished requests have left the engine's state.
            return EMPTY_MODEL_RUNNER_OUTPUT
        return None

    def sample_tokens(
        self, grammar_output: GrammarOutput | None
    ) -> ModelRunnerOutput | AsyncModelRunnerOutput:
        grammar = None
        if grammar_output is not None and grammar_output.structured_output_request_ids:
            grammar = (
                list(grammar_output.structured_output_request_ids),
                grammar_output.grammar_bitmask,
            )
        if self._async:
            return _SubmittedStep(self._runner(), self._runner().submit_tokens(grammar))
        return _model_runner_output(self._runner().sample_tokens(grammar))

    def step_profile(self) -> list[dict]:
        """The engine's host timings of the steps since the last call (`llm.collective_rpc`)."""
        return self._runner().take_step_profile()

    def inject_fault(self, stage: str) -> None:
        """Make the next step fail once at `stage`: "forward", "sample" or "device" (tests of
        fault isolation, through `llm.collective_rpc`)."""
        self._runner().inject_fault(stage)

    def get_model_inspection(self) -> str:
        # repr(vllm.LLM) asks for this; the base inspects a torch module, which this has none of.
        r = self._runner()
        return (
            f"{self.model_config.architecture} on the vllm-metal-rs engine ({r.num_layers} layers,"
            f" {r.num_kv_heads} KV heads x {r.head_dim}, {r.kv_cache_dtype}, MLX {r.device})"
        )

    def shutdown(self) -> None:
        # Dropping the runner frees the weights and the KV cache.
        self.model_runner = None

    # --- the rest of WorkerBase ---------------------------------------------------------------

    def check_health(self) -> None:
        return None

    def synchronize_device(self) -> None:
        # The engine finishes its MLX work inside execute_model; the base would sync a CUDA
        # device that this platform never uses.
        return None

    def get_model(self) -> Any:
        raise NotImplementedError("vllm-metal-rs: the model lives in the Rust engine, not torch")

    def get_cache_block_size_bytes(self) -> int:
        return int(self._runner().kv_bytes_per_block())

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len

    def take_draft_token_ids(self) -> None:
        return None

    def execute_dummy_batch(self) -> None:
        # Only data parallelism asks for dummy batches, and the platform rejects it.
        return None

    def reset_mm_cache(self) -> None:
        return None

    def reset_encoder_cache(self) -> None:
        return None

    def add_lora(self, lora_request: Any) -> bool:
        raise NotImplementedError("vllm-metal-rs: LoRA is not supported")

    def remove_lora(self, lora_id: int) -> bool:
        raise NotImplementedError("vllm-metal-rs: LoRA is not supported")

    def pin_lora(self, lora_id: int) -> bool:
        raise NotImplementedError("vllm-metal-rs: LoRA is not supported")

    def list_loras(self) -> set[int]:
        raise NotImplementedError("vllm-metal-rs: LoRA is not supported")

    def profile(self, is_start: bool = True, profile_prefix: str | None = None, **kwargs) -> None:
        raise NotImplementedError("vllm-metal-rs: the torch profiler is not supported")

    def _runner(self) -> _core_types.ModelRunner:
        if self.model_runner is None:
            raise RuntimeError("vllm-metal-rs: the model is not loaded")
        return self.model_runner


def _model_runner_output(step: _core_types.StepOutput) -> ModelRunnerOutput:
    """The engine's step output as vLLM's (with the requests that failed, for our scheduler)."""
    req_ids, logprobs = step.req_ids, step.logprobs  # each read builds a new Python object
    return MetalModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={req_id: i for i, req_id in enumerate(req_ids)},
        sampled_token_ids=step.sampled_token_ids,
        logprobs=None if logprobs is None else LogprobsLists(*logprobs),
        prompt_logprobs_dict={
            req_id: LogprobsTensors(*(torch.from_numpy(a) for a in arrays))
            for req_id, arrays in step.prompt_logprobs.items()
        },
        pooler_output=[None if v is None else torch.from_numpy(v) for v in step.pooled] or None,
        failed_requests=step.failed,
    )


class _SubmittedStep(AsyncModelRunnerOutput):
    """A step whose tokens are on their way; vLLM collects steps in the order it submitted them,
    and the engine checks that it does."""

    def __init__(self, runner: _core_types.ModelRunner, step_id: int) -> None:
        self._runner = runner
        self._step_id = step_id

    def get_output(self) -> ModelRunnerOutput:
        return _model_runner_output(self._runner.collect(self._step_id))
