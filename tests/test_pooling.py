"""Embeddings on the engine (encoder models and pooling) against references we did not write:
sentence-transformers' encode on the real all-MiniLM-L6-v2, transformers' forward on tiny random
BERT checkpoints (float32). Cosine and rel_err as in the other oracle tests."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_files as C
import encoders as E
import reference as R


@pytest.fixture(scope="module")
def minilm_runner(core, minilm_dir):
    return core.EncoderRunner(str(minilm_dir))


def test_minilm_matches_sentence_transformers(st_minilm, minilm_runner):
    """32 sentences in one batch: normalized (the checkpoint's Normalize module) and raw mean
    pooling (its Transformer + Pooling modules alone)."""
    from sentence_transformers import SentenceTransformer

    ids = [st_minilm.tokenizer(s)["input_ids"] for s in E.SENTENCES]
    assert len(ids) == 32 and min(map(len, ids)) <= 3 and max(map(len, ids)) >= 30
    ref_norm = st_minilm.encode(E.SENTENCES, batch_size=32)
    ref_raw = SentenceTransformer(modules=[st_minilm[0], st_minilm[1]], device="cpu").encode(E.SENTENCES, batch_size=32)
    # The Normalize module is what makes the two differ: otherwise the check below proves nothing.
    assert np.abs(np.linalg.norm(ref_raw, axis=1) - 1).max() > 0.1

    for normalize, ref in [(True, ref_norm), (False, ref_raw)]:
        ours = np.stack(minilm_runner.embed(ids, pooling="MEAN", normalize=normalize))
        assert ours.shape == ref.shape
        cos = E.cosine(ours, ref)
        assert cos.min() >= E.COSINE_MIN, f"normalize={normalize}: min cosine {cos.min():.6f} at {int(cos.argmin())}"
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)


def test_minilm_batch_equals_each_alone(st_minilm, minilm_runner):
    ids = [st_minilm.tokenizer(s)["input_ids"] for s in E.SENTENCES[:16]]
    batch = np.stack(minilm_runner.embed(ids, pooling="MEAN", normalize=True))
    alone = np.stack([minilm_runner.embed([i], pooling="MEAN", normalize=True)[0] for i in ids])
    assert np.abs(batch - alone).max() < 1e-5


def test_pooling_kinds_and_dimensions(minilm_runner, st_minilm):
    """CLS / LAST pick the first / last hidden state; dimensions truncate before normalizing."""
    ids = [st_minilm.tokenizer(s)["input_ids"] for s in E.SENTENCES[:4]]
    hidden, spans = minilm_runner.hidden_states(ids)
    assert [n for _, n in spans] == [len(i) for i in ids]
    cls = np.stack(minilm_runner.embed(ids, pooling="CLS", normalize=False))
    last = np.stack(minilm_runner.embed(ids, pooling="LAST", normalize=False))
    np.testing.assert_allclose(cls, hidden[[s for s, _ in spans]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last, hidden[[s + n - 1 for s, n in spans]], rtol=1e-5, atol=1e-6)
    dims = minilm_runner.embed(ids, pooling="MEAN", normalize=True, dimensions=[8, None, 384, 1])
    full = minilm_runner.embed(ids, pooling="MEAN", normalize=False)
    assert [len(v) for v in dims] == [8, 384, 384, 1]
    want = full[0][:8] / np.linalg.norm(full[0][:8])
    np.testing.assert_allclose(dims[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="dimensions 385"):
        minilm_runner.embed(ids[:1], pooling="MEAN", normalize=True, dimensions=[385])


@pytest.mark.parametrize("variant", ["plain", "gelu_tanh_types"])
def test_tiny_bert_hidden_states_match_transformers(core, tmp_path, variant):
    """Hidden states of a tiny random BertModel, with token types, in one mixed batch."""
    config = {} if variant == "plain" else {"hidden_act": "gelu_pytorch_tanh", "type_vocab_size": 3}
    d = E.write_tiny_bert(tmp_path / variant, seed=3, **config)
    rng = np.random.default_rng(5)
    lengths = [1, 7, 33, 64, 2, 19]
    ids = [rng.integers(0, 300, size=n).tolist() for n in lengths]
    types = [rng.integers(0, 2 if variant == "plain" else 3, size=n).tolist() for n in lengths]
    runner = core.EncoderRunner(str(d))
    hidden, spans = runner.hidden_states(ids, token_type_ids=types)
    for (start, n), i, t in zip(spans, ids, types):
        ref = E.hf_encoder_hidden(d, i, t)
        err = R.rel_err(hidden[start : start + n], ref)
        assert err <= R.LOGITS_REL_TOL, f"{variant} length {n}: rel err {err:.3g}"


def test_encoder_refuses_bad_inputs_with_one_line(core, tmp_path):
    d = E.write_tiny_bert(tmp_path / "bert", max_position_embeddings=16)
    runner = core.EncoderRunner(str(d))
    for ids, types, match in [
        ([list(range(17))], None, "at most 16"),
        ([[300]], None, "outside the vocabulary"),
        ([[1, 2]], [[0, 2]], "token type 2"),
        ([[]], None, "no tokens"),
    ]:
        with pytest.raises(core.EngineError, match=match) as e:
            runner.hidden_states(ids, token_type_ids=types)
        assert "\n" not in str(e.value)
    runner.hidden_states([[1, 2, 3]])  # still serves


def test_tiny_xlm_roberta_hidden_states_match_transformers(core, tmp_path):
    """XLM-R: BERT's blocks with positions from pad_token_id + 1."""
    d = E.write_tiny_bert(tmp_path / "xlmr", seed=4, architecture="XLMRobertaModel", type_vocab_size=1, pad_token_id=1)
    rng = np.random.default_rng(6)
    # Ids from 2 on: transformers gives pad tokens (id 1) inside a sequence the padding position.
    ids = [rng.integers(2, 300, size=n).tolist() for n in (3, 40, 11)]
    runner = core.EncoderRunner(str(d))
    assert runner.max_positions == 128 - 2
    hidden, spans = runner.hidden_states(ids)
    for (start, n), i in zip(spans, ids):
        err = R.rel_err(hidden[start : start + n], E.hf_encoder_hidden(d, i))
        assert err <= R.LOGITS_REL_TOL, f"length {n}: rel err {err:.3g}"


@pytest.mark.parametrize("architecture", ["BertForSequenceClassification", "XLMRobertaForSequenceClassification"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_tiny_classifiers_match_transformers(core, tmp_path, architecture, num_labels):
    """Cross-encoder / classifier logits (CLS pooling, the family's head), with token types for
    BERT pairs; scores with vLLM's activations (sigmoid for one label, softmax for several)."""
    xlmr = architecture.startswith("XLM")
    extra = {"type_vocab_size": 1, "pad_token_id": 1} if xlmr else {}
    d = E.write_tiny_bert(tmp_path / architecture, seed=7, architecture=architecture, num_labels=num_labels, **extra)
    runner = core.EncoderRunner(str(d))
    assert runner.task == "classify" and runner.num_labels == num_labels
    rng = np.random.default_rng(8)
    ids = [rng.integers(2, 300, size=n).tolist() for n in (5, 23, 9)]
    types = None if xlmr else [[0] * (n // 2) + [1] * (n - n // 2) for n in (5, 23, 9)]
    runner.configure("CLS")
    logits = runner.embed(ids, pooling="CLS", normalize=False, token_type_ids=types)
    for i, (seq, got) in enumerate(zip(ids, logits)):
        ref = E.hf_classifier_logits(d, seq, None if types is None else types[i])
        assert got.shape == (num_labels,)
        err = R.rel_err(got, ref)
        assert err <= R.LOGITS_REL_TOL, f"request {i}: rel err {err:.3g}"
    act = "sigmoid" if num_labels == 1 else "softmax"
    runner.configure("CLS", activation=act)
    scores = runner.embed(ids, pooling="CLS", normalize=True, token_type_ids=types)
    for got, lg in zip(scores, logits):
        lg = lg.astype(np.float64)
        want = 1 / (1 + np.exp(-lg)) if act == "sigmoid" else np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("group_size", "bits"), [(32, 4), (64, 8)])
def test_mlx_quantized_bert_matches_its_dequantized_weights(core, tmp_path, group_size, bits):
    """An MLX-quantized encoder (every 2-D table and linear quantized, embeddings included, as
    MLX's quantizer lays it out) against transformers on the same weights dequantized."""
    src = E.write_tiny_bert(tmp_path / "bert", seed=9, hidden_size=64, intermediate_size=128)
    qdir, ddir = C.write_mlx_quantized(src, tmp_path / "q", tmp_path / "dq", group_size=group_size, bits=bits)
    from safetensors import safe_open

    with safe_open(str(qdir / "model.safetensors"), "np") as f:
        assert "embeddings.position_embeddings.scales" in f.keys()
    rng = np.random.default_rng(10)
    ids = [rng.integers(0, 300, size=n).tolist() for n in (4, 31)]
    hidden, spans = core.EncoderRunner(str(qdir)).hidden_states(ids)
    for (start, n), i in zip(spans, ids):
        err = R.rel_err(hidden[start : start + n], E.hf_encoder_hidden(ddir, i))
        assert err <= R.LOGITS_REL_TOL, f"q{bits} g{group_size}, length {n}: rel err {err:.3g}"
