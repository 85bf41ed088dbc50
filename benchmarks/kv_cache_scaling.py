"""Decode step time vs KV-cache size: the per-step KV write must cost O(tokens written).

If writing a step's K/V copied the whole cache, step time would grow with `num_blocks`. Runs the
engine alone (no vLLM): batch-4 decode of the default model with caches from 256 to 16384 blocks.

    .venv/bin/python benchmarks/kv_cache_scaling.py [MODEL_DIR]
"""

from __future__ import annotations

import sys
import time

from vllm_metal_rs import _core


def decode_ms_per_step(runner, prompts, steps: int) -> float:
    runner.generate(prompts, 1)  # warm-up
    t0 = time.perf_counter()
    runner.generate(prompts, 1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.generate(prompts, steps + 1)
    total = time.perf_counter() - t0
    return (total - prefill) / steps * 1e3


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct"
    runner = _core.ModelRunner(model)
    info = _core.backend_info()
    print(f"backend {info['backend']}, blas {info['blas']}")
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(64)] for i in range(4)]
    mib_per_block = runner.kv_bytes_per_block() / 2**20
    print("| num_blocks | KV cache MiB | decode ms/step (batch 4) |")
    print("|---|---|---|")
    for num_blocks in (256, 1024, 4096, 16384):
        runner.allocate_kv_cache(num_blocks)
        ms = decode_ms_per_step(runner, prompts, 16)
        print(f"| {num_blocks} | {num_blocks * mib_per_block:.0f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
