"""End to end through vllm.LLM (the plugin picked by its entry point, vLLM's scheduler in charge).

One LLM per configuration, shared by the tests of this module:
- the tiny random model (GQA, untied) with a KV pool small enough to force preemption, prefix
  caching and small chunked-prefill steps;
- the default model (SmolLM2-135M-Instruct GGUF).
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
from conftest import shutdown_llm

pytestmark = pytest.mark.vllm

TINY = "gqa_untied"
BLOCK_SIZE = 16
MAX_MODEL_LEN = 256
#: KV blocks the tiny engine gets: 16 usable (exactly MAX_MODEL_LEN tokens, the least vLLM accepts)
#: plus the null block vLLM's block pool holds back.
TINY_KV_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE + 1
MAX_TOKENS = 32
PREFIX_LEN = 48  # three full blocks shared by all prompts
SUFFIX_LENS = [3, 40, 11, 27, 6, 33, 17, 22]
MAX_LEN_DEFAULT = 1024  # default_llm's max_model_len


def _metric_total(llm, name: str) -> float:
    return float(sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name))


def _token_prompts(prompts):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]


def _greedy(max_tokens):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def tiny_prompts():
    rng = np.random.default_rng(42)
    V = R.TINY_VARIANTS[TINY].vocab_size
    prefix = rng.integers(R.NUM_SPECIAL, V, size=PREFIX_LEN).tolist()
    return [prefix + rng.integers(R.NUM_SPECIAL, V, size=n).tolist() for n in SUFFIX_LENS]


@pytest.fixture(scope="module")
def tiny_hf_greedy(tiny_models, tiny_prompts):
    hf = tiny_models.hf(TINY)
    return [R.hf_greedy(hf, p, MAX_TOKENS) for p in tiny_prompts]


def _tiny_llm(tiny_models, async_scheduling: bool):
    from vllm import LLM

    spec = R.TINY_VARIANTS[TINY]
    kv_bytes = TINY_KV_BLOCKS * spec.kv_bytes_per_block(BLOCK_SIZE, dtype_bytes=4)
    return LLM(
        model=str(tiny_models.path(TINY)),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=kv_bytes,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        seed=0,
        disable_log_stats=False,
        async_scheduling=async_scheduling,
    )


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):
    """With vLLM's async scheduling (its default)."""
    llm = _tiny_llm(tiny_models, async_scheduling=True)
    yield llm
    shutdown_llm(llm)


def test_tiny_kv_pool_is_the_requested_size(tiny_llm):
    blocks = tiny_llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert blocks is not None and blocks <= TINY_KV_BLOCKS, (
        f"vLLM got {blocks} KV blocks; kv_cache_memory_bytes asked for {TINY_KV_BLOCKS} "
        f"(float32, {R.TINY_VARIANTS[TINY].kv_bytes_per_block(BLOCK_SIZE)} bytes a block)"
    )


def test_greedy_matches_engine_alone_and_transformers(tiny_llm, core, tiny_models, tiny_prompts, tiny_hf_greedy):
    """(a) vLLM greedy == ModelRunner.generate == transformers greedy, for two prompts."""
    picked = [0, 3]
    prompts = [tiny_prompts[i] for i in picked]
    ours_vllm = _token_ids(tiny_llm.generate(_token_prompts(prompts), _greedy(MAX_TOKENS), use_tqdm=False))
    runner = core.ModelRunner(str(tiny_models.path(TINY)), block_size=BLOCK_SIZE)
    runner.allocate_kv_cache(32)
    ours_alone = runner.generate(prompts, MAX_TOKENS, temperature=0.0)
    assert ours_vllm == ours_alone, f"vLLM {ours_vllm}\n!= engine alone {ours_alone}"
    for i, toks in zip(picked, ours_vllm):
        ref, logits = tiny_hf_greedy[i]
        note = R.check_greedy_match(toks, ref, logits, what=f"vLLM prompt {i}")
        if note:
            print(note)


def test_preemption_prefix_cache_chunked_prefill(tiny_llm, tiny_prompts, tiny_hf_greedy):
    """(b) 8 prompts with a shared prefix, run one at a time and then all together on a KV pool too
    small for them: the same greedy tokens, and vLLM really preempted and hit its prefix cache."""
    alone = []
    for p in tiny_prompts:
        alone += _token_ids(tiny_llm.generate(_token_prompts([p]), _greedy(MAX_TOKENS), use_tqdm=False))

    preempt0 = _metric_total(tiny_llm, "vllm:num_preemptions")
    hits0 = _metric_total(tiny_llm, "vllm:prefix_cache_hits")
    together = _token_ids(tiny_llm.generate(_token_prompts(tiny_prompts), _greedy(MAX_TOKENS), use_tqdm=False))
    preemptions = _metric_total(tiny_llm, "vllm:num_preemptions") - preempt0
    hits = _metric_total(tiny_llm, "vllm:prefix_cache_hits") - hits0

    # What the 8 requests would hold at once if none were preempted (sharing the prefix blocks):
    need = PREFIX_LEN // BLOCK_SIZE + sum(
        -(-(len(p) + MAX_TOKENS) // BLOCK_SIZE) - PREFIX_LEN // BLOCK_SIZE for p in tiny_prompts
    )
    assert need > TINY_KV_BLOCKS, f"test bug: the workload needs only {need} blocks"

    problems = []
    for i, (a, t) in enumerate(zip(alone, together)):
        assert len(a) == MAX_TOKENS and len(t) == MAX_TOKENS, (i, len(a), len(t))
        ref, logits = tiny_hf_greedy[i]
        for what, toks in [("alone", a), ("together", t)]:
            try:
                note = R.check_greedy_match(toks, ref, logits, what=f"prompt {i} {what}")
            except AssertionError as e:
                problems.append(str(e))
                continue
            if note:
                print(note)
        if a != t and not any(f"prompt {i}" in p for p in problems):
            # Allowed only where transformers itself sees a near-tie (checked above for both).
            print(f"prompt {i}: alone and together differ at a near-tie")
    assert not problems, "\n".join(problems)
    assert preemptions > 0, (
        f"no preemption recorded (vllm:num_preemptions delta {preemptions}); the workload needs "
        f"~{need} blocks of a {TINY_KV_BLOCKS}-block pool"
    )
    assert hits > 0, f"no prefix-cache hits recorded (vllm:prefix_cache_hits delta {hits})"
    print(f"preemptions {preemptions:.0f}, prefix-cache hit tokens {hits:.0f}, blocks needed ~{need}")


def test_seeded_sampling_is_reproducible(tiny_llm, tiny_prompts):
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    prompts = _token_prompts(tiny_prompts[:3])
    a = _token_ids(tiny_llm.generate(prompts, params, use_tqdm=False))
    b = _token_ids(tiny_llm.generate(prompts, params, use_tqdm=False))
    assert a == b, f"same seed, different samples:\n{a}\n{b}"
    greedy = _token_ids(tiny_llm.generate(prompts, _greedy(16), use_tqdm=False))
    assert a != greedy, "temperature-1 sampling returned exactly the greedy tokens for 48 tokens"


def test_seeded_request_same_alone_and_in_mixed_batch(tiny_llm, tiny_prompts):
    """A seeded request's tokens do not depend on which other requests share its steps."""
    from vllm import SamplingParams

    prompts = _token_prompts(tiny_prompts)
    target = SamplingParams(temperature=0.9, top_k=50, max_tokens=12, seed=77, ignore_eos=True)
    others = [
        SamplingParams(temperature=0.0, max_tokens=5 + i, ignore_eos=True) if i % 3 == 0
        else SamplingParams(temperature=1.2, top_p=0.8, max_tokens=9, seed=i, ignore_eos=True) if i % 3 == 1
        else SamplingParams(temperature=0.7, max_tokens=14, presence_penalty=0.5, ignore_eos=True)
        for i in range(15)
    ]
    alone = _token_ids(tiny_llm.generate(prompts[:1], target, use_tqdm=False))[0]
    batch_prompts = [prompts[1 + i % (len(prompts) - 1)] for i in range(15)]
    mixed = tiny_llm.generate(prompts[:1] + batch_prompts, [target] + others, use_tqdm=False)
    assert _token_ids(mixed)[0] == alone, "a seeded request changed when batched with 15 others"


def _mixed_params():
    """One request per sampling path of the engine, all reproducible (seeded where they draw)."""
    from vllm import SamplingParams

    n = 14
    return [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_k=20, max_tokens=n, seed=5, ignore_eos=True),
        SamplingParams(temperature=1.1, top_p=0.8, min_p=0.05, max_tokens=n, seed=6, ignore_eos=True, logprobs=2),
        SamplingParams(
            temperature=0.8, max_tokens=n, seed=7, ignore_eos=True,
            presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.3,
        ),
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, max_tokens=n, seed=8, ignore_eos=True, min_tokens=6, stop_token_ids=[7, 9, 11]),
        SamplingParams(temperature=0.0, max_tokens=n + 5, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=n - 4, seed=9, ignore_eos=True),
    ]


def test_async_scheduling_matches_sync(tiny_llm, tiny_models, tiny_prompts):
    """vLLM's async scheduling (the next step built and submitted while this one runs, its input
    tokens read on the device) gives the tokens and logprobs of synchronous steps, on every
    sampling path — including the ones that need the tokens on the host (penalties) — and it
    really ran ahead: steps read their input tokens from the device."""
    assert tiny_llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    prompts = _token_prompts(tiny_prompts)
    params = _mixed_params()
    tiny_llm.collective_rpc("step_profile")  # drop earlier steps' timings
    ran_async = tiny_llm.generate(prompts, params, use_tqdm=False)
    profile = tiny_llm.collective_rpc("step_profile")[0]
    sync_llm = _tiny_llm(tiny_models, async_scheduling=False)
    try:
        assert not sync_llm.llm_engine.vllm_config.scheduler_config.async_scheduling
        ran_sync = sync_llm.generate(prompts, params, use_tqdm=False)
        sync_profile = sync_llm.collective_rpc("step_profile")[0]
    finally:
        shutdown_llm(sync_llm)

    assert _token_ids(ran_async) == _token_ids(ran_sync)
    for a, b in zip(ran_async, ran_sync):
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert (la is None) == (lb is None)
        for pa, pb in zip(la or [], lb or []):
            assert pa.keys() == pb.keys()
            for t in pa:
                assert abs(pa[t].logprob - pb[t].logprob) < 1e-4 and pa[t].rank == pb[t].rank
    device_fed = sum(t["device_tokens"] for t in profile)
    assert device_fed > 0, "async scheduling never fed a step's tokens from the device"
    assert sum(t["device_tokens"] for t in sync_profile) == 0
    print(f"async: {device_fed} input tokens read on the device over {len(profile)} steps")


# --------------------------------------------------------------------------------------------------
# The default model through vllm.LLM
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    from vllm import LLM

    llm = LLM(
        model=str(default_model_dir),
        dtype="float32",  # what ModelRunner(dtype=None) computes in on CPU, compared below
        max_model_len=MAX_LEN_DEFAULT,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        seed=0,
    )
    yield llm
    shutdown_llm(llm)


def test_default_model_chat_greedy_matches_engine_alone(default_llm, core, default_model_dir):
    from vllm import SamplingParams

    messages = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name three colors."}],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = default_llm.chat(messages, params, use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text, f"unexpected answer: {outs[0].outputs[0].text!r}"
    prompts = [list(o.prompt_token_ids) for o in outs]
    runner = core.ModelRunner(str(default_model_dir), block_size=16)
    runner.allocate_kv_cache(32)
    alone = runner.generate(prompts, 24, temperature=0.0)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == alone, f"vLLM {got}\n!= engine alone {alone}"


# --------------------------------------------------------------------------------------------------
# vLLM's default (fork) start of the engine core, from a process that has already used MLX
# --------------------------------------------------------------------------------------------------

_FORK_SCRIPT = r"""
import json, sys
import vllm_metal_rs._core as core
path, kv_bytes = sys.argv[1], int(sys.argv[2])
runner = core.ModelRunner(path, block_size=16)
runner.allocate_kv_cache(8)
prompt = [5, 17, 42, 99, 7, 3, 250]
runner.step_logits([("warm", prompt, 0, [3])])  # MLX has now run in this process
alone = runner.generate([prompt], 6)[0]
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=path, dtype="float32", max_model_len=128, block_size=16, kv_cache_memory_bytes=kv_bytes, seed=0)
out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                   SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
print("RESULT " + json.dumps({"alone": alone, "vllm": list(out[0].outputs[0].token_ids)}), flush=True)
"""


def test_llm_after_mlx_use_in_parent(tiny_models, tmp_path):
    """A user who ran the engine (or anything MLX) before creating vllm.LLM, with vLLM's default
    multiprocessing method: the engine core must start and generate, not hang."""
    import json
    import os
    import signal
    import subprocess
    import sys

    spec = R.TINY_VARIANTS[TINY]
    kv_bytes = 17 * spec.kv_bytes_per_block(BLOCK_SIZE)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    log = tmp_path / "fork.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SCRIPT, str(tiny_models.path(TINY)), str(kv_bytes)],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(
                "vllm.LLM hung (240 s) after MLX had run in the parent process (engine core forked "
                f"with live MLX threads?):\n{log.read_text()[-4000:]}"
            )
    text = log.read_text()
    assert rc == 0, f"subprocess failed (rc {rc}):\n{text[-4000:]}"
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    assert result["vllm"] == result["alone"], result


# --------------------------------------------------------------------------------------------------
# Extreme values through vllm.LLM: refused up front (ValueError) or served normally, and the
# engine's greedy answer to a reference prompt never changes.
# --------------------------------------------------------------------------------------------------

EXTREMES = [0, -1, 2**31, 2**63 - 1, 2**63, -(2**63), 1e308, float("nan")]
_AS_IS = lambda v: v  # noqa: E731
EXTREME_FIELDS = [
    ("temperature", _AS_IS),
    ("top_p", _AS_IS),
    ("top_k", _AS_IS),
    ("min_p", _AS_IS),
    ("seed", _AS_IS),
    ("presence_penalty", _AS_IS),
    ("frequency_penalty", _AS_IS),
    ("repetition_penalty", _AS_IS),
    ("max_tokens", _AS_IS),
    ("min_tokens", _AS_IS),
    ("logprobs", _AS_IS),
    ("prompt_logprobs", _AS_IS),
    ("n", _AS_IS),
    ("logit_bias", lambda v: {5: v}),
    ("logit_bias", lambda v: {v: 1.0}),
    ("allowed_token_ids", lambda v: [v]),
    ("stop_token_ids", lambda v: [v]),
    ("prompt_token_ids", lambda v: [v]),
]


def test_extreme_values_through_llm(default_llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    def reference() -> str:
        out = default_llm.generate(
            ["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False
        )
        return out[0].outputs[0].text

    expected = reference()
    refused = served = 0
    for name, wrap in EXTREME_FIELDS:
        for value in EXTREMES:
            what = f"{name}={wrap(value)!r}"
            prompt = "Hi"
            kwargs = {"temperature": 0.0, "max_tokens": 2}
            if name == "prompt_token_ids":
                prompt = TokensPrompt(prompt_token_ids=wrap(value))
            else:
                kwargs[name] = wrap(value)
            if name == "max_tokens":
                # vLLM stops a huge max_tokens at max_model_len: a prompt 4 tokens short of it.
                prompt = TokensPrompt(prompt_token_ids=[42] * (MAX_LEN_DEFAULT - 4))
            try:
                outs = default_llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)
            except (ValueError, TypeError, OverflowError, VLLMValidationError) as e:
                # Refused before the engine saw it, with a reason.
                assert str(e).strip(), f"{what}: refused without a reason"
                refused += 1
            else:
                for o in outs[0].outputs:
                    assert o.finish_reason in ("stop", "length"), f"{what}: finished with {o.finish_reason}"
                served += 1
            assert reference() == expected, f"{what}: the reference answer changed"
    print(f"{served} served, {refused} refused")


# --------------------------------------------------------------------------------------------------
# Fault isolation: a request the engine cannot serve, or a step that fails, fails its own requests
# (finish_reason "error", HTTP 500 on the server) and the engine serves the next ones as before.
# --------------------------------------------------------------------------------------------------


def _inject_fault(llm, stage: str) -> None:
    llm.collective_rpc("inject_fault", args=(stage,))


@pytest.fixture(scope="module")
def wide_tokenizer_llm(tiny_models, tmp_path_factory):
    """The tiny model with a tokenizer 64 ids wider than its vocabulary: vLLM accepts those ids
    (they are the tokenizer's), and the engine cannot embed them."""
    import shutil

    from vllm import LLM

    spec = R.TINY_VARIANTS[TINY]
    model_dir = tmp_path_factory.mktemp("wide") / "model"
    shutil.copytree(tiny_models.path(TINY), model_dir)
    R.build_tokenizer(spec.vocab_size + 64).save_pretrained(model_dir)
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=64 * spec.kv_bytes_per_block(BLOCK_SIZE, dtype_bytes=4),
        max_num_seqs=8,
        seed=0,
    )
    yield llm
    shutdown_llm(llm)


def test_a_request_the_engine_cannot_embed_fails_alone(wide_tokenizer_llm, tiny_prompts):
    llm = wide_tokenizer_llm
    good = [tiny_prompts[i] for i in (0, 2, 4)]
    expected = _token_ids(llm.generate(_token_prompts(good), _greedy(8), use_tqdm=False))
    bad = good[1][:5] + [R.TINY_VARIANTS[TINY].vocab_size + 10]
    outs = llm.generate(_token_prompts([good[0], bad, good[1], good[2]]), _greedy(8), use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error", outs[1].outputs[0]
    assert [o.outputs[0].finish_reason for i, o in enumerate(outs) if i != 1] == ["length"] * 3
    assert _token_ids([outs[0], outs[2], outs[3]]) == expected
    assert _token_ids(llm.generate(_token_prompts(good), _greedy(8), use_tqdm=False)) == expected


@pytest.mark.parametrize("stage", ["forward", "sample", "device"])
def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(wide_tokenizer_llm, tiny_prompts, stage):
    llm = wide_tokenizer_llm
    good = [tiny_prompts[i] for i in (1, 3)]
    expected = _token_ids(llm.generate(_token_prompts(good), _greedy(8), use_tqdm=False))
    _inject_fault(llm, stage)
    outs = llm.generate(_token_prompts(good), _greedy(8), use_tqdm=False)
    # The requests of the failed step (the first, which holds at least the first request) fail;
    # a request that was not in it is served as usual.
    finished = [o.outputs[0].finish_reason for o in outs]
    assert finished[0] == "error" and set(finished) <= {"error", "length"}, finished
    for o, want in zip(outs, expected):
        if o.outputs[0].finish_reason == "length":
            assert list(o.outputs[0].token_ids) == want
    assert _token_ids(llm.generate(_token_prompts(good), _greedy(8), use_tqdm=False)) == expected
