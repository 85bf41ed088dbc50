"""Hybrid linear-attention models (Qwen3.5, Qwen3-Next) through vLLM's hybrid KV-cache manager.

The linear-attention states live in blocks vLLM's manager places (its Mamba-style spec). With
prefix caching vLLM keeps a state per block ("align" mode): a request whose prompt shares a
cached prefix starts from the cached state; without it each request has one state block
("none" mode). Both against transformers' greedy (Qwen3.5 with prefix caching, Qwen3-Next
without), with prefills split into chunks across steps and a later request sharing the first
one's prefix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference as R
from conftest import shutdown_llm

GEN_TOKENS = 8


def _ids(seed: int, n: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _metric(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("family", "prefix_caching"), [("qwen3_5", True), ("qwen3_next", False)], ids=["qwen3_5-align", "qwen3_next-none"]
)
def test_hybrid_prefix_and_chunks_match_transformers(tiny_models, family, prefix_caching):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = R.TINY_VARIANTS[family]
    hf = tiny_models.hf(family)
    shared = _ids(1, 53, spec.vocab_size)
    prompts = [shared + _ids(2, 11, spec.vocab_size), shared + _ids(3, 6, spec.vocab_size), _ids(4, 40, spec.vocab_size)]
    refs = [R.hf_greedy(hf, p, GEN_TOKENS) for p in prompts]
    llm = LLM(
        model=str(tiny_models.path(family)),
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


def _vision_language_checkpoint(root):
    """A tiny `Qwen3_5MoeForConditionalGeneration` (text stack of the qwen3_5_moe variant, a
    one-block vision tower) as transformers writes it, with its experts then stored fused as the
    published checkpoints have them (`experts.gate_up_proj` `[E, 2I, H]`, `experts.down_proj`).
    Returns the directory and transformers' model."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = R.TINY_VARIANTS["qwen3_5_moe"]
    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64}
    cfg = AutoConfig.for_model("qwen3_5_moe", text_config=R._hf_config(spec).to_dict(), vision_config=vision)
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(cfg).to(torch.float32).eval()
    R.randomize_(model, spec)
    out = root / "qwen3_5_moe_vl"
    model.save_pretrained(out)
    R.build_tokenizer(spec.vocab_size).save_pretrained(out)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    n = spec.extra_config["num_experts"]
    for base in sorted({k.split(".experts.")[0] for k in tensors if ".experts.0.gate_proj" in k}):
        per = {p: [tensors.pop(f"{base}.experts.{e}.{p}.weight") for e in range(n)] for p in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{base}.experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(per["gate_proj"], per["up_proj"])])
        tensors[f"{base}.experts.down_proj"] = np.stack(per["down_proj"])
    save_file(tensors, str(path))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    return out, model


def test_vision_language_checkpoint_runs_its_text_stack(core, session_tmp):
    """The text stack of a Qwen3.5 vision-language checkpoint (fused experts) against
    transformers' forward of the whole model on text, then through vLLM, which refuses images."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, hf = _vision_language_checkpoint(session_tmp)
    ids = _ids(5, 70, R.TINY_VARIANTS["qwen3_5_moe"].vocab_size)
    runner = core.ModelRunner(str(path), block_size=16)
    runner.allocate_kv_cache(8)
    ours = runner.step_logits([("a", ids, 0, [2, 0, 5, 7, 1])])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    err = R.rowwise_rel_err(ours, ref)
    assert err.max() <= R.LOGITS_REL_TOL, f"max rel err {err.max():.3g}"

    # transformers' greedy, step by step (its generate() wants text-model fields).
    seq, want, logits = list(ids[:20]), [], []
    with torch.no_grad():
        for _ in range(GEN_TOKENS):
            row = hf(input_ids=torch.tensor([seq])).logits[0, -1].float().numpy()
            logits.append(row)
            want.append(int(row.argmax()))
            seq.append(want[-1])
    llm = LLM(model=str(path), dtype="float32", max_model_len=64, kv_cache_memory_bytes=1 << 20, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids[:20])], params, use_tqdm=False)
        note = R.check_greedy_match(list(out[0].outputs[0].token_ids), want, logits, what="vision-language text")
        if note:
            print(note)
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        with pytest.raises(Exception, match="(?i)multi-modal|image"):
            llm.generate({"prompt": "a", "multi_modal_data": {"image": image}}, params, use_tqdm=False)
    finally:
        shutdown_llm(llm)
