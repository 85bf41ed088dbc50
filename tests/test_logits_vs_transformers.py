"""The Rust engine's logits and greedy tokens against transformers' LlamaForCausalLM (float32).

Relative error of a logits row: rel_err(ours, ref) = max_v |ours_v - ref_v| / max_v |ref_v|.
Every row must be within reference.LOGITS_REL_TOL = 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import checkpoint_files as C
import reference as R

BLOCK_SIZE = 16
FULL_PROMPT_LEN = 100  # crosses several blocks and llama3's original_max_position_embeddings (64)

VARIANTS = ["gqa_untied", "tied", "mha", "llama3", "llama3_legacy", "linear", "linear_legacy", "sharded", "yarn"]


def _rand_ids(seed: int, n: int, vocab: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(R.NUM_SPECIAL, vocab, size=n).tolist()


def _safetensors_payload_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                total += int(np.prod(sl.get_shape())) * 4  # float32 checkpoints
    return total


# --------------------------------------------------------------------------------------------------
# Checks of the test fixtures themselves (no engine needed): the variants are what they claim, and
# the tolerance can tell them apart.
# --------------------------------------------------------------------------------------------------


def test_fixture_variants_are_what_they_claim(tiny_models):
    sharded = tiny_models.path("sharded")
    index = sharded / "model.safetensors.index.json"
    assert index.is_file(), "sharded variant has no model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) >= 2, f"sharded variant has only {shards}"

    tied_cfg = json.loads((tiny_models.path("tied") / "config.json").read_text())
    assert tied_cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(tiny_models.path("tied") / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys(), "tied checkpoint unexpectedly stores lm_head.weight"
    with safe_open(str(tiny_models.path("gqa_untied") / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" in f.keys()

    legacy = json.loads((tiny_models.path("llama3_legacy") / "config.json").read_text())
    assert "rope_parameters" not in legacy and legacy["rope_scaling"]["rope_type"] == "llama3"
    modern = json.loads((tiny_models.path("llama3") / "config.json").read_text())
    assert "rope_scaling" not in modern and modern["rope_parameters"]["rope_type"] == "llama3"


@pytest.mark.parametrize("variant", ["llama3", "linear", "yarn"])
def test_rope_scaling_is_visible_at_tolerance(tiny_models, variant):
    """Scaled vs unscaled rope (same weights) must differ by far more than the tolerance, or the
    scaling tests below would prove nothing."""
    spec = dataclasses.replace(R.TINY_VARIANTS[variant], rope_scaling=None)
    plain = R.load_hf(tiny_models.make(f"{variant}_unscaled", spec))
    ids = _rand_ids(7, 40, spec.vocab_size)
    err = R.rowwise_rel_err(R.hf_logits(tiny_models.hf(variant), ids), R.hf_logits(plain, ids))
    assert np.median(err[1:]) > 100 * R.LOGITS_REL_TOL, f"{variant} scaling barely changes logits: {err}"


def test_legacy_and_hf5_configs_are_the_same_model(tiny_models):
    ids = _rand_ids(8, 30, 320)
    for a, b in [("llama3", "llama3_legacy"), ("linear", "linear_legacy")]:
        err = R.rel_err(R.hf_logits(tiny_models.hf(a), ids), R.hf_logits(tiny_models.hf(b), ids))
        assert err == 0.0, f"transformers reads {a} and {b} differently (rel err {err})"


# --------------------------------------------------------------------------------------------------
# (a) one full-prompt forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_prompt_logits(core, tiny_models, variant):
    spec = R.TINY_VARIANTS[variant]
    path = tiny_models.path(variant)
    runner = core.ModelRunner(str(path), block_size=BLOCK_SIZE)

    assert runner.num_layers == spec.num_layers
    assert runner.num_kv_heads == spec.num_kv_heads
    assert runner.head_dim == spec.head_dim
    assert runner.vocab_size == spec.vocab_size
    assert runner.block_size == BLOCK_SIZE
    assert "float32" in str(runner.kv_cache_dtype), (
        f"dtype=None on CPU should compute (and cache) in float32, kv_cache_dtype={runner.kv_cache_dtype!r}"
    )
    payload = _safetensors_payload_bytes(path)
    assert payload * 0.99 <= runner.weights_nbytes <= payload * 2, (
        f"weights_nbytes {runner.weights_nbytes} vs {payload} bytes of float32 tensors in the checkpoint"
    )

    ids = _rand_ids(100 + spec.seed, FULL_PROMPT_LEN, spec.vocab_size)
    n_blocks = -(-FULL_PROMPT_LEN // BLOCK_SIZE)
    runner.allocate_kv_cache(32)
    blocks = np.random.default_rng(spec.seed).permutation(32)[:n_blocks].tolist()
    ours = runner.step_logits([("r0", ids, 0, blocks)])
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32, f"got {type(ours)} {getattr(ours, 'dtype', None)}"
    assert ours.shape == (FULL_PROMPT_LEN, spec.vocab_size), ours.shape

    ref = R.hf_logits(tiny_models.hf(variant), ids)
    err = R.rowwise_rel_err(ours, ref)
    worst = int(np.argmax(err))
    assert err.max() <= R.LOGITS_REL_TOL, (
        f"{variant}: max rel err {err.max():.3g} at position {worst} (> {R.LOGITS_REL_TOL}); "
        f"first positions: {np.round(err[:8], 6).tolist()}"
    )


# --------------------------------------------------------------------------------------------------
# (b) paged: chunked prefill, decode, interleaved requests, shuffled non-contiguous blocks
# --------------------------------------------------------------------------------------------------


def _run_schedule(runner, schedule, reqs):
    """schedule: list of steps; a step is a list of (req_id, n_tokens)."""
    for step_no, step in enumerate(schedule):
        batch = [reqs[rid].chunk(n) for rid, n in step]
        used = [b for (_, _, _, table) in batch for b in table]
        assert len(used) == len(set(used)), f"test bug: step {step_no} shares blocks"
        out = runner.step_logits(batch)
        total = sum(n for _, n in step)
        assert out.shape == (total, runner.vocab_size), (
            f"step {step_no}: logits shape {out.shape}, expected ({total}, {runner.vocab_size})"
        )
        row = 0
        for rid, n in step:
            reqs[rid].advance(n, out[row : row + n])
            row += n


def _check_against_hf(hf_model, reqs, what):
    failures = []
    for r in reqs.values():
        assert r.pos == len(r.tokens), f"test bug: {r.req_id} fed {r.pos} of {len(r.tokens)} tokens"
        ref = R.hf_logits(hf_model, r.tokens)
        ours = np.stack([r.logits[p] for p in range(len(r.tokens))])
        err = R.rowwise_rel_err(ours, ref)
        bad = np.nonzero(err > R.LOGITS_REL_TOL)[0]
        if len(bad):
            failures.append(
                f"{r.req_id}: {len(bad)}/{len(err)} positions over {R.LOGITS_REL_TOL}, worst "
                f"{err.max():.3g} at {int(np.argmax(err))}, first bad positions {bad[:10].tolist()}"
            )
    assert not failures, f"{what}:\n" + "\n".join(failures)


@pytest.mark.parametrize("variant", ["gqa_untied", "llama3"])
def test_paged_chunked_interleaved(core, tiny_models, variant):
    spec = R.TINY_VARIANTS[variant]
    pool = 64
    runner = core.ModelRunner(str(tiny_models.path(variant)), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(pool)
    perm = np.random.default_rng(1234 + spec.seed).permutation(pool).tolist()
    V = spec.vocab_size

    # Sequences: prompt then teacher-forced decode tokens (the reference is one full forward).
    reqs = {
        # A: prefill 7 + 16 + 13 = 36, then 6 decodes -> 42 tokens, 3 blocks
        "A": R.PagedRequest("A", _rand_ids(1, 42, V), perm[0:3], BLOCK_SIZE),
        # B: prefill 11 + 9 = 20 then 6 decodes; given its whole allocation (5 blocks) every step
        "B": R.PagedRequest("B", _rand_ids(2, 26, V), perm[3:8], BLOCK_SIZE, full_table=True),
        # C: prompt of 5 in one chunk, then 13 decodes (crosses a block boundary at 16)
        "C": R.PagedRequest("C", _rand_ids(3, 18, V), perm[8:10], BLOCK_SIZE),
    }
    schedule = [
        [("A", 7), ("C", 5)],
        [("C", 1), ("A", 16), ("B", 11)],  # decode of C mixed with prefill chunks
        [("A", 13), ("C", 1), ("B", 9)],
        [("B", 1), ("A", 1), ("C", 1)],
        [("C", 1), ("A", 1)],
        [("A", 1), ("B", 1), ("C", 1)],
        [("C", 1)],
        [("B", 1), ("C", 1), ("A", 1)],
        [("A", 1), ("C", 1), ("B", 1)],
        [("C", 1), ("B", 1), ("A", 1)],
        [("C", 1), ("B", 1)],
        [("C", 1)],
        [("C", 1)],
        [("C", 1)],
    ]
    _run_schedule(runner, schedule, reqs)
    _check_against_hf(tiny_models.hf(variant), reqs, f"{variant} paged run")

    # Block reuse: D takes C's (now stale) blocks and a shorter sequence, so stale KV of C sits in
    # slots past D's positions. E reuses A's first block as a cached prefix (vLLM's prefix caching):
    # it starts at position 16 with A's first 16 tokens already in that block.
    a_tokens = reqs["A"].tokens
    more = {
        "D": R.PagedRequest("D", _rand_ids(4, 12, V), [perm[8], perm[9]], BLOCK_SIZE),
        "E": R.PagedRequest("E", a_tokens[:16] + _rand_ids(5, 14, V), [perm[0], perm[20]], BLOCK_SIZE),
    }
    more["E"].pos = 16
    more["E"].logits.update({p: reqs["A"].logits[p] for p in range(16)})
    reuse_schedule = [
        [("D", 9), ("E", 10)],
        [("E", 1), ("D", 1)],
        [("D", 1), ("E", 1)],
        [("D", 1), ("E", 1)],
        [("E", 1)],
    ]
    _run_schedule(runner, reuse_schedule, more)
    _check_against_hf(tiny_models.hf(variant), more, f"{variant} reused blocks")


# --------------------------------------------------------------------------------------------------
# (c) engine-alone greedy generation
# --------------------------------------------------------------------------------------------------

GEN_TOKENS = 20


@pytest.mark.parametrize("variant", ["gqa_untied", "tied", "llama3"])
def test_generate_greedy_matches_transformers(core, tiny_models, variant):
    spec = R.TINY_VARIANTS[variant]
    runner = core.ModelRunner(str(tiny_models.path(variant)), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(64)
    prompts = [_rand_ids(200 + i, n, spec.vocab_size) for i, n in enumerate([5, 23, 40])]
    ours = runner.generate(prompts, GEN_TOKENS, temperature=0.0)
    assert len(ours) == len(prompts), f"{len(ours)} outputs for {len(prompts)} prompts"
    hf = tiny_models.hf(variant)
    notes = []
    for i, (p, o) in enumerate(zip(prompts, ours)):
        ref, ref_logits = R.hf_greedy(hf, p, GEN_TOKENS)
        note = R.check_greedy_match(o, ref, ref_logits, what=f"{variant} prompt {i} (len {len(p)})")
        if note:
            notes.append(note)
    print("\n".join(notes))

    # The same prompt alone gives the same tokens as inside the batch.
    alone = runner.generate([prompts[1]], GEN_TOKENS)
    assert alone[0] == ours[1], f"prompt 1 alone {alone[0]} != batched {ours[1]}"


def test_generate_sampling_options(core, tiny_models):
    spec = R.TINY_VARIANTS["gqa_untied"]
    runner = core.ModelRunner(str(tiny_models.path("gqa_untied")), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(64)
    prompts = [_rand_ids(300 + i, n, spec.vocab_size) for i, n in enumerate([9, 17])]
    greedy = runner.generate(prompts, 16)

    # top_k=1 samples the argmax whatever the temperature.
    topk1 = runner.generate(prompts, 16, temperature=1.0, top_k=1, seed=5)
    assert topk1 == greedy, f"top_k=1 {topk1} != greedy {greedy}"

    # A seed makes sampling reproducible, and high-temperature sampling is not greedy.
    s1 = runner.generate(prompts, 16, temperature=1.5, seed=11)
    s2 = runner.generate(prompts, 16, temperature=1.5, seed=11)
    assert s1 == s2, f"same seed, different samples: {s1} vs {s2}"
    assert all(len(s) == 16 for s in s1)
    assert s1 != greedy, "temperature 1.5 sampling reproduced greedy exactly on 32 tokens"
    for s in s1:
        assert all(0 <= t < spec.vocab_size for t in s), s

    # stop_token_ids: generation stops at the first stop token (the stop token itself may or may
    # not be returned; the contract does not say), and the rest is the greedy prefix.
    g = greedy[0]
    k = next((i for i in range(2, len(g)) if g[i] not in g[:i]), None)
    assert k is not None, f"test bug: no fresh token in {g}"
    stopped = runner.generate([prompts[0]], 16, stop_token_ids=[g[k]])[0]
    assert stopped in (g[:k], g[: k + 1]), f"stop at {g[k]} (step {k}): got {stopped}, greedy {g}"


# --------------------------------------------------------------------------------------------------
# GGUF files of the tiny model (llama.cpp layout, Q/K rows permuted) against transformers' own GGUF
# loader, which dequantizes to float32 and undoes the permutation.
# --------------------------------------------------------------------------------------------------


def _gguf_model_dir(tiny_models, tmp_dir: Path, variant: str, qtype) -> Path:
    src = tiny_models.path(variant)
    out = tmp_dir / f"{variant}-{qtype.name}"
    out.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
    C.write_tiny_gguf(out / "model.gguf", src, weight_type=qtype)
    return out


def test_gguf_writer_roundtrip(tiny_models, tmp_path):
    """The F32 GGUF written by the test helper is, for transformers, the safetensors model."""
    import gguf

    for variant in ["gqa_untied", "tied", "qwen2"]:
        d = _gguf_model_dir(tiny_models, tmp_path, variant, gguf.GGMLQuantizationType.F32)
        ids = _rand_ids(9, 40, 320)
        err = R.rel_err(R.hf_logits(C.load_hf_gguf(d / "model.gguf"), ids), R.hf_logits(tiny_models.hf(variant), ids))
        assert err == 0.0, f"{variant}: transformers reads the written GGUF differently (rel err {err})"


@pytest.mark.parametrize(
    "variant,qtype_name",
    [(v, t) for v in ["gqa_untied", "qwen2"] for t in ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]]
    + [("tied", "F32"), ("tied", "Q4_1")],
)
def test_tiny_gguf_logits(core, tiny_models, tmp_path, variant, qtype_name):
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    d = _gguf_model_dir(tiny_models, tmp_path, variant, qtype)
    ref_model = C.load_hf_gguf(d / "model.gguf")
    ids = _rand_ids(10, 50, 320)
    runner = core.ModelRunner(str(d), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(8)
    ours = runner.step_logits([("g", ids, 0, [5, 2, 7, 0])])
    err = R.rowwise_rel_err(ours, R.hf_logits(ref_model, ids))
    assert err.max() <= R.LOGITS_REL_TOL, (
        f"{variant} {qtype_name} GGUF: max rel err {err.max():.3g} at position {int(np.argmax(err))}"
    )


@pytest.mark.parametrize("variant", ["gqa_untied", "qwen2"])
def test_prepare_model_config_from_gguf(core, tiny_models, tmp_path, variant):
    """prepare_model's config.json, built from a GGUF's metadata alone, describes the model
    transformers reads from the same file: its architecture, and (with the engine) its logits."""
    import gguf

    from vllm_metal_rs import prepare_model as P

    src_dir = tmp_path / "gguf"
    src_dir.mkdir()
    gguf_path = C.write_tiny_gguf(src_dir / "model.gguf", tiny_models.path(variant), weight_type=gguf.GGMLQuantizationType.Q8_0)
    ref = C.load_hf_gguf(gguf_path)

    meta, tensors = P.read_gguf_metadata(gguf_path)
    config = P.build_config(meta, tensors)
    assert config["architectures"] == [type(ref).__name__]
    d = tmp_path / "prepared"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.gguf").symlink_to(gguf_path)

    ids = _rand_ids(12, 40, 320)
    runner = core.ModelRunner(str(d), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(8)
    ours = runner.step_logits([("g", ids, 0, [3, 1, 4])])
    err = R.rowwise_rel_err(ours, R.hf_logits(ref, ids))
    assert err.max() <= R.LOGITS_REL_TOL, f"{variant}: max rel err {err.max():.3g}"


def test_gguf_to_safetensors_is_transformers_reading(core, tiny_models, tmp_path):
    """The engine's float32 export of a quantized llama GGUF (for engines without a GGUF loader)
    holds the tensors transformers dequantizes from the file, Q/K rows in HF order."""
    import gguf
    from safetensors.numpy import load_file

    d = _gguf_model_dir(tiny_models, tmp_path, "gqa_untied", gguf.GGMLQuantizationType.Q4_1)
    ref = {k: v.detach().numpy() for k, v in C.load_hf_gguf(d / "model.gguf").state_dict().items()}
    n = core.gguf_to_safetensors(str(d), str(tmp_path / "out.safetensors"))
    ours = load_file(str(tmp_path / "out.safetensors"))
    assert n == len(ours) and set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    for name, a in ours.items():
        assert a.dtype == np.float32 and a.shape == ref[name].shape, name
        np.testing.assert_allclose(a, ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
