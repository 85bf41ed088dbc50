"""Start-up time of `vllm serve`: seconds from launch to the first completion answered.

    python benchmarks/startup.py [--runs N] [--port P] MODEL [-- EXTRA_SERVE_ARGS...]

Each run launches `vllm serve MODEL` (this interpreter's vLLM), polls `/v1/models` until the
server is up, then sends one completion ("Once upon a time", 16 tokens, greedy), the same
completion again (the first request's latency once nothing is new), and stops the server. Every log line is stamped with the seconds since launch when it arrived, so the phases
(engine process start, weights, memory profile, KV cache, warm-up) can be read off; the lines
worth seeing are printed per run, and the medians at the end.
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
    args = p.parse_args(argv)
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
