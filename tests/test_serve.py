"""`vllm serve` on the default model, exercised with the OpenAI client."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import http_get, tail, vllm_server

pytestmark = pytest.mark.vllm

MODEL_NAME = "smollm2-test"
STARTUP_TIMEOUT_S = float(os.environ.get("VMR_SERVE_STARTUP_TIMEOUT", "300"))
KV_CACHE_BYTES = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    args = [
        str(default_model_dir),
        "--served-model-name", MODEL_NAME,
        "--max-model-len", "2048",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--seed", "0",
    ]
    log_path = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with vllm_server(args, log_path, STARTUP_TIMEOUT_S) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120.0, max_retries=0)


@pytest.fixture
def check_alive(server):
    yield
    assert server["proc"].poll() is None, f"vllm serve died:\n{tail(server['log'])}"


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_model(client, check_alive):
    ids = [m.id for m in client.models.list().data]
    assert MODEL_NAME in ids, f"/v1/models lists {ids}"


def test_chat_completion_stream_equals_non_stream(client, check_alive):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0.0, max_tokens=32)
    choice = resp.choices[0]
    text = choice.message.content
    assert text and text.strip(), f"empty chat completion: {resp}"
    assert "Paris" in text, f"greedy SmolLM2 answer does not mention Paris: {text!r}"
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0, resp.usage

    pieces, finish = [], None
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, temperature=0.0, max_tokens=32, stream=True
    )
    for chunk in stream:
        for c in chunk.choices:
            if c.delta and c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(pieces)
    assert len(pieces) > 1, f"stream came in {len(pieces)} piece(s)"
    assert streamed == text, f"stream {streamed!r}\n!= non-stream {text!r}"
    assert finish == choice.finish_reason, (finish, choice.finish_reason)


def test_completion_stream_equals_non_stream(client, check_alive):
    prompt = "The three primary colors are"
    resp = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0.0, max_tokens=24)
    text = resp.choices[0].text
    assert text and text.strip(), f"empty completion: {resp}"
    assert resp.usage.completion_tokens > 0, resp.usage
    streamed = "".join(
        c.text
        for chunk in client.completions.create(
            model=MODEL_NAME, prompt=prompt, temperature=0.0, max_tokens=24, stream=True
        )
        for c in chunk.choices
    )
    assert streamed == text, f"stream {streamed!r}\n!= non-stream {text!r}"


def test_concurrent_requests_match_sequential(client, check_alive):
    """Greedy answers do not depend on what else the server is batching."""
    questions = ["Name a fruit.", "What is 2 + 2?", "Say hello in French.", "What color is the sky?"]

    def ask(q):
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": q}], temperature=0.0, max_tokens=20
        )
        return r.choices[0].message.content

    sequential = [ask(q) for q in questions]
    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        concurrent = list(pool.map(ask, questions))
    assert all(s and s.strip() for s in sequential), sequential
    assert concurrent == sequential, f"concurrent {concurrent}\n!= sequential {sequential}"


def test_logit_bias_forces_a_token(client, check_alive, default_model_dir):
    """A +100 bias on one token makes greedy decoding emit nothing else."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    forced = tok.encode(" banana", add_special_tokens=False)[0]
    resp = client.completions.create(
        model=MODEL_NAME, prompt="My favourite", temperature=0.0, max_tokens=6,
        logit_bias={str(forced): 100}, extra_body={"return_token_ids": True},
    )
    ids = resp.choices[0].token_ids
    assert ids and all(t == forced for t in ids), f"logit_bias {forced}: got {ids}"


def test_min_tokens_respected(client, check_alive):
    """The chat answer normally stops early; with min_tokens it cannot stop before that."""
    short = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0.0, max_tokens=64)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40, short.usage
    long = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, temperature=0.0, max_tokens=64, extra_body={"min_tokens": 40}
    )
    assert long.usage.completion_tokens >= 40, long.usage


def test_penalties_change_greedy_output(client, check_alive):
    kw = dict(model=MODEL_NAME, prompt="one one one one one", temperature=0.0, max_tokens=16)
    plain = client.completions.create(**kw).choices[0].text
    penalised = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=1.0).choices[0].text
    assert plain != penalised, f"penalties had no effect: {plain!r}"
    assert penalised.lower().count("one") < plain.lower().count("one"), (plain, penalised)


def _check_top(chosen_logprob: float, top: list[tuple[str, float]], n: int) -> None:
    """Greedy: the chosen token is the most likely one; the list is n long and descending."""
    assert len(top) == n, f"{len(top)} top logprobs, asked for {n}"
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values), top
    assert abs(chosen_logprob - values[0]) < 1e-4, (chosen_logprob, top)


def test_chat_logprobs_stream_and_non_stream(client, check_alive):
    kw = dict(model=MODEL_NAME, messages=CHAT, temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=3)
    resp = client.chat.completions.create(**kw)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens, (len(content), resp.usage)
    # The stop token (EOS) is listed too, though not part of the text.
    assert "".join(c.token for c in content).startswith(resp.choices[0].message.content)
    for c in content:
        _check_top(c.logprob, [(t.token, t.logprob) for t in c.top_logprobs], 3)

    streamed = [
        c
        for chunk in client.chat.completions.create(**kw, stream=True)
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for c in choice.logprobs.content
    ]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert np.allclose([c.logprob for c in streamed], [c.logprob for c in content], atol=1e-4)


def test_completion_logprobs_and_prompt_logprobs(client, check_alive):
    prompt = "The three primary colors are"
    kw = dict(model=MODEL_NAME, prompt=prompt, temperature=0.0, max_tokens=8, logprobs=2)
    resp = client.completions.create(**kw, extra_body={"prompt_logprobs": 1, "return_token_ids": True})
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        _check_top(chosen, list(top.items()), 2)
    # vLLM's prompt_logprobs: None for the first prompt token, then {token_id: {logprob, rank, ...}}.
    plp = choice.prompt_logprobs
    assert len(plp) == resp.usage.prompt_tokens and plp[0] is None, plp[:2]
    for pos, entry in zip(choice.prompt_token_ids[1:], plp[1:]):
        assert str(pos) in entry and len(entry) in (1, 2), entry
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 for v in entry.values()), entry

    streamed = [
        (tok, chosen)
        for chunk in client.completions.create(**kw, stream=True)
        for c in chunk.choices
        if c.logprobs
        for tok, chosen in zip(c.logprobs.tokens, c.logprobs.token_logprobs)
    ]
    assert [t for t, _ in streamed] == lp.tokens
    assert np.allclose([v for _, v in streamed], lp.token_logprobs, atol=1e-4)


def test_response_format_json_schema(client, check_alive):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "population": {"type": "integer"},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "population", "capital"],
        "additionalProperties": False,
    }
    for temperature in (0.0, 0.9):
        resp = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Describe the largest city of France as JSON."}],
            temperature=temperature,
            seed=5,
            max_tokens=96,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        )
        text = resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "stop", (resp.choices[0].finish_reason, text)
        jsonschema.validate(json.loads(text), schema)


def test_structured_regex_and_choice(client, check_alive):
    import re

    pattern = r"[0-9]{3}-[a-z]{2,5}"
    regex = client.completions.create(
        model=MODEL_NAME, prompt="A product code:", temperature=0.7, seed=1, max_tokens=16,
        extra_body={"structured_outputs": {"regex": pattern}},
    ).choices[0].text
    assert re.fullmatch(pattern, regex), regex
    choices = ["yes", "no", "maybe"]
    picked = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Is the sky green?"}],
        temperature=0.0, max_tokens=8, extra_body={"structured_outputs": {"choice": choices}},
    ).choices[0].message.content
    assert picked in choices, picked


def test_metrics_endpoint(server, client, check_alive):
    # make sure at least one request has been served before reading the counters
    client.completions.create(model=MODEL_NAME, prompt="Hello", temperature=0.0, max_tokens=4)
    status, body = http_get(server["base"] + "/metrics")
    assert status == 200
    lines = [line for line in body.splitlines() if line.startswith("vllm:")]
    assert lines, f"/metrics has no vllm: metrics:\n{body[:2000]}"
    assert any(line.startswith("# TYPE vllm:") for line in body.splitlines()), "no Prometheus TYPE lines"
    gen = [line for line in lines if line.startswith("vllm:generation_tokens_total")]
    assert gen, f"no vllm:generation_tokens_total in /metrics:\n{body[:2000]}"
    assert sum(float(line.rsplit(" ", 1)[1]) for line in gen) > 0, gen


# --------------------------------------------------------------------------------------------------
# Extreme values: every field at the edges of its type answers 200 or 400, never takes the server
# down, and leaves the greedy answer of a reference request unchanged.
# --------------------------------------------------------------------------------------------------

EXTREMES = [0, -1, 2**31, 2**63 - 1, 2**63, -(2**63), 1e308, float("nan")]

# (endpoint, field, how the value goes in)
_AS_IS = lambda v: v  # noqa: E731
EXTREME_FIELDS = [
    ("completions", "temperature", _AS_IS),
    ("completions", "top_p", _AS_IS),
    ("completions", "top_k", _AS_IS),
    ("completions", "min_p", _AS_IS),
    ("completions", "seed", _AS_IS),
    ("completions", "presence_penalty", _AS_IS),
    ("completions", "frequency_penalty", _AS_IS),
    ("completions", "repetition_penalty", _AS_IS),
    ("completions", "max_tokens", _AS_IS),
    ("completions", "min_tokens", _AS_IS),
    ("completions", "logprobs", _AS_IS),
    ("completions", "prompt_logprobs", _AS_IS),
    ("completions", "n", _AS_IS),
    ("completions", "truncate_prompt_tokens", _AS_IS),
    ("completions", "priority", _AS_IS),
    ("completions", "logit_bias", lambda v: {"5": v}),
    ("completions", "logit_bias", lambda v: {str(v): 1.0}),
    ("completions", "allowed_token_ids", lambda v: [v]),
    ("completions", "stop_token_ids", lambda v: [v]),
    ("completions", "prompt", lambda v: [v]),
    ("chat/completions", "top_logprobs", _AS_IS),
    ("chat/completions", "max_completion_tokens", _AS_IS),
    ("chat/completions", "min_tokens", _AS_IS),
]


def _post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    import json

    # allow_nan: NaN goes out as the bare `NaN` token Python's (and the server's) JSON reads.
    data = json.dumps(body, allow_nan=True).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _reference_text(base: str) -> str:
    status, body = _post(
        base + "/v1/completions",
        {"model": MODEL_NAME, "prompt": "The capital of France is", "temperature": 0.0, "max_tokens": 6},
    )
    assert status == 200, body
    return body["choices"][0]["text"]


def test_issue_request_with_top_k_beyond_int64_is_served(server, check_alive):
    """The request that used to kill the server: top_k = 2^63 means "no top-k"."""
    status, body = _post(
        server["base"] + "/v1/completions",
        {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "top_k": 2**63, "temperature": 0.0},
    )
    assert status == 200, body
    plain = _post(
        server["base"] + "/v1/completions",
        {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "temperature": 0.0},
    )[1]
    assert body["choices"][0]["text"] == plain["choices"][0]["text"]


def test_extreme_values_never_take_the_server_down(server, check_alive):
    base = server["base"]
    reference = _reference_text(base)
    answers: dict[str, int] = {}
    for endpoint, name, wrap in EXTREME_FIELDS:
        for value in EXTREMES:
            body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0.0}
            if endpoint == "completions":
                body["prompt"] = "Hi"
            else:
                body["messages"] = [{"role": "user", "content": "Hi"}]
            body[name] = wrap(value)
            what = f"{endpoint} {name}={body[name]!r}"
            status, reply = _post(f"{base}/v1/{endpoint}", body)
            answers[what] = status
            assert status in (200, 400), f"{what}: HTTP {status} {reply}"
            if status == 400:
                message = reply.get("error", {}).get("message", "")
                assert message.strip(), f"{what}: 400 without a reason: {reply}"
            assert server["proc"].poll() is None, f"{what} took the server down:\n{tail(server['log'])}"
            assert http_get(base + "/health")[0] == 200, f"{what}: unhealthy afterwards"
            assert _reference_text(base) == reference, f"{what}: the reference answer changed"
    print(f"{sum(s == 200 for s in answers.values())} served, {sum(s == 400 for s in answers.values())} refused")


# --------------------------------------------------------------------------------------------------
# Fuzz: a few hundred seeded random requests, valid and invalid, concurrently. None may answer 5xx
# (that would be the server's fault, not the request's); afterwards the server is healthy and the
# reference greedy answer is unchanged.
# --------------------------------------------------------------------------------------------------

FUZZ_REQUESTS = 300
#: Chance that a field (or the prompt) takes one of its invalid values.
FUZZ_INVALID = 0.12
_TEXT = (
    [
        "Hi",
        "The capital of France is",
        "\u00e9t\u00e9 \u4f60\u597d \U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467 \u0645\u0631\u062d\u0628\u0627",
        "a\u0301\u0301\u0301 \u200b\u200e\u2066x\u2069 \ufeff",
        "\x00\x01\x7f tab\there\r\nnewline",
        "{" * 50 + "}" * 49,
        " ",
    ],
    ["", "\ud800 lone surrogate", "word " * 3000],  # empty, not UTF-8, beyond max_model_len
)
#: name -> (valid values, invalid values)
_FIELDS = {
    "max_tokens": ([1, 2, 3, 4], [0, -3, 10**6]),
    "temperature": ([0.0, 0.7, 1.5], [-1.0, "hot"]),
    "top_p": ([0.1, 0.9, 1.0], [0.0, 1.5]),
    "top_k": ([-1, 0, 1, 5, 10**6], [-7]),
    "min_p": ([0.0, 0.05, 0.9], [1.5, -0.1]),
    "seed": ([0, 7, 2**62], [2**64, "s"]),
    "presence_penalty": ([0.0, 1.0, -2.0], [5.0]),
    "frequency_penalty": ([0.0, 0.5, -1.5], [-2.5]),
    "repetition_penalty": ([1.0, 1.3, 0.5], [0.0, -1.0]),
    "n": ([1, 2, 3], [0, -1]),
    "stop": ([["\n"], ["x" * 500], ".", ["the", "a"]], [[1]]),
    "stop_token_ids": ([[2], [5, 6]], [[-1], [10**9]]),
    "min_tokens": ([0, 1, 3], [-2, 10**6]),
    "logit_bias": ([{"5": 100}, {"8": -100}, {"7": 3.5}], [{"-1": 1.0}, {"999999999": 2.0}, {"abc": 1.0}, {"7": 1e30}]),
    "allowed_token_ids": ([[5, 6, 7], [100]], [[], [-3], [10**9]]),
    "ignore_eos": ([True, False], ["yes"]),
    "stream": ([True, False], [3]),
    "response_format": (
        [
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
            {"type": "text"},
        ],
        [
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
            {"type": "bogus"},
        ],
    ),
    "structured_outputs": ([{"regex": "[a-c]+"}, {"choice": ["yes", "no"]}], [{"regex": "("}, {"choice": []}, {"grammar": "root ::="}]),
}
_CHAT_FIELDS = {"logprobs": ([True, False], ["maybe"]), "top_logprobs": ([0, 3, 20], [21, -1])}
_COMPLETION_FIELDS = {"logprobs": ([0, 2, 5], [21, -1]), "echo": ([True, False], [2]), "prompt_logprobs": ([0, 1, 5], [-1])}


def _fuzz_pick(rng, valid_invalid):
    valid, invalid = valid_invalid
    pool = invalid if invalid and rng.random() < FUZZ_INVALID else valid
    return pool[rng.randrange(len(pool))]


def _fuzz_request(rng) -> tuple[str, dict]:
    chat = rng.random() < 0.5
    body: dict = {"model": MODEL_NAME, "max_tokens": _fuzz_pick(rng, _FIELDS["max_tokens"])}
    text = _fuzz_pick(rng, _TEXT)
    if chat:
        body["messages"] = _fuzz_pick(
            rng,
            (
                [
                    [{"role": "user", "content": text}],
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                    [{"role": "user", "content": [{"type": "text", "text": text}]}],
                ],
                [[], [{"role": "nobody", "content": text}]],
            ),
        )
    else:
        ids = [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 6))]
        body["prompt"] = _fuzz_pick(rng, ([text, [text, "Hi"], ids], [[], 7, [-5, 3], [10**6]]))
    fields = dict(_FIELDS, **(_CHAT_FIELDS if chat else _COMPLETION_FIELDS))
    del fields["max_tokens"]
    for name in rng.sample(sorted(fields), rng.randrange(0, 5)):
        body[name] = _fuzz_pick(rng, fields[name])
    if "structured_outputs" in body or "response_format" in body:
        # allowed_token_ids that the grammar never allows leave no token to sample: vLLM's own
        # scheduler then terminates the request ("grammar rejected tokens"), HTTP 500 as on CUDA.
        body.pop("allowed_token_ids", None)
    return ("chat/completions" if chat else "completions"), body


def _fuzz_post(base: str, endpoint: str, body: dict) -> tuple[int, str]:
    """HTTP status and, for streams, any error event's code inside a 200 (as the status)."""
    import json

    data = json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass")
    req = urllib.request.Request(f"{base}/v1/{endpoint}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode("utf-8", errors="replace")
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, (e.read() or b"").decode("utf-8", errors="replace")[:300]
    if body.get("stream"):
        for line in raw.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                code = json.loads(line[6:]).get("error", {}).get("code", 500)
                return int(code) if str(code).isdigit() else 500, line[:300]
    return status, raw[:300]


def test_fuzz_requests_never_fail_the_server(server, check_alive):
    import random

    base = server["base"]
    reference = _reference_text(base)
    rng = random.Random(1234)
    requests = [_fuzz_request(rng) for _ in range(FUZZ_REQUESTS)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda r: _fuzz_post(base, *r), requests))
    server_errors = [(r, s, t) for r, (s, t) in zip(requests, results) if s >= 500]
    counts = {s: sum(1 for x, _ in results if x == s) for s in sorted({x for x, _ in results})}
    print(f"fuzz: {len(requests)} requests, status counts {counts}")
    assert not server_errors, "server errors:\n" + "\n".join(f"{s} {r!r:.400} -> {t}" for r, s, t in server_errors[:5])
    assert server["proc"].poll() is None, f"the fuzz took the server down:\n{tail(server['log'])}"
    assert http_get(base + "/health")[0] == 200
    assert _reference_text(base) == reference
