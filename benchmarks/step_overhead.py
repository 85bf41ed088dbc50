"""Where a vLLM step's time goes with this plugin: inside the engine (our worker's execute_model +
sample_tokens) vs. vLLM's own host work around it (scheduling, output update). That host work is
what vLLM's async scheduling would overlap with the engine's compute, so its share bounds what
async scheduling can gain.

    python benchmarks/step_overhead.py [MODEL_DIR] [--concurrency 1,16]

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that EngineCore.step and the
worker's two calls can be timed directly; detokenization and the LLM front end are outside
EngineCore.step and not counted. Greedy, random 128-token prompts, 128 output tokens each,
`concurrency` requests in flight (max_num_seqs), 4 x concurrency requests in all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.core import EngineCore

    from vllm_metal_rs.worker import MetalWorker

    times = {"step": [], "engine": []}
    current = {"engine": 0.0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                if key == "step":
                    times["step"].append(dt)
                    times["engine"].append(current["engine"])
                    current["engine"] = 0.0
                else:
                    current["engine"] += dt

        return wrapper

    EngineCore.step = timed(EngineCore.step, "step")
    MetalWorker.execute_model = timed(MetalWorker.execute_model, "engine")
    MetalWorker.sample_tokens = timed(MetalWorker.sample_tokens, "engine")

    conc = [int(c) for c in args.concurrency.split(",")]
    llm = LLM(model=args.model, max_model_len=2048, max_num_seqs=max(conc), kv_cache_memory_bytes=1 << 30, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    print("| concurrency | decode steps | step ms (p50) | engine ms (p50) | vLLM host ms (p50) | host share |")
    print("|---|---|---|---|---|---|")
    for c in conc:
        prompts = [
            TokensPrompt(prompt_token_ids=rng.integers(100, vocab - 100, size=args.input_len).tolist())
            for _ in range(4 * c)
        ]
        llm.generate(prompts[:c], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        times["step"].clear()
        times["engine"].clear()
        # c at a time, so each wave's steps are c-wide decodes after its prefills.
        for i in range(0, len(prompts), c):
            llm.generate(prompts[i : i + c], params, use_tqdm=False)
        steps = [(s, e) for s, e in zip(times["step"], times["engine"]) if e > 0]
        # Decode steps: the last output_len - 1 steps of every wave are pure decodes; keep the
        # steps whose engine time is below the median of all (prefill steps are the slow tail).
        decode = sorted(steps, key=lambda se: se[1])[: len(steps) * 3 // 4]
        step = statistics.median(s for s, _ in decode)
        engine = statistics.median(e for _, e in decode)
        host = statistics.median(s - e for s, e in decode)
        print(
            f"| {c} | {len(decode)} | {step * 1e3:.2f} | {engine * 1e3:.2f} | {host * 1e3:.2f} | "
            f"{100 * host / step:.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
