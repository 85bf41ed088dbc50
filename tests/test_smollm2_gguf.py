"""The real SmolLM2-135M-Instruct Q4_1 GGUF: the engine against transformers' GGUF loader.

transformers dequantizes the Q4_1 tensors to float32 (and undoes llama.cpp's Q/K row permutation);
our engine on CPU dequantizes them to float32 at load too, so both compute from the same weights and
greedy decoding must agree token for token (up to near-ties, see reference.check_greedy_match).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoint_files as C
import reference as R

NEW_TOKENS = 32
#: Prompt-logits bound for the 30-layer real model (float32 both sides): rel err per row, as for the
#: tiny models (measured: ~1e-5 here, ~1e-6 on the tiny models).
GGUF_LOGITS_REL_TOL = 1e-4

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the ocean."}],
    [
        {"role": "system", "content": "You are a pirate. Answer like one."},
        {"role": "user", "content": "Tell me about your ship and crew."},
    ],
]
PLAIN_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def _ids(enc) -> list[int]:
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        enc = enc["input_ids"]
    return [int(t) for t in enc]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    return C.load_hf_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf):
    t0 = time.perf_counter()
    model = C.load_hf_gguf(smollm2_gguf)
    print(f"transformers GGUF load: {time.perf_counter() - t0:.1f}s")
    return model


@pytest.fixture(scope="module")
def prompt_ids(gguf_tokenizer) -> list[list[int]]:
    out = [_ids(gguf_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)) for m in CHAT_PROMPTS]
    out += [_ids(gguf_tokenizer(p, add_special_tokens=False)) for p in PLAIN_PROMPTS]
    for ids in out:
        assert 3 <= len(ids) < 200, ids
    return out


@pytest.fixture(scope="module")
def hf_greedy_outputs(hf_gguf_model, prompt_ids):
    return [R.hf_greedy(hf_gguf_model, p, NEW_TOKENS) for p in prompt_ids]


def _gguf_in(model_dir: Path) -> Path:
    ggufs = sorted(model_dir.glob("*.gguf"))
    assert len(ggufs) == 1, f"expected one .gguf in {model_dir}, found {ggufs}"
    return ggufs[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def test_reference_greedy_is_sane(hf_gguf_model, gguf_tokenizer, prompt_ids, hf_greedy_outputs):
    """The oracle itself: the dequantized model answers the first chat prompt sensibly."""
    text = gguf_tokenizer.decode(hf_greedy_outputs[0][0], skip_special_tokens=True)
    assert "Paris" in text, f"transformers' SmolLM2 answer does not mention Paris: {text!r}"


def test_prepared_dir_matches_gguf(default_model_dir, smollm2_gguf, hf_gguf_model, gguf_tokenizer, prompt_ids):
    """prepare_model's directory describes the same model as the GGUF's own metadata."""
    d = Path(default_model_dir)
    gguf = _gguf_in(d)
    assert gguf.stat().st_size == smollm2_gguf.stat().st_size and _sha256(gguf) == _sha256(smollm2_gguf), (
        f"{gguf} is not the packaged {smollm2_gguf.name}"
    )
    cfg = json.loads((d / "config.json").read_text())
    ref = hf_gguf_model.config
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    checks = {
        "architectures": (cfg.get("architectures"), ["LlamaForCausalLM"]),
        "hidden_size": (cfg.get("hidden_size"), ref.hidden_size),
        "intermediate_size": (cfg.get("intermediate_size"), ref.intermediate_size),
        "num_hidden_layers": (cfg.get("num_hidden_layers"), ref.num_hidden_layers),
        "num_attention_heads": (cfg.get("num_attention_heads"), ref.num_attention_heads),
        "num_key_value_heads": (cfg.get("num_key_value_heads"), ref.num_key_value_heads),
        "vocab_size": (cfg.get("vocab_size"), ref.vocab_size),
        "tie_word_embeddings": (cfg.get("tie_word_embeddings"), ref.tie_word_embeddings),
        "rope_theta": (theta, ref.rope_parameters["rope_theta"]),
    }
    bad = {k: v for k, v in checks.items() if v[0] != v[1]}
    assert not bad, f"config.json vs the GGUF's metadata (ours, transformers): {bad}"
    assert abs(cfg["rms_norm_eps"] - ref.rms_norm_eps) <= 1e-9, (cfg["rms_norm_eps"], ref.rms_norm_eps)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    for m in CHAT_PROMPTS:
        a = _ids(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True))
        b = _ids(gguf_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True))
        assert a == b, f"prepared tokenizer/chat template differ from the GGUF's for {m}:\n{a}\n{b}"
    for p in PLAIN_PROMPTS:
        assert _ids(tok(p, add_special_tokens=False)) == _ids(gguf_tokenizer(p, add_special_tokens=False)), p
    assert tok.eos_token_id == gguf_tokenizer.eos_token_id, (tok.eos_token, gguf_tokenizer.eos_token)


@pytest.fixture(scope="module")
def runner(core, default_model_dir):
    t0 = time.perf_counter()
    r = core.ModelRunner(str(default_model_dir), block_size=16)
    print(f"ModelRunner load: {time.perf_counter() - t0:.1f}s")
    r.allocate_kv_cache(128)
    return r


def test_greedy_matches_transformers(runner, gguf_tokenizer, prompt_ids, hf_greedy_outputs):
    t0 = time.perf_counter()
    ours = runner.generate(prompt_ids, NEW_TOKENS, temperature=0.0)
    print(f"engine generate {len(prompt_ids)}x{NEW_TOKENS}: {time.perf_counter() - t0:.1f}s")
    assert len(ours) == len(prompt_ids)
    notes, failures = [], []
    for i, (o, (ref, ref_logits)) in enumerate(zip(ours, hf_greedy_outputs)):
        try:
            note = R.check_greedy_match(o, ref, ref_logits, what=f"prompt {i}")
        except AssertionError as e:
            failures.append(
                f"{e}\n  ours: {gguf_tokenizer.decode(o)!r}\n  ref:  {gguf_tokenizer.decode(ref)!r}"
            )
            continue
        if note:
            notes.append(note)
    print("\n".join(notes))
    assert not failures, "\n\n".join(failures)


def test_prompt_logits_from_gguf_file_path(core, default_model_dir, hf_gguf_model, prompt_ids):
    """ModelRunner given the .gguf file itself (config.json beside it): prompt logits vs transformers."""
    gguf = _gguf_in(Path(default_model_dir))
    r = core.ModelRunner(str(gguf), block_size=16)
    assert r.num_layers == hf_gguf_model.config.num_hidden_layers
    assert r.num_kv_heads == hf_gguf_model.config.num_key_value_heads
    assert r.head_dim == hf_gguf_model.config.head_dim
    assert r.vocab_size == hf_gguf_model.config.vocab_size
    r.allocate_kv_cache(16)
    ids = prompt_ids[2]
    blocks = np.random.default_rng(0).permutation(16)[: -(-len(ids) // 16)].tolist()
    ours = r.step_logits([("p", ids, 0, blocks)])
    ref = R.hf_logits(hf_gguf_model, ids)
    err = R.rowwise_rel_err(ours, ref)
    assert err.max() <= GGUF_LOGITS_REL_TOL, (
        f"max rel err {err.max():.3g} at position {int(np.argmax(err))} of {len(ids)} (> {GGUF_LOGITS_REL_TOL})"
    )
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95
