"""The engine's sampler against vLLM's own torch implementations, and its draws against the
analytically filtered distribution.

`_core.process_logits` / `filter_logits` / `sample_tokens` run the engine's sampler (MLX, Rust) on
a logits batch given by the test; each row is a dict of vLLM SamplingParams field names plus the
request's "prompt" / "output" tokens and the draw's PRNG "key".
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

V = 300  # vocabulary of the synthetic logits


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal((rows, V)) * 3).astype(np.float32)


def _tokens(g: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in g.integers(0, V, n)]


def _assert_logits_equal(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    ours_inf, ref_inf = np.isneginf(ours), np.isneginf(ref)
    assert (ours_inf == ref_inf).all(), (
        f"{what}: masked positions differ in {int((ours_inf != ref_inf).sum())} places"
    )
    finite = ~ref_inf
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-5, atol=1e-5, err_msg=what)


def test_penalties_match_vllm(core):
    from vllm.model_executor.layers.utils import apply_penalties

    g = np.random.default_rng(1)
    n = 6
    logits = _logits(n)
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": _tokens(g, 20 + 7 * i),
                "output": _tokens(g, 3 * i),  # row 0: no output yet
                "presence_penalty": [0.0, 0.5, -0.3, 1.2, 0.0, 2.0][i],
                "frequency_penalty": [0.0, 0.2, 0.0, -0.4, 0.7, 1.5][i],
                "repetition_penalty": [1.0, 1.3, 0.8, 1.0, 2.0, 1.1][i],
            }
        )
    ours = core.process_logits(logits, rows)

    def padded(key):
        width = max(1, max(len(r[key]) for r in rows))
        return torch.tensor([r[key] + [V] * (width - len(r[key])) for r in rows], dtype=torch.int64)

    ref = apply_penalties(
        torch.from_numpy(logits.copy()),
        padded("prompt"),
        padded("output"),
        torch.tensor([r["presence_penalty"] for r in rows]),
        torch.tensor([r["frequency_penalty"] for r in rows]),
        torch.tensor([r["repetition_penalty"] for r in rows]),
    ).numpy()
    assert not np.allclose(ref, logits), "the penalties chosen do not change the logits"
    _assert_logits_equal(ours, ref, "penalties")


def _vllm_processor(cls, rows, params_list):
    """A vLLM builtin logits processor with the rows added as a persistent batch."""
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=len(rows)))
    proc = cls(config, torch.device("cpu"), False)
    added = [(i, p, r.get("prompt", []), r.get("output", [])) for i, (r, p) in enumerate(zip(rows, params_list))]
    proc.update_state(BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[]))
    return proc


def test_logit_bias_and_min_tokens_match_vllm(core):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinTokensLogitsProcessor,
    )

    g = np.random.default_rng(2)
    logits = _logits(4, seed=3)
    specs = [
        dict(logit_bias={5: 3.0, 17: -2.5, 299: 100.0}, min_tokens=0, stop_token_ids=[]),
        dict(logit_bias={}, min_tokens=5, stop_token_ids=[2, 7, 11]),
        dict(logit_bias={0: -100.0}, min_tokens=2, stop_token_ids=[9]),
        dict(logit_bias={}, min_tokens=0, stop_token_ids=[3]),
    ]
    outputs = [_tokens(g, 1), _tokens(g, 3), _tokens(g, 2), _tokens(g, 4)]
    params_list = []
    rows = []
    for spec, out in zip(specs, outputs):
        p = SamplingParams(
            logit_bias=spec["logit_bias"] or None,
            min_tokens=spec["min_tokens"],
            stop_token_ids=spec["stop_token_ids"],
        )
        params_list.append(p)
        rows.append({**spec, "output": out, "prompt": _tokens(g, 5)})

    ref = torch.from_numpy(logits.copy())
    for cls in (LogitBiasLogitsProcessor, MinTokensLogitsProcessor):
        ref = _vllm_processor(cls, rows, params_list).apply(ref)
    ref = ref.numpy()
    # Row 1 is still under min_tokens (3 of 5): its stop ids must be masked; row 2 is not.
    assert np.isneginf(ref[1, [2, 7, 11]]).all() and not np.isneginf(ref[2, 9])
    _assert_logits_equal(core.process_logits(logits, rows), ref, "logit_bias + min_tokens")


def test_allowed_tokens_and_bad_words_match_vllm(core):
    from vllm.v1.sample.ops.bad_words import apply_bad_words

    logits = _logits(3, seed=4)
    rows = [
        {"allowed_token_ids": [1, 4, 9, 250], "output": [8, 8]},
        {"bad_words": [[7], [3, 4, 5], [8, 9]], "output": [1, 3, 4]},
        {"bad_words": [[8, 9]], "output": [2, 8]},
    ]
    ref = torch.from_numpy(logits.copy())
    mask = torch.ones(V, dtype=torch.bool)
    mask[rows[0]["allowed_token_ids"]] = False
    ref[0].masked_fill_(mask, float("-inf"))
    apply_bad_words(ref, {1: rows[1]["bad_words"], 2: rows[2]["bad_words"]}, [r["output"] for r in rows])
    ref = ref.numpy()
    assert np.isneginf(ref[1, [7, 5]]).all() and not np.isneginf(ref[1, 9]) and np.isneginf(ref[2, 9])
    _assert_logits_equal(core.process_logits(logits, rows), ref, "allowed_token_ids + bad_words")


@pytest.mark.parametrize(
    "spec",
    [
        dict(temperature=0.7, min_p=0.05),
        dict(temperature=1.3, top_k=20),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.5, top_k=50, top_p=0.9),
        dict(temperature=1.0, min_p=0.02, top_k=40, top_p=0.95),
    ],
)
def test_temperature_min_p_top_k_top_p_match_vllm(core, spec):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    n = 4
    logits = _logits(n, seed=5)
    rows = [dict(spec) for _ in range(n)]
    ref = torch.from_numpy(logits.copy()) / spec["temperature"]
    if spec.get("min_p"):
        params = [SamplingParams(temperature=spec["temperature"], min_p=spec["min_p"]) for _ in rows]
        ref = _vllm_processor(MinPLogitsProcessor, rows, params).apply(ref)
    k = torch.full((n,), spec["top_k"], dtype=torch.int64) if "top_k" in spec else None
    p = torch.full((n,), spec["top_p"], dtype=torch.float32) if "top_p" in spec else None
    ref = apply_top_k_top_p_pytorch(ref, k, p, allow_cpu_sync=True).numpy()
    assert np.isneginf(ref).any(), "the filter chosen removes nothing"
    _assert_logits_equal(core.filter_logits(logits, rows), ref, f"filter {spec}")


def _analytic(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The distribution a draw must follow, written out from the definitions."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    if min_p > 0:
        keep &= p >= min_p * p.max()
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        mass_before = np.cumsum(q[order]) - q[order]
        keep[order[mass_before >= top_p]] = False
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def _chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    # Survival function of chi2(df): regularized upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0, dtype=torch.float64)))


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.6, 0, 1.0, 0.0),
        (1.0, 4, 1.0, 0.0),
        (1.0, 0, 0.7, 0.0),
        (1.5, 5, 0.9, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.8, 6, 0.95, 0.05),
    ],
)
def test_draws_follow_the_filtered_distribution(core, temperature, top_k, top_p, min_p):
    base = np.log(np.array([0.22, 0.18, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02], dtype=np.float64))
    draws = 20_000
    logits = np.tile(base.astype(np.float32), (draws, 1))
    spec = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [{**spec, "key": 7919 * i + 13} for i in range(draws)]
    tokens = np.array(core.sample_tokens(logits, rows))
    expected_p = _analytic(base, temperature, top_k, top_p, min_p)
    banned = expected_p == 0
    picked_banned = np.isin(tokens, np.flatnonzero(banned))
    assert not picked_banned.any(), f"drew filtered-out tokens {sorted(set(tokens[picked_banned]))}"
    counts = np.bincount(tokens, minlength=len(base))[~banned].astype(np.float64)
    p = _chi_square_p(counts, expected_p[~banned] * draws)
    assert p > 1e-3, f"chi-square p={p:.2e}: counts {counts.tolist()} vs {np.round(expected_p[~banned] * draws).tolist()}"


# Twelve likely tokens spread over a 1000-token vocabulary: some share a 32-token block, one sits
# in the last, partial block; the rest of the vocabulary has no mass.
SPREAD_IDS = [3, 17, 40, 41, 300, 301, 302, 511, 640, 700, 960, 999]


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (1.2, 6, 0.9, 0.0)],
)
def test_draws_over_a_wide_vocabulary_follow_the_filtered_distribution(core, temperature, top_k, top_p, min_p):
    base = np.full(1000, -1e4, dtype=np.float64)
    base[SPREAD_IDS] = np.log(np.linspace(1.0, 3.0, len(SPREAD_IDS)))
    draws = 20_000
    logits = np.tile(base.astype(np.float32), (draws, 1))
    spec = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tokens = np.array(core.sample_tokens(logits, [{**spec, "key": 104729 * i + 7} for i in range(draws)]))
    expected_p = _analytic(base, temperature, top_k, top_p, min_p)
    allowed = np.flatnonzero(expected_p > 0)
    assert np.isin(tokens, allowed).all(), f"drew filtered-out tokens {sorted(set(tokens[~np.isin(tokens, allowed)]))}"
    counts = np.bincount(tokens, minlength=1000)[allowed].astype(np.float64)
    p = _chi_square_p(counts, expected_p[allowed] * draws)
    assert p > 1e-3, f"chi-square p={p:.2e}: counts {counts.tolist()} vs {np.round(expected_p[allowed] * draws).tolist()}"


def test_greedy_rows_ignore_noise_but_see_processors(core):
    logits = _logits(2, seed=9)
    top = int(np.argmax(logits[0]))
    rows = [{"temperature": 0.0, "key": 1}, {"temperature": 0.0, "key": 2, "logit_bias": {top: -1000.0}}]
    out = core.sample_tokens(np.stack([logits[0], logits[0]]), rows)
    assert out[0] == top
    second = int(np.argsort(-logits[0])[1])
    assert out[1] == second, "greedy choice must follow logit_bias (vLLM applies it before argmax)"


def test_same_key_same_draw_regardless_of_batch(core):
    logits = _logits(16, seed=11)
    rows = [{"temperature": 1.0, "top_p": 0.9, "key": 100 + i} for i in range(16)]
    together = core.sample_tokens(logits, rows)
    alone = [core.sample_tokens(logits[i : i + 1], [rows[i]])[0] for i in range(16)]
    assert together == alone
    assert len(set(core.sample_tokens(np.tile(logits[:1], (64, 1)), [{"temperature": 1.0, "key": k} for k in range(64)]))) > 1, (
        "different keys always drew the same token"
    )
