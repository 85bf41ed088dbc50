#!/usr/bin/env bash
# End-to-end serving, driven by `vllm bench serve` (random prompts) at several concurrencies:
# `vllm serve` with this plugin, and optionally `mlx_lm.server` on the same weights.
#
#   benchmarks/serve_bench.sh [MODEL_DIR] [CONCURRENCIES...]
#   e.g. benchmarks/serve_bench.sh models/SmolLM2-135M-Instruct 1 8
#        SERVERS="ours mlx-lm" benchmarks/serve_bench.sh smollm2 1 4 16
#
# MODEL_DIR "smollm2": the default model's weights dequantized to float32 safetensors (the
# directory engine_bench.py benchmarks, plus the default model's tokenizer), which both servers
# load; mlx_lm.server cannot read GGUF.
# SERVERS (default "ours"): "ours" and/or "mlx-lm", run one after the other on one port.
# INPUT_LEN / OUTPUT_LEN / PROMPTS_PER_LEVEL (default 128 / 128 / 4 x concurrency) and
# PORT (default 8765) adjust the run. Prints vLLM's result table for each server and level.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-models/SmolLM2-135M-Instruct}"
shift || true
LEVELS=("$@")
[ ${#LEVELS[@]} -gt 0 ] || LEVELS=(1 8)
SERVERS="${SERVERS:-ours}"
PORT="${PORT:-8765}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
VENV="$ROOT/.venv/bin"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$(mktemp -d)}"
export HF_HUB_OFFLINE=1

if [ "$MODEL" = smollm2 ]; then
    MODEL="$("$VENV/python" - "$ROOT" <<'EOF'
import shutil, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path.insert(0, str(root / "benchmarks"))
import engine_bench as eb
mx, _ = eb.import_engine()
src = root / "models/SmolLM2-135M-Instruct"
d = eb.prepare(mx, "smollm2", ["f32"], eb.DEFAULT_CACHE, src)["f32"]
for f in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
    if (src / f).exists() and not (d / f).exists():
        shutil.copy(src / f, d / f)
print(d)
EOF
)"
fi

LOG="$(mktemp)"
SERVER=
stop() { [ -z "$SERVER" ] || { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true; }; SERVER=; }
trap 'stop; rm -f "$LOG"' EXIT

for server in $SERVERS; do
    case "$server" in
        ours)
            "$VENV/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 \
                --kv-cache-memory-bytes 1073741824 >"$LOG" 2>&1 &
            backend=vllm; extra=() ;;
        mlx-lm)
            "$VENV/mlx_lm.server" --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
                --max-tokens "$OUTPUT_LEN" >"$LOG" 2>&1 &
            # vLLM's client sends "logprobs": null, which mlx_lm.server refuses (it wants a bool).
            backend=openai; extra=(--extra-body '{"logprobs": false}') ;;
        *) echo "serve_bench.sh: unknown server $server (ours, mlx-lm)" >&2; exit 2 ;;
    esac
    SERVER=$!
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
        kill -0 "$SERVER" 2>/dev/null || { tail -30 "$LOG"; exit 1; }
        sleep 1
    done
    for c in "${LEVELS[@]}"; do
        n="${PROMPTS_PER_LEVEL:-$((4 * c))}"
        echo "=== $server: concurrency $c, $n prompts, input $INPUT_LEN, output $OUTPUT_LEN ==="
        "$VENV/vllm" bench serve --backend "$backend" --base-url "http://127.0.0.1:$PORT" \
            --model "$MODEL" --tokenizer "$MODEL" --dataset-name random \
            --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --ignore-eos \
            --num-prompts "$n" --max-concurrency "$c" "${extra[@]}" \
            --percentile-metrics ttft,tpot --metric-percentiles 50,99 2>&1 |
            sed -n '/Serving Benchmark Result/,/^=*$/p'
    done
    stop
done
