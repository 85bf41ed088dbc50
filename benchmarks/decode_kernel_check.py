"""GPU only (MLX's CUDA backend, mlx-lm installed): decode-step logits of the page-reading kernel
vs the gather path vs mlx-lm (the oracle), on the llama1b-shaped random model, for requests of 8
lengths with scrambled block tables; then greedy generation through both paths; then a
Mistral-shaped model with a 48-token sliding window, kernel vs gather.

    python benchmarks/decode_kernel_check.py
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
import engine_bench as eb
mx, core = eb.import_engine()
from mlx_lm.utils import load_model
from mlx_lm.models.cache import make_prompt_cache

dirs = eb.prepare(mx, "llama1b", ["bf16"], eb.DEFAULT_CACHE, eb.DEFAULT_SMOLLM2)
path = dirs["bf16"]
lens = [1, 15, 16, 17, 40, 130, 300, 700]
prompts = [eb.prompts_for(1, n, 128256, seed=i)[0] for i, n in enumerate(lens)]
nxt = [random.Random(99 + i).randrange(128256) for i in range(len(lens))]


def decode_logits(path, dtype, prompts, nxt, num_blocks):
    """Per path (gather True / False): logits of one decode step after the prompts' prefill, on
    scrambled block tables."""
    res = {}
    for gather in (False, True):
        r = core.ModelRunner(str(path), block_size=16, device="gpu", dtype=dtype, gather_attention=gather)
        r.allocate_kv_cache(num_blocks)
        blocks = list(range(1, num_blocks))
        random.Random(0).shuffle(blocks)
        tables = [[blocks.pop() for _ in range((len(p) + 1 + 15) // 16)] for p in prompts]
        r.step_logits([(f"r{i}", p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables))])
        step = [(f"r{i}", [nxt[i]], len(p), t) for i, (p, t) in enumerate(zip(prompts, tables))]
        res[gather] = r.step_logits(step).astype(np.float64)
        del r
    return res


def rel(a, b):
    return (np.max(np.abs(a - b), axis=-1) / np.max(np.abs(b), axis=-1)).max()


for dtype in ("float32", "bfloat16"):
    res = decode_logits(path, dtype, prompts, nxt, 200)
    model, _ = load_model(path)
    if dtype == "float32":
        model.set_dtype(mx.float32)
    ref = []
    for p, t in zip(prompts, nxt):
        cache = make_prompt_cache(model)
        model(mx.array([p]), cache=cache)
        ref.append(np.array(model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)))
    ref = np.stack(ref).astype(np.float64)
    del model

    k, g = res[False], res[True]
    print(f"{dtype}: decode logits rel err kernel-vs-mlxlm {rel(k, ref):.2e}, gather-vs-mlxlm {rel(g, ref):.2e}, "
          f"kernel-vs-gather {rel(k, g):.2e}; argmax agree kernel/mlxlm {int((k.argmax(-1) == ref.argmax(-1)).sum())}/8")

# greedy generation, both paths (f32: the same tokens expected)
gp = [eb.prompts_for(1, n, 128256, seed=50 + i)[0] for i, n in enumerate([3, 30, 64, 100, 129, 200, 17, 500])]
outs = {}
for gather in (False, True):
    r = core.ModelRunner(str(path), block_size=16, device="gpu", dtype="float32", gather_attention=gather)
    r.allocate_kv_cache(256)
    outs[gather] = r.generate(gp, 48)
    del r
same = [eb.agree(a, b) for a, b in zip(outs[False], outs[True])]
print("float32 greedy 48 tokens, common prefix kernel vs gather:", same)

# sliding-window layers: a Mistral-shaped random model (4 layers, window 48), decode step
# with requests on both sides of the window, kernel vs gather (the gather path is checked against
# transformers on CPU)
config = dict(eb.LLAMA1B_CONFIG)
config.update({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 4, "sliding_window": 48})
config.pop("rope_scaling")
wpath = Path(eb.DEFAULT_CACHE) / "mistral-window-bf16"
eb.write_variant(mx, wpath, config, eb.random_llama_bf16(mx, config), "bf16", {"model": "mistral-window"})
wlens = [1, 20, 47, 48, 49, 100, 300]
wprompts = [eb.prompts_for(1, n, 128256, seed=i)[0] for i, n in enumerate(wlens)]
wnext = [random.Random(7 + i).randrange(128256) for i in range(len(wlens))]
for dtype in ("float32", "bfloat16"):
    res = decode_logits(wpath, dtype, wprompts, wnext, 100)
    k, g = res[False], res[True]
    print(f"window 48, {dtype}: decode logits rel err kernel-vs-gather {rel(k, g):.2e}; "
          f"argmax agree {int((k.argmax(-1) == g.argmax(-1)).sum())}/{len(wlens)}")
