"""Start-up of `vllm.LLM(model=MODEL)`: seconds from before `import vllm` to the first
generation (16 tokens, greedy) returned, and the engine's scheduler limits it started with.

    python benchmarks/startup_llm.py [MODEL]
"""

import sys
import time

t0 = time.monotonic()
from vllm import LLM, SamplingParams  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct"
llm = LLM(model=model)
t_ready = time.monotonic() - t0
out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
t_first = time.monotonic() - t0
sc = llm.llm_engine.vllm_config.scheduler_config
print(
    f"LLM ready {t_ready:.2f} s, first generation {t_first:.2f} s "
    f"(max_num_batched_tokens {sc.max_num_batched_tokens}): {out[0].outputs[0].text!r}"
)
