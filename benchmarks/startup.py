"""Start-up time of `vllm serve`: seconds from launch to the first completion answered.

    python benchmarks/startup.py [--runs N] [--port P] MODEL [-- EXTRA_SERVE_ARGS...]
    python benchmarks/startup.py --floor [--runs N] MODEL    vLLM's floor for MODEL's tokenizer

Each run launches `vllm serve MODEL` (this interpreter's vLLM), polls `/v1/models` until the
server is up, then sends one completion ("Once upon a time", 16 tokens, greedy), the same
completion again (the first request's latency once nothing is new), and stops the server. Every log line is stamped with the seconds since launch when it arrived, so the phases
(engine process start, weights, memory profile, KV cache, warm-up) can be read off; the lines
worth seeing are printed per run, and the medians at the end.

--floor serves a trivially small checkpoint instead (one Llama layer of width 64, random weights)
with MODEL's tokenizer and vocabulary: what remains is vLLM's own start-up (imports, argument and
config handling, engine-process start, tokenizer load, API server) plus the plugin's import;
the engine's work (weights, memory profile, KV cache, warm-up, the request) is a few ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

# Log lines that mark a phase of start-up (matched anywhere in the line).
MARKS = [
    r"vLLM API server version",
    r"Initializing a V1 LLM engine",
    r"MLX backend",
    r"vllm-metal-rs: loaded",
    r"Loading weights took|Model loading took",
    r"memory: device",
    r"GPU KV cache size|Available KV cache memory",
    r"init engine .* took",
    r"warm-up|warm up",
    r"Starting vLLM (API|server)|Application startup complete",
]


def floor_model(model: str) -> str:
    """A one-layer Llama of width 64 with `model`'s tokenizer files and vocabulary size."""
    import shutil
    import tempfile

    import numpy as np
    from safetensors.numpy import save_file

    src = json.load(open(os.path.join(model, "config.json")))
    vocab, hidden, inter = src["vocab_size"], 64, 128
    out = tempfile.mkdtemp(prefix="startup-floor-")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "max_position_embeddings": src.get("max_position_embeddings", 2048),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **{k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src},
    }
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    rng = np.random.default_rng(0)
    w = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    p = "model.layers.0."
    save_file(
        {
            "model.embed_tokens.weight": w(vocab, hidden),
            "model.norm.weight": np.ones(hidden, np.float32),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            **{p + f"self_attn.{n}_proj.weight": w(hidden, hidden) for n in "qkvo"},
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
        },
        os.path.join(out, "model.safetensors"),
    )
    for f in os.listdir(model):
        if f.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(os.path.join(model, f), out)
    return out


def one_run(model: str, port: int, extra: list[str], verbose: bool) -> dict:
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    cmd = [vllm, "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                reader.join(2)
                tail = "\n".join(l for _, l in lines[-30:])
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as r:
                    served = json.load(r)["data"][0]["id"]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.1)
        t_ready = time.monotonic() - t0
        body = json.dumps(
            {"model": served, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
        ).encode()
        req = urllib.request.Request(
            f"{base}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            text = json.load(r)["choices"][0]["text"]
        t_first = time.monotonic() - t0
        # The same request again: what the first one costs once nothing is new.
        with urllib.request.urlopen(req, timeout=600) as r:
            json.load(r)
        t_second = time.monotonic() - t0 - t_first
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    marks = [(t, l) for t, l in lines if any(re.search(m, l) for m in MARKS)]
    if verbose:
        for t, l in lines:
            print(f"  {t:7.2f}  {l}")
    else:
        for t, l in marks:
            print(f"  {t:7.2f}  {l[:200]}")
    print(f"  ready {t_ready:.2f} s, first completion {t_first:.2f} s "
          f"(request {t_first - t_ready:.2f} s, again {t_second:.2f} s): {text!r}")
    return {"ready": t_ready, "first": t_first, "request": t_first - t_ready, "again": t_second}


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--verbose", action="store_true", help="print every log line")
    p.add_argument("--floor", action="store_true", help="serve a trivially small model instead")
    args = p.parse_args(argv)
    if args.floor:
        args.model = floor_model(args.model)
    results = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}: vllm serve {args.model} {' '.join(extra)}", flush=True)
        results.append(one_run(args.model, args.port, extra, args.verbose))
        sys.stdout.flush()
    for key in ("ready", "first", "request", "again"):
        vals = [r[key] for r in results]
        print(f"{key:8s} median {statistics.median(vals):7.2f} s  "
              f"({', '.join(f'{v:.2f}' for v in vals)})")


if __name__ == "__main__":
    main()
