#!/usr/bin/env bash
# Runs the test suites against the environment ./install.sh made:
#   1. Rust engine tests (cargo, release profile, against the installed MLX wheel)
#   2. Python tests (pytest: plugin, vLLM integration, end-to-end serving)
#
#   ./test.sh                 both
#   ./test.sh --rust | --python   one of them
#   PYTEST_ARGS="-k chat -x" ./test.sh --python
#
# PYTEST_TIMEOUT: per-test time limit in seconds (default 600).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

RUN_RUST=1
RUN_PYTHON=1
case "${1:-}" in
    "") ;;
    --rust) RUN_PYTHON=0 ;;
    --python) RUN_RUST=0 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown option: $1" >&2; exit 2 ;;
esac

[ -x "$PY" ] || { echo "test.sh: $VENV is missing: run ./install.sh first" >&2; exit 1; }

# The same environment install.sh builds with, so cargo reuses its build of mlx-sys (whose build
# script reruns when these change) and finds the MLX wheel.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export PYO3_PYTHON="$PY"
unset CONDA_PREFIX PYTHONHOME || true
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
# Tests never reach the Hugging Face hub.
export HF_HUB_OFFLINE=1

now() {
    if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/,/.}"; else date +%s; fi
}
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

START="$(now)"
status=0

if [ "$RUN_RUST" -eq 1 ]; then
    t="$(now)"
    echo "[test] ==> rust: cargo test -p vllm-metal-engine --release"
    if (cd "$ROOT" && cargo test -p vllm-metal-engine --release); then
        echo "[test] rust ... ok $(elapsed "$t")"
    else
        echo "[test] rust ... FAILED $(elapsed "$t")"
        status=1
    fi
fi

if [ "$RUN_PYTHON" -eq 1 ]; then
    t="$(now)"
    timeout_args="--timeout=${PYTEST_TIMEOUT:-600}"
    "$PY" -c "import pytest_timeout" 2>/dev/null || timeout_args=""  # plugin missing: no limit
    echo "[test] ==> python: pytest -q tests"
    set +e
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words by design
    (cd "$ROOT" && "$PY" -m pytest -q ${timeout_args:+"$timeout_args"} ${PYTEST_ARGS:-} tests)
    rc=$?
    set -e
    case "$rc" in
        0) echo "[test] python ... ok $(elapsed "$t")" ;;
        5) echo "[test] python ... no tests collected $(elapsed "$t")" ;;
        *) echo "[test] python ... FAILED (pytest exit $rc) $(elapsed "$t")"; status=1 ;;
    esac
fi

echo "[test] total $(elapsed "$START")"
exit "$status"
