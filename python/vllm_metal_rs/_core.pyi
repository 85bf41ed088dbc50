"""Types of `vllm_metal_rs._core`, the engine's PyO3 module (rust/python/src)."""

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

class EngineError(RuntimeError):
    """An error of the engine; the message is one line (the error and its causes)."""

# (token_ids [rows, cols] int32, logprobs [rows, cols] float32, ranks [rows] int32): per row the
# target token first (sampled or next prompt token), then the top cols - 1.
LogprobsArrays = tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int32]]

class BackendInfo(TypedDict):
    backend: str
    device: Literal["cpu", "gpu"]
    blas_fast: bool
    blas: str
    memory_size: int

class StepTimingDict(TypedDict):
    num_tokens: int
    num_seqs: int
    build: float
    submit: float
    sample_build: float
    wait: float
    device_tokens: int

class StepOutput:
    """One step's output, as vLLM's ModelRunnerOutput needs it."""

    @property
    def step_id(self) -> int | None: ...
    @property
    def req_ids(self) -> list[str]: ...
    @property
    def sampled_token_ids(self) -> list[list[int]]:
        """Per request: its sampled token, or none when its chunk did not reach its end."""
    @property
    def logprobs(self) -> LogprobsArrays | None:
        """One row per request of req_ids, when a request of the step asked for logprobs."""
    @property
    def prompt_logprobs(self) -> dict[str, LogprobsArrays]:
        """The whole prompt's logprobs of the requests whose prefill ended with this step."""
    @property
    def failed(self) -> dict[str, str]:
        """Requests the step could not serve, with the reason (the engine has forgotten them)."""
    @property
    def pooled(self) -> list[npt.NDArray[np.float32] | None]:
        """Pooling models: per request, its vector (or scores) when its prompt ended."""

class RequestImages:
    """A request's images prepared by `ModelRunner.prepare_images`: the vision tower's rows and
    the prompt's M-RoPE positions."""

    @property
    def num_placeholders(self) -> int: ...

class ModelRunner:
    """Weights, the paged KV cache, the request table and the step."""

    def __init__(
        self,
        model_path: str,
        *,
        block_size: int = 16,
        device: Literal["cpu", "gpu"] | None = None,
        dtype: str | None = None,
        gather_attention: bool = False,
        ssm_dtype: Literal["float32", "float16", "bfloat16"] | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> None:
        """progress(done, total): bytes of weights materialized so far, as loading goes."""
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def kv_cache_dtype(self) -> Literal["float32", "float16", "bfloat16"]: ...
    @property
    def weights_nbytes(self) -> int: ...
    @property
    def kv_layers(self) -> list[tuple[int, int, int | None]]:
        """Per layer that keeps K/V (fewer than num_layers when layers share another's: Gemma 4),
        its (KV heads, head size, sliding window in tokens or None for full attention)."""
    @property
    def linear_attention_layers(self) -> list[int]:
        """The layers that keep a recurrent state instead of K/V (linear attention)."""
    @property
    def state_geometry(
        self,
    ) -> tuple[tuple[int, int], tuple[int, int, int], Literal["float32", "float16", "bfloat16"]] | None:
        """(conv state shape, ssm state shape, ssm dtype) of the linear-attention layers; the
        conv state has the KV cache dtype. None without such layers."""
    @property
    def max_position_embeddings(self) -> int | None: ...
    @property
    def device(self) -> Literal["cpu", "gpu"]: ...
    @property
    def num_blocks(self) -> int: ...
    def kv_bytes_per_block(self) -> int: ...
    def set_seed(self, seed: int) -> None: ...
    def profile_peak_memory(self, num_tokens: int) -> int:
        """Bytes a forward of num_tokens allocates beyond the weights, measured on it."""
    def activation_peak(self, num_tokens: int) -> int:
        """The KV budget's upper bound of profile_peak_memory(num_tokens), from a forward of a
        few tokens and one layer's attention."""
    def kv_cache_budget(
        self,
        memory_fraction: float,
        max_num_batched_tokens: int,
        max_model_len: int | None = None,
    ) -> int:
        """Bytes vLLM may give to the KV cache; EngineError when one max_model_len sequence
        would not fit (max_model_len None: vLLM fits the length to the cache)."""
    def allocate_kv_cache(
        self,
        num_blocks: int,
        layer_group: Sequence[int] | None = None,
        layer_storage: Sequence[int] | None = None,
        group_block_size: Sequence[int] | None = None,
        state_block_size: int | None = None,
    ) -> None:
        """vLLM's plan (each KV layer's group and storage, each group's block size), or one
        group and one storage per KV layer; `state_block_size`: tokens per linear-attention
        state block (vLLM's mamba_block_size; None: one state block per request)."""
    def warm_up(self) -> None:
        """A few tokens through prefill, decode and sampling on the allocated cache, so that the
        first request does not pay MLX's first-use work; leaves no request, draw or timing."""
    def take_step_profile(self) -> list[StepTimingDict]: ...
    def inject_fault(self, stage: Literal["forward", "sample", "device"]) -> None: ...
    def set_logprobs_mode(self, mode: str) -> None: ...
    def execute_model(self, scheduler_output: Any) -> bool:
        """vLLM's SchedulerOutput in; False when the step schedules nothing."""
    def sample_tokens(
        self, grammar: tuple[list[str], npt.NDArray[np.int32]] | None = None
    ) -> StepOutput: ...
    def set_pooling(
        self,
        pooling: Literal["MEAN", "CLS", "LAST"],
        *,
        classifier_tokens: Sequence[int] | None = None,
        two_way: bool = False,
        activation: Literal["identity", "sigmoid", "softmax"] = "identity",
        logit_mean: float = 0.0,
        logit_sigma: float = 1.0,
    ) -> None:
        """Make this runner a pooling model's: embeddings, or scores from the logits of
        classifier_tokens (two_way: [negative, positive], one label)."""
    @property
    def pooling_task(self) -> Literal["embed", "classify"] | None:
        """The pooling task this runner serves; None for generation."""
    def pool_model(self, scheduler_output: Any) -> StepOutput:
        """A pooling model's whole step: vectors of the requests whose prompt ends in it."""
    def submit_tokens(
        self, grammar: tuple[list[str], npt.NDArray[np.int32]] | None = None
    ) -> int:
        """Submits the step's tokens; returns the step id `collect` takes."""
    def collect(self, step_id: int) -> StepOutput: ...
    def step_logits(
        self,
        batch: Sequence[tuple[str, Sequence[int], int, Sequence[int]]],
        images: Mapping[str, RequestImages] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Logits of every token of `(req_id, tokens, start, block_ids)` chunks; `images` gives a
        request's prepared images (its placeholders take the tower's rows, its tokens M-RoPE)."""
    def prepare_images(
        self,
        prompt: Sequence[int],
        pixel_values: npt.NDArray[np.float32],
        image_grid_thw: Sequence[Sequence[int]],
    ) -> RequestImages:
        """Runs the vision tower once over `[patches, patch features]` pixel values (as
        transformers' image processor gives them, with `image_grid_thw`) for a prompt holding each
        image's run of placeholder tokens."""
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = -1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        pipeline: bool = True,
    ) -> list[list[int]]: ...

class PoolingOutput:
    """One encoder step: the served requests in step order with their vectors, and the requests
    that failed with the reason."""

    @property
    def req_ids(self) -> list[str]: ...
    @property
    def vectors(self) -> list[npt.NDArray[np.float32]]: ...
    @property
    def failed(self) -> dict[str, str]: ...

class EncoderRunner:
    """An encoder model (BertModel, ...) and the pooling of its hidden states."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        device: Literal["cpu", "gpu"] | None = None,
        dtype: str | None = None,
    ) -> None: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def max_positions(self) -> int: ...
    @property
    def weights_nbytes(self) -> int: ...
    @property
    def device(self) -> Literal["cpu", "gpu"]: ...
    @property
    def task(self) -> Literal["embed", "classify"]:
        """"classify" for a model with a classifier head (cross-encoders), else "embed"."""
    @property
    def num_labels(self) -> int | None: ...
    def configure(
        self,
        pooling: Literal["MEAN", "CLS", "LAST"],
        *,
        activation: Literal["identity", "sigmoid", "softmax"] = "identity",
        logit_mean: float = 0.0,
        logit_sigma: float = 1.0,
    ) -> None:
        """vLLM's pooler config: pooling, the classifier's activation and logit affine."""
    def inject_fault(self) -> None:
        """Make the next batch fail once (tests of fault isolation)."""
    def execute_model(self, scheduler_output: Any) -> PoolingOutput:
        """vLLM's SchedulerOutput in: every scheduled request embedded whole."""
    def embed(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        pooling: Literal["MEAN", "CLS", "LAST"],
        normalize: bool,
        dimensions: Sequence[int | None] | None = None,
        token_type_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> list[npt.NDArray[np.float32]]:
        """One float32 vector per input, in input order: embeddings, or a classifier's scores
        (normalize: vLLM's use_activation)."""
    def hidden_states(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        token_type_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> tuple[npt.NDArray[np.float32], list[tuple[int, int]]]:
        """Last hidden states [T, hidden] of the flattened inputs and each input's (row, length)."""

def init_logging(debug: bool = False) -> None: ...
def backend_info() -> BackendInfo: ...
def resolve_device(device: Literal["cpu", "gpu"] | None = None) -> Literal["cpu", "gpu"]:
    """The device the engine runs on when `device` (or nothing) is asked for."""
def device_total_memory(device: Literal["cpu", "gpu"] | None = None) -> int: ...
def required_block_size(
    config_json: str, dtype: str, block_size: int, ssm_dtype: str | None = None
) -> int:
    """The smallest multiple of `block_size` whose K/V page holds a linear-attention state of the
    model at `config_json` (`block_size` for models without such layers)."""

def decoder_architectures() -> list[str]:
    """The config architectures of the decoder families the engine runs."""
def encoder_architectures() -> list[str]:
    """The config architectures of the encoder families (pooling models) the engine runs."""
def gguf_architectures() -> list[tuple[str, list[str]]]:
    """GGUF architecture -> the config architectures of the families that load it."""
def gguf_to_safetensors(model_dir: str | os.PathLike[str], out_file: str | os.PathLike[str]) -> int:
    """The GGUF checkpoint of model_dir as float32 safetensors under HF names; tensor count."""

# The sampler alone, for tests against vLLM's sampling code. Rows are dicts of SamplingParams
# fields plus "prompt", "output" (token lists) and "key" (the draw's PRNG key).
def process_logits(
    logits: npt.NDArray[np.float32], rows: list[dict[str, Any]]
) -> npt.NDArray[np.float32]: ...
def filter_logits(
    logits: npt.NDArray[np.float32], rows: list[dict[str, Any]]
) -> npt.NDArray[np.float32]: ...
def sample_tokens(logits: npt.NDArray[np.float32], rows: list[dict[str, Any]]) -> list[int]: ...
