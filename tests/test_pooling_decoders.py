"""Decoder pooling models on the engine through vLLM: an embedder in Qwen3-Embedding's layout
(the bare Qwen3Model's tensors, last-token pooling, normalised) and a reranker as vLLM converts
Qwen3-Reranker (from_2_way_softmax over two LM-head rows), against transformers' forward on tiny
random checkpoints; chunked prefill and prefix-cache hits included."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import shutdown_llm

import reference as R

pytestmark = pytest.mark.vllm


def _rand_ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(R.NUM_SPECIAL, 320, size=n).tolist()


@pytest.fixture(scope="module")
def embedder_dir(tiny_models, tmp_path_factory):
    """The tiny Qwen3 as Qwen3-Embedding ships: Qwen3Model's tensors (no `model.` prefix, no LM
    head, tied embeddings) under a Qwen3ForCausalLM config."""
    import torch
    from transformers import AutoModel

    src = tiny_models.path("qwen3")
    out = tmp_path_factory.mktemp("embedder") / "tiny-qwen3-embedding"
    bare = AutoModel.from_pretrained(str(src), dtype=torch.float32)
    assert type(bare).__name__ == "Qwen3Model"
    bare.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def _hf_last_hidden(model_dir, ids) -> np.ndarray:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()
    return h


def test_decoder_embedder_matches_transformers(embedder_dir):
    """Last-token embeddings through vLLM (chunked prefill over 16-token chunks, a prefix-cache
    hit on the repeated prompt) equal transformers' normalised last hidden state."""
    from vllm import LLM, PoolingParams
    from vllm.inputs import TokensPrompt

    prompts = [_rand_ids(1, 5), _rand_ids(2, 70), _rand_ids(3, 33)]
    refs = [_hf_last_hidden(embedder_dir, p) for p in prompts]
    llm = LLM(
        model=str(embedder_dir),
        runner="pooling",
        max_model_len=256,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=32 * 2**20,
        hf_overrides={"is_matryoshka": True},
        seed=0,
    )
    try:
        assert llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
        for attempt in range(2):  # the second pass reads the first's cached prefixes
            outs = llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts])
            for p, o, ref in zip(prompts, outs, refs):
                got = np.asarray(o.outputs.embedding)
                want = ref / np.linalg.norm(ref)
                err = R.rel_err(got, want)
                assert err <= R.LOGITS_REL_TOL, f"pass {attempt}, {len(p)} tokens: rel err {err:.3g}"
        raw = llm.embed([TokensPrompt(prompt_token_ids=prompts[1])], pooling_params=PoolingParams(use_activation=False))
        assert R.rel_err(np.asarray(raw[0].outputs.embedding), refs[1]) <= R.LOGITS_REL_TOL
        # Matryoshka: the first 16 features, normalised after truncation.
        short = llm.embed([TokensPrompt(prompt_token_ids=prompts[2])], pooling_params=PoolingParams(dimensions=16))
        want = refs[2][:16] / np.linalg.norm(refs[2][:16])
        assert R.rel_err(np.asarray(short[0].outputs.embedding), want) <= R.LOGITS_REL_TOL
    finally:
        shutdown_llm(llm)


def test_decoder_reranker_as_vllm_converts_it(tiny_models):
    """vLLM's Qwen3-Reranker conversion: score = sigmoid(logit[yes] - logit[no]) at the last
    token; here "yes"/"no" are two byte tokens of the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    path = tiny_models.path("qwen3")
    tok = AutoTokenizer.from_pretrained(str(path))
    no_id, yes_id = tok.convert_tokens_to_ids("n"), tok.convert_tokens_to_ids("y")
    prompts = [_rand_ids(4, 9), _rand_ids(5, 40)]
    ref_model = tiny_models.hf("qwen3")
    want = []
    for p in prompts:
        with torch.no_grad():
            logits = ref_model(torch.tensor([p])).logits[0, -1].double().numpy()
        want.append(1 / (1 + np.exp(-(logits[yes_id] - logits[no_id]))))
    llm = LLM(
        model=str(path),
        runner="pooling",
        hf_overrides={
            "architectures": ["Qwen3ForSequenceClassification"],
            "classifier_from_token": ["n", "y"],
            "is_original_qwen3_reranker": True,
        },
        max_model_len=256,
        kv_cache_memory_bytes=32 * 2**20,
        seed=0,
    )
    try:
        outs = llm.classify([TokensPrompt(prompt_token_ids=p) for p in prompts])
        got = [o.outputs.probs for o in outs]
        assert all(len(g) == 1 for g in got)
        np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-4, atol=1e-6)
    finally:
        shutdown_llm(llm)
