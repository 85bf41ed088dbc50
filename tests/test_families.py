"""Model families beyond Llama against transformers (float32): Qwen2, Qwen3, Mistral with a
sliding window, Gemma 2 / Gemma 3 / Gemma 4 (layers of two shapes, KV-shared layers, per-layer
inputs, experts beside the MLP), Phi-3 with longrope, Mixtral, Qwen3-MoE, SmolLM3 (NoPE
layers), GLM-4.5 (grouped sigmoid routing, shared experts, partial rotary) and gpt-oss (attention
sinks, windows, YaRN, biased clamped-SwiGLU experts).

Each family's tiny checkpoint (reference.FAMILY_VARIANTS) exercises what sets it apart. Per family,
one engine-level test compares logits of full prompts, of a paged run (chunked prefill, decode,
two interleaved requests) and greedy generation with transformers; one vllm.LLM run compares
greedy tokens. rel_err as in test_logits_vs_transformers (tolerance reference.LOGITS_REL_TOL).
"""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_files as C
import reference as R
from conftest import shutdown_llm

BLOCK_SIZE = 16
FAMILIES = list(R.FAMILY_VARIANTS)
GEN_TOKENS = 12


#: MLX quantization of each family's checkpoint: (group_size, bits, per-layer bits, experts stacked
#: as mlx-lm's switch_mlp). Both group sizes and bit widths occur; the MoE routers get 8 bits as a
#: per-layer override, as mlx-lm's converter gives them. gpt-oss's gate and up experts are MXFP4
#: (MLX's `mxfp4` mode: uint8 power-of-two scales, no biases), the rest affine: both in one directory.
QUANTIZED = {
    "qwen2": (64, 4, {}, False),
    "qwen3": (32, 8, {}, False),
    "mistral": (64, 8, {}, False),
    "gemma2": (32, 4, {}, False),
    "gemma3": (64, 4, {}, False),
    "phi3": (32, 4, {}, False),
    "mixtral": (64, 4, {"block_sparse_moe.gate": 8}, False),
    "qwen3_moe": (32, 4, {"mlp.gate": 8}, True),
    "smollm3": (32, 4, {"mlp.down_proj": 8}, False),
    "glm4_moe": (32, 4, {"mlp.gate": 8, "shared_experts.down_proj": 8}, True),
    "gpt_oss": (
        32,
        4,
        {"mlp.router": 8, "experts.down_proj": 8, "experts.gate_proj": "mxfp4", "experts.up_proj": "mxfp4"},
        False,
    ),
    "qwen3_next": (64, 4, {"mlp.gate": 8, "shared_expert_gate": 8}, True),
    "qwen3_5": (32, 8, {}, False),
    "qwen3_5_moe": (32, 4, {"mlp.gate": 8, "shared_expert_gate": 8}, True),
    # Gemma 4's experts stay float (transformers' stacked `experts.gate_up_proj`, no `.weight`).
    "gemma4": (32, 4, {"router.proj": 8}, False),
}
#: mlx-lm's own layout of the hybrid families (`checkpoint_files._mlx_lm_hybrid`): Qwen3.5 as its
#: vision-language class writes it.
HYBRID_LAYOUT = {"qwen3_next": "text", "qwen3_5": "vl", "qwen3_5_moe": "vl"}
#: Families whose vllm.LLM run uses the quantized directory (and transformers the dequantized one).
VLLM_QUANTIZED = {"mixtral", "qwen3_moe", "glm4_moe", "gpt_oss", "qwen3_5_moe"}

_quantized_dirs: dict[str, tuple] = {}


def _quantized(tiny_models, family):
    """(quantized dir, dequantized float32 dir) of a family, made once per session."""
    if family not in _quantized_dirs:
        gs, bits, layer_bits, stack = QUANTIZED[family]
        root = tiny_models.root / "mlx-quantized"
        _quantized_dirs[family] = C.write_mlx_quantized(
            tiny_models.path(family),
            root / f"{family}-q{bits}g{gs}",
            root / f"{family}-dequantized",
            group_size=gs,
            bits=bits,
            layer_bits=layer_bits,
            stack_experts=stack,
            hybrid_layout=HYBRID_LAYOUT.get(family),
        )
    return _quantized_dirs[family]


def _rand_ids(seed: int, n: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(R.NUM_SPECIAL, vocab, size=n).tolist()


#: Config changes that remove a family's peculiarity (a list: each of several). The same weights
#: with the change must give clearly different transformers logits on the test prompts, or
#: matching them would prove nothing. `FILL` sets weights (by name suffix) to a value instead.
#: (Qwen2's biases and Qwen3's q/k norms are weights: a model without them would not load them.)
FILL = "fill_weights"
PECULIARITY_OFF = {
    "mistral": {"sliding_window": None},
    "gemma2": {"attn_logit_softcapping": None, "final_logit_softcapping": None},
    "gemma3": {"sliding_window": 4096},
    "phi3": {"original_max_position_embeddings": 4096},
    "mixtral": {"num_experts_per_tok": 1},
    "qwen3_moe": {"num_experts_per_tok": 1},
    "smollm3": {"no_rope_layers": [1, 1, 1]},
    "glm4_moe": [
        {"n_group": 1, "topk_group": 1},
        {FILL: ("e_score_correction_bias", 0.0)},
        {"routed_scaling_factor": 1.0},
        {"norm_topk_prob": False},
        {"rope_parameters": {"rope_type": "default", "rope_theta": R.TINY_VARIANTS["glm4_moe"].rope_theta,
                             "partial_rotary_factor": 1.0}},
    ],
    "gpt_oss": [
        {FILL: ("self_attn.sinks", float("-inf"))},
        {"sliding_window": 4096},
        {"rope_parameters": {"rope_type": "default", "rope_theta": R.TINY_VARIANTS["gpt_oss"].rope_theta}},
        {"swiglu_limit": 1000.0},
        {"num_experts_per_tok": 1},
    ],
    "gemma4": [
        {"sliding_window": 4096},
        {"final_logit_softcapping": None},
        {FILL: ("layer_scalar", 1.0)},
        {FILL: ("per_layer_projection.weight", 0.0)},
        {FILL: ("router.per_expert_scale", 1.0)},
        {"top_k_experts": 1},
        {"rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": 1000000.0},
        }},
    ],
}
_OFF_CASES = [
    (family, off)
    for family, offs in PECULIARITY_OFF.items()
    for off in (offs if isinstance(offs, list) else [offs])
]


@pytest.mark.parametrize(
    "family,off", _OFF_CASES, ids=[f"{f}-{'-'.join(map(str, off))}" for f, off in _OFF_CASES]
)
def test_family_peculiarity_is_visible(tiny_models, family, off):
    import torch

    spec = R.TINY_VARIANTS[family]
    path = tiny_models.path(family)
    off = dict(off)
    fill = off.pop(FILL, None)
    if family == "phi3":
        # Long factors apply beyond the original context: prompts of 100 tokens use them.
        import json

        rope = json.loads((path / "config.json").read_text())["rope_parameters"]
        off = {"rope_parameters": dict(rope, original_max_position_embeddings=4096), **off}
    plain = R.load_hf(path, **off)
    if fill is not None:
        suffix, value = fill
        tensors = [t for n, t in plain.state_dict().items() if n.endswith(suffix)]
        assert tensors, f"{family}: no weights named *{suffix}"
        with torch.no_grad():
            for t in tensors:
                t.fill_(value)
    ids = _rand_ids(7, 100, spec.vocab_size)
    err = R.rowwise_rel_err(R.hf_logits(tiny_models.hf(family), ids), R.hf_logits(plain, ids))
    assert err.max() > 100 * R.LOGITS_REL_TOL, f"{family}: {off or fill} barely changes logits ({err.max():.3g})"


def _check_rows(ours, ref, what):
    err = R.rowwise_rel_err(ours, ref)
    assert err.max() <= R.LOGITS_REL_TOL, (
        f"{what}: max rel err {err.max():.3g} at position {int(np.argmax(err))} (> {R.LOGITS_REL_TOL})"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(core, tiny_models, family):
    spec = R.TINY_VARIANTS[family]
    hf = tiny_models.hf(family)
    runner = core.ModelRunner(str(tiny_models.path(family)), block_size=BLOCK_SIZE)
    assert runner.head_dim == spec.head_dim and runner.num_layers == spec.num_layers
    if family == "gemma4":
        # Layers 0-2 keep K/V (global rows 2 x 32, local 2 x 16); 3 and 4 read layers 2 and 1's.
        assert runner.kv_layers == [(2, 16, R._WINDOW), (2, 32, None), (2, 16, R._WINDOW)]
    runner.allocate_kv_cache(48)
    perm = np.random.default_rng(spec.seed).permutation(48).tolist()

    # Full prompts: 100 tokens (beyond the windows and Phi-3's original context), and 40.
    for n, blocks in [(100, perm[:7]), (40, perm[7:10])]:
        ids = _rand_ids(100 + spec.seed + n, n, spec.vocab_size)
        _check_rows(runner.step_logits([("full", ids, 0, blocks)]), R.hf_logits(hf, ids), f"{family} prompt {n}")

    # Paged: A prefills 30 + 27 then decodes past its window; B (prompt 9) decodes alongside.
    a = R.PagedRequest("A", _rand_ids(1, 66, spec.vocab_size), perm[10:15], BLOCK_SIZE)
    b = R.PagedRequest("B", _rand_ids(2, 19, spec.vocab_size), perm[15:17], BLOCK_SIZE)
    schedule = [[("A", 30), ("B", 9)], [("B", 1), ("A", 27)]] + [[("A", 1), ("B", 1)]] * 9
    reqs = {"A": a, "B": b}
    for step in schedule:
        out = runner.step_logits([reqs[rid].chunk(n) for rid, n in step])
        row = 0
        for rid, n in step:
            reqs[rid].advance(n, out[row : row + n])
            row += n
    for r in reqs.values():
        assert r.pos == len(r.tokens), f"test bug: {r.req_id} at {r.pos} of {len(r.tokens)}"
        n = len(r.tokens)
        if family == "phi3" and n > 64:
            # Longrope picks its factors by the sequence length of each step: A's prefill (57
            # tokens) ran on the short ones, as transformers' forward of those 57 tokens does.
            n = 57
        ours = np.stack([r.logits[p] for p in range(n)])
        ref = R.hf_logits(hf, r.tokens[:n])
        _check_rows(ours, ref, f"{family} paged {r.req_id}")

    # Greedy generation, batched, against transformers' greedy.
    prompts = [_rand_ids(200 + i, n, spec.vocab_size) for i, n in enumerate([5, 37])]
    ours = runner.generate(prompts, GEN_TOKENS, temperature=0.0)
    for i, (p, o) in enumerate(zip(prompts, ours)):
        ref, ref_logits = R.hf_greedy(hf, p, GEN_TOKENS)
        note = R.check_greedy_match(o, ref, ref_logits, what=f"{family} prompt {i}")
        if note:
            print(note)


def test_phi3_partial_rotary(core, tiny_models):
    """Phi-3 rotating 12 of 16 features per head (longrope, prompts on the short and the long
    factors): full prompts against transformers, which visibly differs with the whole head rotated."""
    import json

    name = "phi3_partial"
    spec, path, hf = R.TINY_VARIANTS[name], tiny_models.path(name), tiny_models.hf(name)
    runner = core.ModelRunner(str(path), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(16)
    for n in (100, 40):
        ids = _rand_ids(500 + n, n, spec.vocab_size)
        _check_rows(runner.step_logits([("p", ids, 0, list(range(7)))]), R.hf_logits(hf, ids), f"{name} prompt {n}")
    rope = json.loads((path / "config.json").read_text())["rope_parameters"]
    full = dict(rope, partial_rotary_factor=1.0, short_factor=[1.0] * 8, long_factor=[1.0] * 8)
    ids = _rand_ids(7, 100, spec.vocab_size)
    err = R.rel_err(R.hf_logits(R.load_hf(path, rope_parameters=full), ids), R.hf_logits(hf, ids))
    assert err > 100 * R.LOGITS_REL_TOL, f"rotating the whole head barely changes logits ({err:.3g})"


def test_gemma4_multimodal_checkpoint_runs_its_text_stack(core, tiny_models):
    """A Gemma4ForConditionalGeneration directory (text_config, a vision tower, weights under
    model.language_model.*) runs its text stack; image / video / audio placeholder tokens embed as
    padding, as transformers' forward does for input ids alone."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    spec = R.TINY_VARIANTS["gemma4"]
    out = tiny_models.root / "gemma4-multimodal"
    placeholders = {"image_token_id": 300, "video_token_id": 301, "audio_token_id": 302}
    if not (out / "config.json").is_file():
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8)
        cfg = Gemma4Config(text_config=R._hf_config(spec).to_dict(), vision_config=vision,
                           tie_word_embeddings=True, **placeholders)
        model = Gemma4ForConditionalGeneration(cfg).to(torch.float32).eval()
        R.randomize_(model, spec)
        model.save_pretrained(out)
    hf = Gemma4ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    runner = core.ModelRunner(str(out), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(8)
    ids = _rand_ids(700, 60, spec.vocab_size)
    ids[5], ids[17], ids[30] = placeholders.values()

    def logits(token_ids):
        with torch.no_grad():
            return hf(input_ids=torch.tensor([token_ids])).logits[0].float().numpy()

    ref = logits(ids)
    _check_rows(runner.step_logits([("m", ids, 0, [4, 1, 6, 2])]), ref, "gemma4 multimodal checkpoint")
    # The placeholders matter: as ordinary tokens they would give clearly different logits.
    plain = [3 if i in (5, 17, 30) else t for i, t in enumerate(ids)]
    assert R.rel_err(logits(plain), ref) > 100 * R.LOGITS_REL_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_family_half_precision_checkpoint(core, tiny_models, family):
    """The checkpoint saved in bfloat16 (float16 for one family in three), against transformers
    running the rounded weights in float32 (the CPU backend computes in float32)."""
    import torch

    spec = R.TINY_VARIANTS[family]
    dtype = torch.float16 if FAMILIES.index(family) % 3 == 2 else torch.bfloat16
    src = tiny_models.path(family)
    out = tiny_models.root / "half" / f"{family}-{str(dtype).removeprefix('torch.')}"
    if not (out / "config.json").is_file():
        R.load_hf(src).to(dtype).save_pretrained(out)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "generation_config", "special_tokens")):
                (out / f.name).write_bytes(f.read_bytes())
    runner = core.ModelRunner(str(out), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(8)
    ids = _rand_ids(600 + spec.seed, 60, spec.vocab_size)
    ours = runner.step_logits([("h", ids, 0, [5, 2, 7, 0])])
    ref = R.hf_logits(R.load_hf(out), ids)
    _check_rows(ours, ref, f"{family} {dtype} checkpoint")
    # The rounding is visible: the float32 weights give clearly different logits.
    assert R.rel_err(R.hf_logits(tiny_models.hf(family), ids), ref) > 10 * R.LOGITS_REL_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_family_mlx_quantized(core, tiny_models, family):
    """An mlx-community-style directory (weight/scales/biases, config.json "quantization") against
    transformers running MLX's dequantization of the same weights."""
    import json

    quantized, dequantized = _quantized(tiny_models, family)
    cfg = json.loads((quantized / "config.json").read_text())
    gs, bits, layer_bits, stack = QUANTIZED[family]
    per_layer = [k for k, v in cfg["quantization"].items() if isinstance(v, dict)]
    assert cfg["quantization"]["bits"] == bits and bool(per_layer) == bool(layer_bits), cfg["quantization"]
    spec = R.TINY_VARIANTS[family]
    runner = core.ModelRunner(str(quantized), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(8)
    ids = _rand_ids(400 + spec.seed, 60, spec.vocab_size)
    ours = runner.step_logits([("q", ids, 0, [3, 1, 6, 4])])
    ref = R.hf_logits(R.load_hf(dequantized), ids)
    _check_rows(ours, ref, f"{family} MLX {bits}-bit group {gs}")
    # The quantization is visible: the original float32 weights give clearly different logits.
    assert R.rel_err(R.hf_logits(tiny_models.hf(family), ids), ref) > 100 * R.LOGITS_REL_TOL


# --------------------------------------------------------------------------------------------------
# Through vllm.LLM: greedy tokens equal transformers' (the window and MoE paths under vLLM's
# scheduler, with chunked prefill so prompts run in several steps).
# --------------------------------------------------------------------------------------------------


#: KV blocks vLLM gets, in blocks of one KV-cache group: few enough that four requests do not fit
#: together, so blocks are freed (windows), preempted and reused. vLLM's hybrid manager gives each
#: of Gemma's three layers (local, global, local) its own group, overlaid in one storage. With
#: async scheduling (vLLM's default) a sliding-window group reserves room for two batches in
#: flight, which 20 blocks no longer hold for a 128-token request.
VLLM_KV_BLOCKS = 24
#: Layers per KV-cache group (vLLM's plan for the tiny checkpoints).
_GROUP_LAYERS = {"gemma2": 1, "gemma3": 1, "gpt_oss": 1, "gemma4": 1, "qwen3_next": 1, "qwen3_5": 1, "qwen3_5_moe": 1}
#: The largest K/V row of a KV layer over the config's num_key_value_heads x head_dim.
_ROW_RATIO = {"gemma4": 2}


#: Families whose vllm.LLM runs are elsewhere: the hybrids' in test_hybrid.py (with and
#: without prefix caching, a prefix hit, chunked prefills); qwen3_5_moe's run here covers their
#: preemption.
VLLM_ELSEWHERE = {"qwen3_next", "qwen3_5"}


@pytest.mark.vllm
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in VLLM_ELSEWHERE])
def test_family_vllm_greedy(tiny_models, family):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = R.TINY_VARIANTS[family]
    prompts = [_rand_ids(300 + i, n, spec.vocab_size) for i, n in enumerate([7, 45, 30, 50])]
    if family in VLLM_QUANTIZED:
        # vLLM's front end must take the mlx quantization keys (no quant_method) as they are.
        model, ref_model = _quantized(tiny_models, family)
        ref_model = R.load_hf(ref_model)
    else:
        model, ref_model = tiny_models.path(family), tiny_models.hf(family)
    refs = [R.hf_greedy(ref_model, p, GEN_TOKENS) for p in prompts]
    group_layers = _GROUP_LAYERS.get(family, spec.num_layers)
    # vLLM pads every layer's page to the largest (Gemma 4's global layers have larger rows).
    per_layer_block = spec.kv_bytes_per_block(BLOCK_SIZE) // spec.num_layers * _ROW_RATIO.get(family, 1)
    llm = LLM(
        model=str(model),
        dtype="float32",
        max_model_len=128,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=VLLM_KV_BLOCKS * group_layers * per_layer_block,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        enable_chunked_prefill=True,
        seed=0,
        disable_log_stats=False,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        preemptions = sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        shutdown_llm(llm)
    print(f"{family}: {preemptions} preemptions")
    for i, (o, (ref, logits)) in enumerate(zip(outs, refs)):
        note = R.check_greedy_match(list(o.outputs[0].token_ids), ref, logits, what=f"{family} vLLM prompt {i}")
        if note:
            print(note)
