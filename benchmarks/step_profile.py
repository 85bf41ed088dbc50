"""Where one decode step's time goes in the engine (no vLLM): host graph building, kernel
submission, sampler graph, and the wait for the device — from the runner's own step timings.

    python benchmarks/step_profile.py --device cpu --models smollm2 --batches 1,16
    python benchmarks/step_profile.py --device gpu --models smollm2,llama1b --variants bf16,q4

Per step the runner records (host clock):
- build: request table, the step's batch tensors and the forward's graph (Rust, lazy MLX ops);
- submit: `async_eval` of the forward — on a GPU, encoding and launching its kernels;
- sample_build: the sampler's (and logprobs') graph;
- wait: the final `eval` — the device finishing the step, then the ids read back.
`other` is the rest of the measured wall time of a step (the engine-alone loop between steps).
Steps are pipelined as under vLLM's async scheduling unless `--sync`: then a step's wait is read
while the next step is already submitted, and the parts add up to more than the step.
Decode after a 128-token prompt, greedy unless `--sampling` names one of sampling_cost.py's
parameter sets; the first (prefill) step is left out; medians.
Weights come from engine_bench's cache.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench as eb  # noqa: E402
from sampling_cost import SAMPLED, STAGES  # noqa: E402

SAMPLING = {"greedy": {}, **STAGES, "sampled": SAMPLED}

PARTS = ("build", "submit", "sample_build", "wait")


def profile(runner, prompts, steps: int, params: dict) -> dict:
    runner.allocate_kv_cache(sum(math.ceil((len(p) + steps + 1) / 16) for p in prompts))
    runner.generate(prompts, 2, **params)  # warm-up
    runner.take_step_profile()
    t0 = time.perf_counter()
    runner.generate(prompts, steps + 1, **params)
    wall = time.perf_counter() - t0
    timings = runner.take_step_profile()
    runner.allocate_kv_cache(1)
    prefill, decode = timings[0], timings[1:]
    med = {k: statistics.median(t[k] for t in decode) for k in PARTS}
    step = (wall - sum(prefill[k] for k in PARTS)) / len(decode)
    med["other"] = max(0.0, step - sum(med.values()))
    med["step"] = step
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--variants", default=None, help="default: f32 on cpu, bf16,q4 on gpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--cache-dir", type=Path, default=eb.DEFAULT_CACHE)
    ap.add_argument("--smollm2-dir", type=Path, default=eb.DEFAULT_SMOLLM2)
    ap.add_argument("--sampling", choices=list(SAMPLING), default="greedy")
    ap.add_argument("--sync", action="store_true", help="wait for each step's ids before building the next")
    ap.add_argument("--gather", action="store_true", help="decode attention gathers the history (no page-reading kernel)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    params = {**SAMPLING[args.sampling], **({"pipeline": False} if args.sync else {})}

    mx, core = eb.import_engine()
    variants = (args.variants or ("f32" if args.device == "cpu" else "bf16,q4")).split(",")
    rows = []
    print("| model | weights | batch | step ms | build | submit | sample_build | wait | other |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        dirs = eb.prepare(mx, model, variants, args.cache_dir, args.smollm2_dir)
        for variant in variants:
            runner = core.ModelRunner(
                str(dirs[variant]), block_size=16, device=args.device, dtype=eb.VARIANT_DTYPE[variant],
                **({"gather_attention": True} if args.gather else {}),
            )
            for b in (int(x) for x in args.batches.split(",")):
                prompts = eb.prompts_for(b, args.prompt_len, runner.vocab_size, seed=1)
                m = profile(runner, prompts, args.steps, params)
                rows.append(
                    {"model": model, "variant": variant, "batch": b, "sampling": args.sampling, "sync": args.sync, **{k: v * 1e3 for k, v in m.items()}}
                )
                cells = " | ".join(f"{m[k] * 1e3:.2f}" for k in ("step", *PARTS, "other"))
                print(f"| {model} | {variant} | {b} | {cells} |", flush=True)
            del runner
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
