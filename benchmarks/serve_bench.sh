#!/usr/bin/env bash
# End-to-end serving throughput of the default model through `vllm serve` with this plugin,
# driven by `vllm bench serve` (random prompts) at several concurrencies.
#
#   benchmarks/serve_bench.sh [MODEL_DIR] [CONCURRENCIES...]
#   e.g. benchmarks/serve_bench.sh models/SmolLM2-135M-Instruct 1 8
#
# INPUT_LEN / OUTPUT_LEN / PROMPTS_PER_LEVEL (default 128 / 128 / 4 x concurrency) and
# PORT (default 8765) adjust the run. Prints vLLM's result table for each level.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-models/SmolLM2-135M-Instruct}"
shift || true
LEVELS=("$@")
[ ${#LEVELS[@]} -gt 0 ] || LEVELS=(1 8)
PORT="${PORT:-8765}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
VENV="$ROOT/.venv/bin"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$(mktemp -d)}"
export HF_HUB_OFFLINE=1

LOG="$(mktemp)"
"$VENV/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 \
    --kv-cache-memory-bytes 1073741824 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { tail -30 "$LOG"; exit 1; }
    sleep 1
done

for c in "${LEVELS[@]}"; do
    n="${PROMPTS_PER_LEVEL:-$((4 * c))}"
    echo "=== concurrency $c, $n prompts, input $INPUT_LEN, output $OUTPUT_LEN ==="
    "$VENV/vllm" bench serve --backend vllm --base-url "http://127.0.0.1:$PORT" \
        --model "$MODEL" --tokenizer "$MODEL" --dataset-name random \
        --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --ignore-eos \
        --num-prompts "$n" --max-concurrency "$c" \
        --percentile-metrics ttft,tpot --metric-percentiles 50,99 2>&1 |
        sed -n '/Serving Benchmark Result/,/^=*$/p'
done
