"""Hybrid linear-attention models (Qwen3-Next) through vLLM's hybrid KV-cache manager.

The linear-attention states live in blocks vLLM's manager places (its Mamba-style spec). With
prefix caching vLLM keeps a state per block ("align" mode): a request whose prompt shares a
cached prefix starts from the cached state; without it each request has one state block
("none" mode). Both against transformers' greedy on the tiny Qwen3-Next checkpoint, with
prefills split into chunks across steps and a second request hitting the first one's prefix.
"""

from __future__ import annotations

import pytest

import reference as R
from conftest import shutdown_llm

pytestmark = pytest.mark.vllm

FAMILY = "qwen3_next"
GEN_TOKENS = 8


def _ids(seed: int, n: int, vocab: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _metric(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["align", "none"])
def test_hybrid_prefix_and_chunks_match_transformers(tiny_models, prefix_caching):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = R.TINY_VARIANTS[FAMILY]
    hf = tiny_models.hf(FAMILY)
    shared = _ids(1, 53, spec.vocab_size)
    prompts = [shared + _ids(2, 11, spec.vocab_size), shared + _ids(3, 6, spec.vocab_size), _ids(4, 40, spec.vocab_size)]
    refs = [R.hf_greedy(hf, p, GEN_TOKENS) for p in prompts]
    llm = LLM(
        model=str(tiny_models.path(FAMILY)),
        dtype="float32",
        max_model_len=128,
        block_size=16,
        kv_cache_memory_bytes=64 * spec.kv_bytes_per_block(16) // spec.num_layers,
        max_num_seqs=4,
        max_num_batched_tokens=24,
        enable_chunked_prefill=True,
        enable_prefix_caching=prefix_caching,
        seed=0,
        disable_log_stats=False,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
        outs = []
        # One at a time: the later prompts can find the first one's blocks (and states) cached.
        for p in prompts:
            outs += llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        hits = _metric(llm, "vllm:prefix_cache_hits")
        mode = llm.llm_engine.vllm_config.cache_config.mamba_cache_mode
    finally:
        shutdown_llm(llm)
    assert mode == ("align" if prefix_caching else "none")
    if prefix_caching:
        # The second prompt starts from the first one's cached blocks: 48 of its 53 shared tokens.
        assert hits >= 48, f"prefix cache hits {hits}"
    for i, (o, (ref, logits)) in enumerate(zip(outs, refs)):
        note = R.check_greedy_match(list(o.outputs[0].token_ids), ref, logits, what=f"{mode} prompt {i}")
        if note:
            print(note)


def test_hybrid_state_dtype_we_cannot_keep_is_refused(tiny_models):
    from vllm import LLM

    with pytest.raises(Exception, match="mamba_cache_dtype='float16' is not supported"):
        LLM(
            model=str(tiny_models.path(FAMILY)),
            dtype="float32",
            max_model_len=64,
            kv_cache_memory_bytes=1 << 20,
            mamba_cache_dtype="float16",
        )
