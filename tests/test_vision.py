"""Qwen2-VL in the engine against transformers' forward on image + text inputs.

A tiny random Qwen2VLForConditionalGeneration (2-block vision tower, 2-layer Qwen2 text stack) is
made here; images are numpy arrays put through transformers' own Qwen2-VL image processor, so the
engine receives pixel values and grids exactly as transformers' model does. The engine runs the
vision tower once per request (`prepare_images`) and every step that carries a chunk of the
request places its image rows and M-RoPE positions.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as R

BLOCK_SIZE = 16
IMAGE, VIDEO, VISION_START, VISION_END = 300, 301, 302, 303
#: head_dim 16: 8 rotary frequencies, 2 on the frame, 3 on the row, 3 on the column.
MROPE_SECTION = [2, 3, 3]
SPEC = R.TinySpec(seed=41, architecture="Qwen2ForCausalLM", num_layers=2)
VISION = dict(depth=2, embed_dim=32, hidden_size=SPEC.hidden_size, num_heads=2, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)


def _randomize_vision_(model, seed: int) -> None:
    """Weights that keep the tower's activations of order one: unit-ish LayerNorm gains, linear
    weights of std 1/sqrt(fan_in) (the text stack keeps reference.py's weights)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".visual." not in f".{name}":
                continue
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))


@pytest.fixture(scope="module")
def qwen2_vl(tiny_models):
    """(checkpoint directory, transformers' model loaded from it)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out = tiny_models.root / "qwen2-vl"
    if not (out / "config.json").is_file():
        text = R._hf_config(SPEC).to_dict()
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": SPEC.rope_theta, "mrope_section": MROPE_SECTION}
        cfg = Qwen2VLConfig(text_config=text, vision_config=VISION, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.float32).eval()
        R.randomize_(model, SPEC)
        _randomize_vision_(model, SPEC.seed + 1)
        model.save_pretrained(out)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    return out, hf


@pytest.fixture(scope="module")
def runner(core, qwen2_vl):
    r = core.ModelRunner(str(qwen2_vl[0]), block_size=BLOCK_SIZE)
    r.allocate_kv_cache(32)
    return r


def _images(*shapes):
    """Random RGB images of `(height, width)` through transformers' Qwen2-VL image processor
    (patch 4, merge 2: one placeholder per 8 x 8 pixels): pixel_values, image_grid_thw, and the
    placeholders of each image."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8,
                                 max_pixels=64 * 64)
    rng = np.random.default_rng(sum(h * 100 + w for h, w in shapes))
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    out = proc(images=imgs, return_tensors="np")
    grid = np.asarray(out["image_grid_thw"], dtype=np.int64)
    return np.asarray(out["pixel_values"], dtype=np.float32), grid, [int(t * h * w // 4) for t, h, w in grid]


def _prompt(seed: int, texts: list[int], placeholders: list[int]) -> list[int]:
    """Random text runs of `texts` lengths with an image (start, placeholders, end) between each."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(R.NUM_SPECIAL, IMAGE, size=texts[0]).tolist()
    for n, text in zip(placeholders, texts[1:]):
        ids += [VISION_START] + [IMAGE] * n + [VISION_END] + rng.integers(R.NUM_SPECIAL, IMAGE, size=text).tolist()
    return ids


def _hf(hf, ids, pixel_values=None, grid=None, position_ids=None):
    import torch

    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid),
                  mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in ids]]))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), position_ids=position_ids, use_cache=False, **kw)
    return out.logits[0].float().numpy()


def _check_rows(ours, ref, what):
    err = R.rowwise_rel_err(ours, ref)
    assert err.max() <= R.LOGITS_REL_TOL, (
        f"{what}: max rel err {err.max():.3g} at position {int(np.argmax(err))} (> {R.LOGITS_REL_TOL})"
    )


def test_one_image_matches_transformers(runner, qwen2_vl):
    """One 32 x 48 image (24 placeholders on a 4 x 6 grid) between text runs."""
    import torch

    hf = qwen2_vl[1]
    pixels, grid, n = _images((32, 48))
    assert grid.tolist() == [[1, 8, 12]] and n == [24]
    ids = _prompt(1, [7, 9], n)
    ref = _hf(hf, ids, pixels, grid)
    images = runner.prepare_images(ids, pixels, grid.tolist())
    assert images.num_placeholders == 24
    _check_rows(runner.step_logits([("a", ids, 0, [3, 9, 4])], {"a": images}), ref, "one image")

    # The test can fail: the image's content and its M-RoPE positions both show in the logits.
    other = _images((32, 48))[0][::-1].copy()
    assert R.rel_err(_hf(hf, ids, other, grid), ref) > 100 * R.LOGITS_REL_TOL
    flat = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
    assert R.rel_err(_hf(hf, ids, pixels, grid, position_ids=flat), ref) > 100 * R.LOGITS_REL_TOL


def test_two_images_matches_transformers(runner, qwen2_vl):
    """Two images of different sizes (a wide and a tall grid) in one prompt."""
    hf = qwen2_vl[1]
    pixels, grid, n = _images((32, 48), (24, 16))
    assert grid.tolist() == [[1, 8, 12], [1, 6, 4]] and n == [24, 6]
    ids = _prompt(2, [5, 6, 4], n)
    ref = _hf(hf, ids, pixels, grid)
    images = runner.prepare_images(ids, pixels, grid.tolist())
    _check_rows(runner.step_logits([("b", ids, 0, [7, 1, 12, 30])], {"b": images}), ref, "two images")


def test_text_only_matches_transformers(runner, qwen2_vl):
    """No images: M-RoPE's three rows are the same position, i.e. plain RoPE."""
    ids = _prompt(3, [40], [])
    _check_rows(runner.step_logits([("t", ids, 0, [5, 6, 8])]), _hf(qwen2_vl[1], ids), "text only")


def test_chunked_prefill_splits_the_image(runner, qwen2_vl):
    """Request A's prefill in three chunks, two of them ending inside its image's placeholder run
    (the tower ran once, each chunk takes its rows), then text decoded past the prompt (positions
    after the image's compressed span); a text-only request B runs beside it in the same steps."""
    hf = qwen2_vl[1]
    pixels, grid, n = _images((32, 48), (24, 16))
    prompt = _prompt(4, [5, 6, 4], n)
    tail = np.random.default_rng(5).integers(R.NUM_SPECIAL, IMAGE, size=4).tolist()
    a = R.PagedRequest("A", prompt + tail, [11, 2, 20, 13], BLOCK_SIZE)
    b = R.PagedRequest("B", _prompt(6, [23], []), [25, 17], BLOCK_SIZE)
    images = {"A": runner.prepare_images(prompt, pixels, grid.tolist())}
    first_image = prompt.index(IMAGE)
    # A: 0..first+10 (inside image 1), ..first+20 (still inside), the rest of the prompt.
    cuts = [first_image + 10, 10, len(prompt) - first_image - 20]
    schedule = [[("A", cuts[0]), ("B", 12)], [("B", 11), ("A", cuts[1])], [("A", cuts[2])]]
    schedule += [[("A", 1), ("B", 0)]] * len(tail)
    reqs = {"A": a, "B": b}
    for step in schedule:
        step = [(rid, k) for rid, k in step if k and reqs[rid].pos < len(reqs[rid].tokens)]
        out = runner.step_logits([reqs[rid].chunk(k) for rid, k in step], images)
        row = 0
        for rid, k in step:
            reqs[rid].advance(k, out[row: row + k])
            row += k
    for r in reqs.values():
        assert r.pos == len(r.tokens), f"test bug: {r.req_id} at {r.pos} of {len(r.tokens)}"
    ours_a = np.stack([a.logits[p] for p in range(len(a.tokens))])
    # transformers over the whole sequence: the text after the prompt continues its positions.
    _check_rows(ours_a, _hf(hf, a.tokens, pixels, grid), "chunked A")
    _check_rows(np.stack([b.logits[p] for p in range(len(b.tokens))]), _hf(hf, b.tokens), "text-only B beside A")


def test_placeholder_mismatch_is_refused(runner, core):
    pixels, grid, n = _images((32, 48))
    ids = _prompt(7, [3, 3], [n[0] - 1])
    with pytest.raises(Exception, match="needs 24 placeholders, the prompt has 23"):
        runner.prepare_images(ids, pixels, grid.tolist())
    with pytest.raises(Exception, match=r"pixel_values have shape \[90, 96\]"):
        runner.prepare_images(_prompt(7, [3, 3], n), pixels[:90], grid.tolist())
