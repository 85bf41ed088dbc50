"""Embeddings through vLLM on the plugin: `vllm.LLM(...).embed` and `vllm serve` with
/v1/embeddings (OpenAI client), all-MiniLM-L6-v2 against sentence-transformers."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest
from conftest import http_get, shutdown_llm, tail, vllm_server

import encoders as E

pytestmark = pytest.mark.vllm

STARTUP_TIMEOUT_S = float(os.environ.get("VMR_SERVE_STARTUP_TIMEOUT", "300"))


@pytest.fixture(scope="module")
def st_reference(st_minilm):
    """(normalized, raw mean-pooled) sentence-transformers embeddings of E.SENTENCES."""
    from sentence_transformers import SentenceTransformer

    raw = SentenceTransformer(modules=[st_minilm[0], st_minilm[1]], device="cpu")
    return st_minilm.encode(E.SENTENCES), raw.encode(E.SENTENCES)


@pytest.fixture(scope="module")
def embed_llm(minilm_dir):
    from vllm import LLM

    llm = LLM(model=str(minilm_dir), max_model_len=256, seed=0)
    yield llm
    shutdown_llm(llm)


def test_llm_embed_matches_sentence_transformers(embed_llm, st_reference):
    from vllm import PoolingParams

    ref_norm, ref_raw = st_reference
    outs = embed_llm.embed(E.SENTENCES)
    ours = np.stack([o.outputs.embedding for o in outs])
    cos = E.cosine(ours, ref_norm)
    assert cos.min() >= E.COSINE_MIN, f"min cosine {cos.min():.6f} at {int(cos.argmin())}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)

    # use_activation=False: the mean-pooled vector before the checkpoint's Normalize module.
    outs = embed_llm.embed(E.SENTENCES, pooling_params=PoolingParams(use_activation=False))
    raw = np.stack([o.outputs.embedding for o in outs])
    assert E.cosine(raw, ref_raw).min() >= E.COSINE_MIN
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), np.linalg.norm(ref_raw, axis=1), rtol=1e-4)


def test_llm_embed_single_requests_equal_the_batch(embed_llm):
    batch = np.stack([o.outputs.embedding for o in embed_llm.embed(E.SENTENCES[:16])])
    alone = np.stack([embed_llm.embed([s])[0].outputs.embedding for s in E.SENTENCES[:16]])
    assert np.abs(batch - alone).max() < 1e-5


def test_llm_embed_refuses_a_prompt_over_max_model_len(embed_llm):
    with pytest.raises(Exception) as e:
        embed_llm.embed(["word " * 400])
    assert "256" in str(e.value), str(e.value)[:500]
    # The engine is still there.
    assert len(embed_llm.embed(["still here"])[0].outputs.embedding) == 384


def test_a_failed_encoder_batch_is_retried_request_by_request(embed_llm):
    """A batch that fails on the device is retried one request at a time: every request is still
    served, with the vectors it would have had."""
    want = np.stack([o.outputs.embedding for o in embed_llm.embed(E.SENTENCES[:6])])
    embed_llm.collective_rpc("inject_fault", args=("forward",))
    got = np.stack([o.outputs.embedding for o in embed_llm.embed(E.SENTENCES[:6])])
    assert np.abs(got - want).max() < 1e-5


def test_llm_score_by_cosine(embed_llm, st_minilm):
    """LLM.score on an embedding model: cosine of the two embeddings, as sentence-transformers."""
    q = "Where is the nearest train station?"
    docs = ["The station is two blocks north.", "Bananas are rich in potassium."]
    scores = [o.outputs.score for o in embed_llm.score(q, docs)]
    e = st_minilm.encode([q] + docs)
    want = [float(E.cosine(e[0], e[i])) for i in (1, 2)]
    np.testing.assert_allclose(scores, want, atol=1e-4)
    assert scores[0] > scores[1]


def test_generate_and_embed_in_one_process(embed_llm, default_model_dir):
    """A generation LLM and a pooling LLM side by side (two engines), each answering."""
    from vllm import LLM, SamplingParams

    gen = LLM(model=str(default_model_dir), max_model_len=512, kv_cache_memory_bytes=64 * 2**20, seed=0)
    try:
        text = gen.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0]
        assert len(text.outputs[0].token_ids) == 4
        assert len(embed_llm.embed(["both engines live"])[0].outputs.embedding) == 384
    finally:
        shutdown_llm(gen)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"enable_chunked_prefill": True}, "chunked prefill"),
        ({"enable_prefix_caching": True}, "prefix caching"),
        ({"pooler_config": {"task": "token_embed"}}, "task 'token_embed'"),
    ],
)
def test_pooling_configs_the_engine_cannot_honour_are_refused(minilm_dir, kwargs, fragment):
    from vllm import LLM

    with pytest.raises(Exception) as e:
        LLM(model=str(minilm_dir), max_model_len=256, **kwargs)
    assert fragment in str(e.value), str(e.value)[:500]


def test_mean_pooling_a_decoder_in_chunks_is_refused_with_one_line(tiny_models):
    """Mean pooling needs the whole prompt in one step: forcing chunked prefill on is refused."""
    from vllm import LLM

    with pytest.raises(Exception) as e:
        LLM(
            model=str(tiny_models.path("qwen3")),
            runner="pooling",
            pooler_config={"seq_pooling_type": "MEAN"},
            enable_chunked_prefill=True,
            max_model_len=256,
        )
    # vLLM wraps the platform's one line in its own validation error.
    assert "vllm-metal-rs: chunked prefill is not supported for MEAN pooling" in str(e.value), str(e.value)[:500]


# --- vllm serve ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_server(minilm_dir, tmp_path_factory):
    args = [str(minilm_dir), "--served-model-name", "minilm", "--max-model-len", "256"]
    with vllm_server(args, tmp_path_factory.mktemp("serve-embed") / "vllm-serve.log", STARTUP_TIMEOUT_S) as srv:
        yield srv


def test_v1_embeddings_with_the_openai_client(embed_server, st_reference):
    from openai import OpenAI

    client = OpenAI(base_url=embed_server["base"] + "/v1", api_key="unused", timeout=120.0, max_retries=0)
    ref_norm, _ = st_reference
    resp = client.embeddings.create(model="minilm", input=E.SENTENCES)
    ours = np.stack([d.embedding for d in resp.data])
    assert [d.index for d in resp.data] == list(range(len(E.SENTENCES)))
    assert E.cosine(ours, ref_norm).min() >= E.COSINE_MIN
    assert resp.usage.prompt_tokens > len(E.SENTENCES)

    # base64: little-endian float32 of the same vectors.
    b64 = client.embeddings.create(model="minilm", input=E.SENTENCES[:3], encoding_format="base64")
    for d, want in zip(b64.data, ours[:3]):
        got = d.embedding
        if isinstance(got, str):
            got = np.frombuffer(base64.b64decode(got), dtype="<f4")
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5, atol=1e-6)

    # Over max_model_len: truncated when asked (vLLM's truncate_prompt_tokens), else refused
    # alone while the server stays up.
    long = "word " * 400
    cut = client.embeddings.create(model="minilm", input=long, extra_body={"truncate_prompt_tokens": 128})
    assert cut.usage.prompt_tokens == 128 and len(cut.data[0].embedding) == 384
    with pytest.raises(Exception):
        client.embeddings.create(model="minilm", input=long)
    assert http_get(embed_server["base"] + "/health")[0] == 200
    assert embed_server["proc"].poll() is None, tail(embed_server["log"])
    assert len(client.embeddings.create(model="minilm", input="ok").data[0].embedding) == 384


def test_pooling_endpoint(embed_server, st_reference):
    """vLLM's /pooling endpoint serves the model's task (embed) with the same vectors."""
    import json
    import urllib.request

    ref_norm, _ = st_reference
    body = json.dumps({"model": "minilm", "input": E.SENTENCES[:2]}).encode()
    req = urllib.request.Request(embed_server["base"] + "/pooling", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())["data"]
    got = np.stack([np.asarray(d["data"], np.float64).reshape(-1) for d in data])
    assert E.cosine(got, ref_norm[:2]).min() >= E.COSINE_MIN


# --- cross-encoders (score / rerank) ---------------------------------------------------------------

QUERY = "Where is the nearest train station?"
DOCS = [
    "The station is two blocks north of here.",
    "Bananas are rich in potassium.",
    "Trains leave every ten minutes from platform four.",
    "I like green tea.",
]


@pytest.fixture(scope="module")
def cross_encoder_dir(minilm_dir, tmp_path_factory):
    """A tiny random BertForSequenceClassification (one label) with MiniLM's tokenizer."""
    return E.write_tiny_bert(
        tmp_path_factory.mktemp("ce") / "tiny-ce",
        seed=11,
        architecture="BertForSequenceClassification",
        num_labels=1,
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=512,
        tokenizer_from=minilm_dir,
    )


def _reference_scores(model_dir, query, docs) -> list[float]:
    """transformers on (query, doc) pairs with token types: sigmoid of the one logit."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for d in docs:
        enc = tok(query, d)
        logit = E.hf_classifier_logits(model_dir, enc["input_ids"], enc["token_type_ids"])[0]
        out.append(float(1 / (1 + np.exp(-logit))))
    return out


def test_llm_score_with_a_cross_encoder(cross_encoder_dir):
    from vllm import LLM

    want = _reference_scores(cross_encoder_dir, QUERY, DOCS)
    # The token types matter: without them the scores would differ (else this proves nothing).
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(cross_encoder_dir))(QUERY, DOCS[0])
    no_types = E.hf_classifier_logits(cross_encoder_dir, enc["input_ids"], [0] * len(enc["input_ids"]))[0]
    assert abs(1 / (1 + np.exp(-no_types)) - want[0]) > 1e-4

    llm = LLM(model=str(cross_encoder_dir), max_model_len=512, seed=0)
    try:
        got = [o.outputs.score for o in llm.score(QUERY, DOCS)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        classified = llm.classify([QUERY])[0].outputs.probs
        assert len(classified) == 1 and 0.0 < classified[0] < 1.0
    finally:
        shutdown_llm(llm)


def test_rerank_endpoint_orders_by_cross_encoder_score(cross_encoder_dir, tmp_path_factory):
    import json
    import urllib.request

    want = _reference_scores(cross_encoder_dir, QUERY, DOCS)
    args = [str(cross_encoder_dir), "--served-model-name", "ce", "--max-model-len", "512"]
    with vllm_server(args, tmp_path_factory.mktemp("serve-ce") / "vllm-serve.log", STARTUP_TIMEOUT_S) as srv:
        body = json.dumps({"model": "ce", "query": QUERY, "documents": DOCS}).encode()
        req = urllib.request.Request(srv["base"] + "/rerank", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            results = json.loads(r.read())["results"]
        order = [x["index"] for x in results]
        assert order == sorted(range(len(DOCS)), key=lambda i: -want[i])
        np.testing.assert_allclose([x["relevance_score"] for x in results], sorted(want, reverse=True), rtol=1e-4, atol=1e-6)

        body = json.dumps({"model": "ce", "queries": QUERY, "documents": DOCS}).encode()
        req = urllib.request.Request(srv["base"] + "/score", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            scored = json.loads(r.read())["data"]
        np.testing.assert_allclose([x["score"] for x in sorted(scored, key=lambda x: x["index"])], want, rtol=1e-4, atol=1e-6)
