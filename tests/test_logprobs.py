"""Sample and prompt logprobs through vllm.LLM, against log_softmax of transformers' logits; n > 1.

The tiny random model with small chunked-prefill steps (32 tokens), so a 70-token prompt's prompt
logprobs are gathered over three steps, and prefix caching on (vLLM skips reading the cache for
requests with prompt logprobs; the second identical request must still report every position).
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
from conftest import shutdown_llm

pytestmark = pytest.mark.vllm

TINY = "gqa_untied"
BLOCK_SIZE = 16
NUM_LOGPROBS = 5
NUM_PROMPT_LOGPROBS = 3
MAX_TOKENS = 8
#: Absolute tolerance on log-probabilities (values of order -5 in this vocabulary).
ATOL = 1e-4


@pytest.fixture(scope="module")
def llm(tiny_models):
    from vllm import LLM

    llm = LLM(
        model=str(tiny_models.path(TINY)),
        dtype="float32",
        max_model_len=256,
        block_size=BLOCK_SIZE,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        max_logprobs=NUM_LOGPROBS,
        seed=0,
    )
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    V = R.TINY_VARIANTS[TINY].vocab_size
    return [rng.integers(R.NUM_SPECIAL, V, size=n).tolist() for n in (70, 23)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _check_position(entry: dict, ref: np.ndarray, target: int, k: int, what: str) -> None:
    """One position's {token_id: Logprob}: the target token with its logprob and rank (tokens at
    least as likely, itself included), and the k most likely tokens ranked 1..k."""
    top = np.argsort(-ref)[:k].tolist()  # ties are not expected in a random float model
    assert set(entry) == set(top) | {target}, f"{what}: tokens {sorted(entry)}, expected top {top} + {target}"
    for tok, lp in entry.items():
        assert abs(lp.logprob - ref[tok]) < ATOL, f"{what}: token {tok} logprob {lp.logprob} vs {ref[tok]}"
    for r, tok in enumerate(top, start=1):
        assert entry[tok].rank == r, f"{what}: token {tok} rank {entry[tok].rank}, expected {r}"
    assert entry[target].rank == int((ref >= ref[target]).sum()), f"{what}: target rank {entry[target].rank}"


def _check_output(out, ref_model, prompt, k_sample, k_prompt) -> None:
    gen = list(out.outputs[0].token_ids)
    full = list(prompt) + gen
    ref = _log_softmax(R.hf_logits(ref_model, full[:-1]))
    logprobs = out.outputs[0].logprobs
    assert logprobs is not None and len(logprobs) == len(gen), "one logprobs entry per generated token"
    for j, tok in enumerate(gen):
        _check_position(logprobs[j], ref[len(prompt) - 1 + j], tok, k_sample, f"output token {j}")
    if k_prompt is not None:
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(prompt), "one prompt logprobs entry per prompt token"
        assert plp[0] is None, "the first prompt token has no logprob"
        for p in range(1, len(prompt)):
            _check_position(plp[p], ref[p - 1], prompt[p], k_prompt, f"prompt position {p}")


def test_greedy_logprobs_and_chunked_prompt_logprobs(llm, tiny_models, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logprobs=NUM_LOGPROBS,
        prompt_logprobs=NUM_PROMPT_LOGPROBS,
    )
    hf = tiny_models.hf(TINY)
    # Twice: the second run of the same prompts would hit the prefix cache without prompt logprobs.
    for attempt in range(2):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        for out, prompt in zip(outs, prompts):
            _check_output(out, hf, prompt, NUM_LOGPROBS, NUM_PROMPT_LOGPROBS)


def test_sampled_logprobs_are_raw_and_mixed_batches(llm, tiny_models, prompts):
    """Random draws report log_softmax of the unprocessed logits (vLLM's raw_logprobs default),
    whatever the temperature and penalties; a request without logprobs shares the batch."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    hf = tiny_models.hf(TINY)
    asking = SamplingParams(
        temperature=1.3,
        top_k=20,
        repetition_penalty=1.5,
        seed=11,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logprobs=2,
    )
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], [asking, plain], use_tqdm=False
    )
    _check_output(outs[0], hf, prompts[0], 2, None)
    assert outs[1].outputs[0].logprobs is None
    assert outs[0].outputs[0].cumulative_logprob == pytest.approx(
        sum(lp[t].logprob for lp, t in zip(outs[0].outputs[0].logprobs, outs[0].outputs[0].token_ids)),
        abs=1e-3,
    )


def test_n_completions_follow_child_seeds(llm, prompts):
    """n > 1 as vLLM routes it: child requests with seeds seed, seed + 1, ... — each equals the
    single request with that seed, and the run repeats."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = [TokensPrompt(prompt_token_ids=prompts[1])]
    kw = dict(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first, again = (
        sorted(tuple(c.token_ids) for c in llm.generate(prompt, SamplingParams(n=3, seed=123, **kw), use_tqdm=False)[0].outputs)
        for _ in range(2)
    )
    assert first == again, "the same seeded n=3 request gave different completions"
    assert len(set(first)) == 3, f"the three completions are not distinct: {first}"
    singles = sorted(
        tuple(llm.generate(prompt, SamplingParams(seed=123 + i, **kw), use_tqdm=False)[0].outputs[0].token_ids)
        for i in range(3)
    )
    assert singles == first, f"n=3 children {first}\n!= single requests {singles}"
