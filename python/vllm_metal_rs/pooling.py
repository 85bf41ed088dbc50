"""Pooling models on the engine.

Encoders (BertModel, ...) run on `MetalEncoderWorker`: they keep no KV cache (vLLM's KV-cache
spec is empty), the scheduler runs each prompt whole (chunked prefill and prefix caching are off
for encoder-only models) and every step returns one vector per request, which finishes it.

Decoders (Qwen3-Embedding, Qwen3-Reranker, ...) run on the generation worker, whose runner
`configure_decoder_pooling` turns into a pooling one: same KV cache and steps, vectors instead of
tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.kv_cache_interface import KVCacheSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.worker_base import CompilationTimes

from vllm_metal_rs.scheduler import MetalModelRunnerOutput
from vllm_metal_rs.worker import MetalWorker, _core, logger

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from vllm_metal_rs import _core as _core_types

ENCODER_WORKER_CLS = "vllm_metal_rs.pooling.MetalEncoderWorker"


def _refuse_dense_modules(path: str) -> None:
    """sentence-transformers' Dense projections after pooling are not run by the engine."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return
    for m in json.loads(modules.read_text()):
        kind = str(m.get("type", ""))
        if kind.rsplit(".", 1)[-1] == "Dense":
            raise ValueError(
                f"vllm-metal-rs: {modules} has a Dense module ({m.get('path')}); projections after"
                " pooling are not supported"
            )


def _classifier_activation(hf_config: Any, num_labels: int) -> str:
    """vLLM's activation of the model's classifier logits (by its problem type, its
    sentence-transformers activation, else by the number of labels), by name for the engine."""
    from vllm.model_executor.layers.pooler import activations as A

    act = A.get_act_fn(hf_config, static_num_labels=False)
    if isinstance(act, A.PoolerIdentity):
        return "identity"
    if isinstance(act, A.PoolerMultiLabelClassify):
        return "sigmoid"
    if isinstance(act, A.PoolerClassify):
        n = act.num_labels if act.num_labels is not None else num_labels
        return "sigmoid" if n < 2 else "softmax"
    raise ValueError(f"vllm-metal-rs: classifier activation {act!r} is not supported")


def _logit_affine(pooler: Any) -> dict[str, float]:
    """vLLM's `(logit - mean) / sigma` of classifier logits, as the engine's keyword arguments."""
    return dict(logit_mean=float(pooler.logit_mean or 0.0), logit_sigma=float(pooler.logit_sigma or 1.0))


def configure_decoder_pooling(runner: _core_types.ModelRunner, mc: Any) -> None:
    """vLLM's pooler config (and, for rerankers converted by vLLM's from_2_way_softmax, the two
    classifier tokens) given to a decoder runner once."""
    pooler = mc.pooler_config
    hf = mc.hf_config
    text = hf.get_text_config()
    if mc.convert_type != "classify":
        runner.set_pooling(pooler.seq_pooling_type)
        return
    method = getattr(text, "method", None) or getattr(hf, "method", None)
    tokens = getattr(hf, "classifier_from_token", None) or getattr(text, "classifier_from_token", None)
    if method != "from_2_way_softmax" or not tokens or len(tokens) != 2:
        raise ValueError(
            f"vllm-metal-rs: classifying with {mc.architecture} needs a score head the engine does"
            " not run; rerankers converted with method 'from_2_way_softmax' and two"
            " classifier_from_token entries are supported"
        )
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(
        mc.tokenizer,
        revision=mc.tokenizer_revision,
        tokenizer_mode=mc.tokenizer_mode,
        trust_remote_code=mc.trust_remote_code,
    )
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    runner.set_pooling(
        pooler.seq_pooling_type,
        classifier_tokens=ids,
        two_way=True,
        activation=_classifier_activation(hf, 1),
        **_logit_affine(pooler),
    )
    logger.info("vllm-metal-rs: %s scores with tokens %s (ids %s)", mc.architecture, tokens, ids)


class MetalEncoderWorker(MetalWorker):
    """MetalWorker for encoder pooling models; the Rust EncoderRunner holds the weights."""

    encoder: _core_types.EncoderRunner | None = None

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        mc = self.model_config
        path, dtype = self._checkpoint(load_dummy_weights)
        _refuse_dense_modules(path)
        encoder = _core().EncoderRunner(path, device=self.mlx_device, dtype=dtype)
        pooler = mc.pooler_config
        pooling = pooler.seq_pooling_type
        activation = "identity"
        if encoder.task == "classify":
            activation = _classifier_activation(mc.hf_config, encoder.num_labels or 0)
        encoder.configure(pooling, activation=activation, **_logit_affine(pooler))
        self.encoder = encoder
        logger.info(
            "vllm-metal-rs: loaded encoder %s (%s): hidden %d, %s pooling%s, weights %.2f GiB",
            path,
            encoder.task,
            encoder.hidden_size,
            pooling,
            f", {encoder.num_labels} labels, {activation}" if encoder.task == "classify" else "",
            encoder.weights_nbytes / 2**30,
        )

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        # Encoder attention keeps nothing between steps.
        return {}

    def determine_available_memory(self) -> int:
        return 0

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        if kv_cache_config.kv_cache_groups:
            raise ValueError("vllm-metal-rs: vLLM planned a KV cache for an encoder model")

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # The generation warm-up needs a KV cache; encoders have none.
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def get_supported_tasks(self) -> tuple[str, ...]:
        return (self._encoder().task,)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        out = self._encoder().execute_model(scheduler_output)
        req_ids = out.req_ids
        failed = out.failed
        # vLLM lists every scheduled request; a failed one has no vector (the scheduler
        # finishes it with the error status).
        ids = req_ids + list(failed)
        vectors: list[torch.Tensor | None] = [torch.from_numpy(v) for v in out.vectors]
        vectors += [None] * len(failed)
        return MetalModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={req_id: i for i, req_id in enumerate(ids)},
            sampled_token_ids=[],
            pooler_output=vectors,
            failed_requests=failed,
        )

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput | None:
        # execute_model returns every pooling step's output itself.
        return None

    def inject_fault(self, stage: str) -> None:
        """Make the next batch fail once (tests of fault isolation; `llm.collective_rpc`)."""
        if stage != "forward":
            raise ValueError(f"vllm-metal-rs: an encoder fails at 'forward' only, not {stage!r}")
        self._encoder().inject_fault()

    def get_model_inspection(self) -> str:
        e = self._encoder()
        return (
            f"{self.model_config.architecture} on the vllm-metal-rs engine (encoder, hidden"
            f" {e.hidden_size}, MLX {e.device})"
        )

    def get_cache_block_size_bytes(self) -> int:
        return 0

    def shutdown(self) -> None:
        self.encoder = None

    def _encoder(self) -> _core_types.EncoderRunner:
        if self.encoder is None:
            raise RuntimeError("vllm-metal-rs: the model is not loaded")
        return self.encoder

    def _runner(self) -> Any:
        raise RuntimeError("vllm-metal-rs: an encoder model has no generation runner")
