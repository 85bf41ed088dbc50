"""gpt-oss as OpenAI publishes it: MXFP4 expert blocks and E8M0 scales (`quant_method` "mxfp4"),
everything else plain. The engine reads the blocks as MLX's MXFP4 packing; the reference is
transformers running the experts as its own MXFP4 conversion dequantizes them."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_files as C
import reference as R
from conftest import shutdown_llm

FAMILY = "gpt_oss"


@pytest.fixture(scope="module")
def openai_dirs(tiny_models):
    root = tiny_models.root / "openai-mxfp4"
    return C.write_openai_mxfp4(tiny_models.path(FAMILY), root / "quantized", root / "reference")


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, R.TINY_VARIANTS[FAMILY].vocab_size, n).tolist()


def test_openai_mxfp4_experts_match_transformers(core, tiny_models, openai_dirs):
    quantized, reference = openai_dirs
    ref_model = R.load_hf(reference)
    runner = core.ModelRunner(str(quantized), block_size=16, dtype="float32")
    runner.allocate_kv_cache(8)
    ids = _ids(7, 60)
    ours = runner.step_logits([("a", ids, 0, [5, 1, 3, 0])])
    ref = R.hf_logits(ref_model, ids)
    err = R.rowwise_rel_err(ours, ref)
    assert err.max() <= R.LOGITS_REL_TOL, f"max rel err {err.max():.3g}"
    # The quantization is visible: the float32 experts give clearly different logits.
    assert R.rel_err(R.hf_logits(tiny_models.hf(FAMILY), ids), ref) > 100 * R.LOGITS_REL_TOL


@pytest.mark.vllm
def test_openai_mxfp4_through_vllm(core, openai_dirs):
    """vLLM's front end takes the published config (it resolves quantization "gpt_oss_mxfp4", in
    bfloat16); the engine's tokens equal its own engine-alone run in the same dtype."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    quantized, _ = openai_dirs
    prompts = [_ids(8, 20), _ids(9, 33)]
    runner = core.ModelRunner(str(quantized), block_size=16, dtype="bfloat16")
    runner.allocate_kv_cache(16)
    want = runner.generate(prompts, 6, temperature=0.0)
    llm = LLM(model=str(quantized), max_model_len=64, kv_cache_memory_bytes=1 << 20, seed=0)
    try:
        assert llm.llm_engine.vllm_config.model_config.quantization in ("mxfp4", "gpt_oss_mxfp4")
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    finally:
        shutdown_llm(llm)
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(w) for w in want]
