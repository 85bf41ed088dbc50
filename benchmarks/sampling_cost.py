"""What sampling costs inside a decode step: engine alone, batch 64 (default), greedy argmax vs a
full random draw with top-k + top-p + min-p and the three penalties.

    python benchmarks/sampling_cost.py --device cpu                    # smollm2, float32
    python benchmarks/sampling_cost.py --device gpu --models llama1b   # the 1B shape, bf16

Each side's decode step time is (time of generate(N + 1 tokens) - time of generate(1 token)) / N,
as in engine_bench.py, with every step's ids read back to the host; the sampling cost is the
difference of the two step times within a repetition, quoted as a fraction of the greedy step.
The sides alternate, the order flipping every repetition; medians are reported. Weights come from engine_bench's
cache (the same directories it benchmarks). vLLM is not needed.
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

# Parameter sets of `--breakdown`: the penalties alone, then the draw's stages, each adding one.
STAGES = {
    "penalties (greedy)": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
    "temperature": dict(temperature=0.8, seed=0),
    "+top_k": dict(temperature=0.8, seed=0, top_k=50),
    "+top_p+min_p": dict(temperature=0.8, seed=0, top_k=50, top_p=0.9, min_p=0.02),
}

SAMPLED = dict(
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    min_p=0.02,
    seed=0,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    repetition_penalty=1.1,
)


def step_time(runner, prompts, steps: int, params: dict) -> float:
    blocks = sum(math.ceil((len(p) + steps + 1) / 16) for p in prompts)
    runner.allocate_kv_cache(blocks)
    t0 = time.perf_counter()
    runner.generate(prompts, 1, **params)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.generate(prompts, steps + 1, **params)
    total = time.perf_counter() - t0
    runner.allocate_kv_cache(1)
    return (total - first) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--models", default=None, help="smollm2 and/or llama1b (default: smollm2 on cpu, llama1b on gpu)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache-dir", type=Path, default=eb.DEFAULT_CACHE)
    ap.add_argument("--smollm2-dir", type=Path, default=eb.DEFAULT_SMOLLM2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--breakdown", action="store_true", help="also time each stage (temperature, top-k, top-p/min-p)")
    args = ap.parse_args()

    mx, core = eb.import_engine()
    variant = "f32" if args.device == "cpu" else "bf16"
    models = (args.models or ("smollm2" if args.device == "cpu" else "llama1b")).split(",")
    rows = []
    for model in models:
        path = eb.prepare(mx, model, [variant], args.cache_dir, args.smollm2_dir)[variant]
        runner = core.ModelRunner(str(path), block_size=16, device=args.device, dtype=eb.VARIANT_DTYPE[variant])
        vocab = runner.vocab_size
        prompts = eb.prompts_for(args.batch, args.prompt_len, vocab, seed=1)
        sides = {"greedy": {}, **(STAGES if args.breakdown else {}), "sampled": SAMPLED}
        for params in sides.values():  # warm-up: every path's kernels
            step_time(runner, prompts[:4], 2, params)
        samples = {side: [] for side in sides}
        for rep in range(args.reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                samples[side].append(step_time(runner, prompts, args.steps, sides[side]))
        greedy = statistics.median(samples["greedy"])
        sampled = statistics.median(samples["sampled"])

        def cost(side: str) -> float:
            # Differences within a repetition: the two sides ran back to back.
            return statistics.median(s - g for s, g in zip(samples[side], samples["greedy"]))

        for side in list(sides)[1:-1]:
            print(f"  {model} {side}: {cost(side) * 1e3:.2f} ms over greedy", flush=True)
        row = {
            "model": model,
            "variant": variant,
            "device": args.device,
            "batch": args.batch,
            "vocab": vocab,
            "greedy_step_ms": greedy * 1e3,
            "sampled_step_ms": sampled * 1e3,
            "sampling_ms": cost("sampled") * 1e3,
            "sampling_fraction": cost("sampled") / greedy,
            "samples_ms": {k: [round(v * 1e3, 2) for v in vs] for k, vs in samples.items()},
        }
        rows.append(row)
        print(
            f"{model} {variant} {args.device} batch {args.batch}: greedy {greedy * 1e3:.1f} ms/step, "
            f"sampled {sampled * 1e3:.1f} ms/step, sampling {row['sampling_ms']:.1f} ms "
            f"= {100 * row['sampling_fraction']:.1f}% of the greedy step",
            flush=True,
        )
        del runner
    if args.out:
        args.out.write_text(json.dumps({"params": SAMPLED, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
