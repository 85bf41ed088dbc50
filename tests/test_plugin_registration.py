"""The plugin as vLLM sees it: registration, platform selection, env variables, config checks.

Only the last test needs the Rust extension. Those that resolve vLLM's current platform through
the entry point run only once the package is installed (the entry point comes with install).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import vllm_metal_rs
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import vllm_metal_rs

from vllm_metal_rs import envs

PLATFORM_PATH = "vllm_metal_rs.platform.MetalPlatform"
OUR_VARS = {
    "VLLM_METAL_MEMORY_FRACTION": "0.4",
    "VLLM_METAL_BLOCK_SIZE": "32",
    "VLLM_MLX_DEVICE": "cpu",
    "VLLM_METAL_DEBUG": "0",
}
# Where the package was imported from, so subprocesses import the same copy.
PACKAGE_ROOT = str(Path(vllm_metal_rs.__file__).resolve().parents[1])


def _entry_point_installed() -> bool:
    eps = importlib.metadata.entry_points(group="vllm.platform_plugins")
    return any(ep.name == "metal" and ep.value == "vllm_metal_rs:register" for ep in eps)


needs_install = pytest.mark.skipif(
    not _entry_point_installed(),
    reason="vllm-metal-rs is not installed, so vLLM cannot find its entry point",
)


@pytest.fixture(scope="module")
def vllm_cache(tmp_path_factory) -> Path:
    # Shared so vLLM's model-inspection cache is built once for the module.
    return tmp_path_factory.mktemp("vllm-cache")


def _subprocess_env(cache: Path, **overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OUR_VARS
        and k not in ("VLLM_PLUGINS", "VLLM_TARGET_DEVICE", "VLLM_USE_V2_MODEL_RUNNER")
    }
    env["VLLM_CACHE_ROOT"] = str(cache)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT=") :])


# --- register() ---------------------------------------------------------------------------------


def test_register_returns_platform_path():
    assert vllm_metal_rs.register() == PLATFORM_PATH


def test_register_returns_none_and_says_why_without_mlx(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # makes `import mlx.core` fail
    ours = logging.getLogger("vllm.vllm_metal_rs")
    ours.addHandler(caplog.handler)  # vLLM's "vllm" logger does not propagate to root
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.vllm_metal_rs"):
            assert vllm_metal_rs.register() is None
    finally:
        ours.removeHandler(caplog.handler)
    assert any("mlx.core" in r.getMessage() for r in caplog.records)


def test_register_makes_vllm_know_our_variables(monkeypatch, caplog):
    import vllm.envs as vllm_envs
    from vllm.platforms.interface import Platform

    for name, value in OUR_VARS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VLLM_METAL_NO_SUCH_VARIABLE", "1")  # control: must still be reported
    vllm_metal_rs.register()
    assert set(OUR_VARS) <= set(vllm_envs.environment_variables)
    assert vllm_envs.VLLM_METAL_BLOCK_SIZE == 32

    interface_logger = logging.getLogger("vllm.platforms.interface")
    interface_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.platforms.interface"):
            Platform.validate_environ(hard_fail=False)
    finally:
        interface_logger.removeHandler(caplog.handler)
    reported = " ".join(r.getMessage() for r in caplog.records)
    assert "VLLM_METAL_NO_SUCH_VARIABLE" in reported
    for name in OUR_VARS:
        assert name not in reported


# --- our environment variables ------------------------------------------------------------------


def test_env_defaults(monkeypatch):
    import mlx.core as mx

    for name in OUR_VARS:
        monkeypatch.delenv(name, raising=False)
    has_gpu = mx.is_available(mx.gpu)
    assert envs.memory_fraction() == (0.5 if has_gpu else 0.3)
    assert envs.block_size() == 16
    assert envs.debug() is False
    assert envs.mlx_device() == ("gpu" if has_gpu else "cpu")


def test_env_values_parse(monkeypatch):
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.25")
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "64")
    monkeypatch.setenv("VLLM_MLX_DEVICE", "CPU")
    monkeypatch.setenv("VLLM_METAL_DEBUG", "true")
    assert envs.memory_fraction() == 0.25
    assert envs.block_size() == 64
    assert envs.mlx_device() == "cpu"
    assert envs.debug() is True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VLLM_METAL_MEMORY_FRACTION", "half"),
        ("VLLM_METAL_MEMORY_FRACTION", "0"),
        ("VLLM_METAL_MEMORY_FRACTION", "1.5"),
        ("VLLM_METAL_MEMORY_FRACTION", "nan"),
        ("VLLM_METAL_BLOCK_SIZE", "0"),
        ("VLLM_METAL_BLOCK_SIZE", "16.5"),
        ("VLLM_MLX_DEVICE", "tpu"),
        ("VLLM_METAL_DEBUG", "maybe"),
    ],
)
def test_env_bad_value_is_one_line_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as excinfo:
        envs.validate_all()
    message = str(excinfo.value)
    assert name in message
    assert "\n" not in message


# --- platform selection through the entry point -------------------------------------------------

PROBE = """
import json
from vllm.platforms import current_platform
cls = type(current_platform)
current_platform.validate_environ(False)
print("RESULT=" + json.dumps(cls.__module__ + "." + cls.__qualname__))
"""


@needs_install
@pytest.mark.parametrize(
    ("plugins", "ours"),
    [(None, True), ("metal", True), ("", False), ("someother", False)],
    ids=["unset", "metal", "empty", "other"],
)
def test_current_platform_follows_vllm_plugins(vllm_cache, plugins, ours):
    proc = _run(PROBE, _subprocess_env(vllm_cache, VLLM_PLUGINS=plugins))
    assert (_result(proc) == PLATFORM_PATH) is ours


@needs_install
def test_no_unknown_variable_warning_for_our_variables(vllm_cache):
    env = _subprocess_env(vllm_cache, **OUR_VARS, VLLM_METAL_NO_SUCH_VARIABLE="1")
    proc = _run(PROBE, env)
    assert _result(proc) == PLATFORM_PATH
    output = proc.stdout + proc.stderr
    assert "Unknown vLLM environment variable detected: VLLM_METAL_NO_SUCH_VARIABLE" in output
    for name in OUR_VARS:
        assert f"Unknown vLLM environment variable detected: {name}" not in output


# --- configuration checks -----------------------------------------------------------------------

# Builds real VllmConfigs through EngineArgs with the metal platform forced as the current one
# (before install there is no entry point to select it). No weights or tokenizer are read.
CONFIG_PROBE = """
import json, sys
import vllm.platforms
from vllm_metal_rs.platform import MetalPlatform
vllm.platforms._current_platform = MetalPlatform()
from vllm.engine.arg_utils import EngineArgs

def build(**kwargs):
    try:
        args = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, **kwargs)
        cfg = args.create_engine_config()
    except Exception as e:
        return {"error": str(e)}
    return {
        "worker_cls": cfg.parallel_config.worker_cls,
        "block_size": cfg.cache_config.block_size,
        "dtype": str(cfg.model_config.dtype),
        "async_scheduling": cfg.scheduler_config.async_scheduling,
        "enforce_eager": cfg.model_config.enforce_eager,
        "compilation_mode": int(cfg.compilation_config.mode),
        "cudagraph_mode": cfg.compilation_config.cudagraph_mode.name,
        "use_v2_model_runner": cfg.use_v2_model_runner,
    }

print("RESULT=" + json.dumps({
    "default": build(),
    "user_block_size": build(block_size=64),
    "tp2": build(tensor_parallel_size=2),
    "kv_fp8": build(kv_cache_dtype="fp8"),
}))
"""


@pytest.fixture(scope="module")
def config_results(tmp_path_factory, vllm_cache) -> dict:
    model = tmp_path_factory.mktemp("tiny-llama")
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 2,
                "vocab_size": 256,
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "float32",
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    env = _subprocess_env(vllm_cache, VLLM_METAL_BLOCK_SIZE="32")
    return _result(_run(CONFIG_PROBE, env, str(model)))


def test_config_is_adapted_for_the_engine(config_results):
    cfg = config_results["default"]
    assert "error" not in cfg, cfg
    assert cfg["worker_cls"] == "vllm_metal_rs.worker.MetalWorker"
    assert cfg["block_size"] == 32  # from VLLM_METAL_BLOCK_SIZE
    assert cfg["dtype"] == "torch.float32"  # a float32 checkpoint stays float32 under "auto"
    assert cfg["async_scheduling"] is True  # vLLM's default, which the engine supports
    assert cfg["enforce_eager"] is True
    assert cfg["compilation_mode"] == 0
    assert cfg["cudagraph_mode"] == "NONE"
    assert cfg["use_v2_model_runner"] is False


def test_user_block_size_wins_over_the_variable(config_results):
    assert config_results["user_block_size"]["block_size"] == 64


def test_tensor_parallel_is_rejected_with_a_clear_message(config_results):
    error = config_results["tp2"].get("error", "")
    assert "tensor_parallel_size=2 is not supported" in error


def test_quantized_kv_cache_is_rejected(config_results):
    error = config_results["kv_fp8"].get("error", "")
    assert "kv_cache_dtype='fp8' is not supported" in error


def _fake_config(**changes) -> SimpleNamespace:
    """The fields _reject_unsupported reads, at supported values unless changed."""
    import torch

    parallel = SimpleNamespace(
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        data_parallel_size=1,
        decode_context_parallel_size=1,
        prefill_context_parallel_size=1,
    )
    model = SimpleNamespace(
        runner_type="generate",
        hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]),
        multimodal_config=None,
        quantization=None,
        enable_prompt_embeds=False,
        logits_processors=None,
        dtype=torch.float32,
    )
    cfg = SimpleNamespace(
        parallel_config=parallel,
        model_config=model,
        cache_config=SimpleNamespace(cache_dtype="auto", mamba_cache_dtype="auto", mamba_ssm_cache_dtype="auto"),
        lora_config=None,
        speculative_config=None,
        kv_transfer_config=None,
    )
    for path, value in changes.items():
        target = cfg
        *parents, leaf = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    return cfg


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"parallel_config__tensor_parallel_size": 2}, "tensor_parallel_size=2"),
        ({"parallel_config__pipeline_parallel_size": 2}, "pipeline_parallel_size=2"),
        ({"parallel_config__data_parallel_size": 2}, "data_parallel_size=2"),
        ({"lora_config": object()}, "LoRA"),
        ({"speculative_config": object()}, "speculative decoding"),
        (
            {"model_config__runner_type": "pooling", "model_config__hf_config": SimpleNamespace(architectures=["GPT2LMHeadModel"])},
            "pooling is not supported for GPT2LMHeadModel",
        ),
        (
            {
                "model_config__multimodal_config": SimpleNamespace(),
                "model_config__hf_config": SimpleNamespace(architectures=["LlavaForConditionalGeneration"]),
            },
            "multimodal model LlavaForConditionalGeneration is not supported",
        ),
        ({"cache_config__mamba_cache_dtype": "float16"}, "mamba_cache_dtype='float16'"),
        ({"cache_config__mamba_ssm_cache_dtype": "float8"}, "mamba_ssm_cache_dtype='float8'"),
        ({"model_config__quantization": "awq"}, "quantization='awq'"),
        ({"cache_config__cache_dtype": "fp8"}, "kv_cache_dtype='fp8'"),
        ({"model_config__logits_processors": ["my.Processor"]}, "logits_processors"),
        (
            {"model_config__disable_sliding_window": True, "model_config__hf_text_config": SimpleNamespace(sliding_window=24)},
            "disable_sliding_window",
        ),
    ],
)
def test_unsupported_features_are_rejected(monkeypatch, changes, fragment):
    from vllm_metal_rs.platform import MetalPlatform

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    MetalPlatform._reject_unsupported(_fake_config())  # the baseline passes
    with pytest.raises(ValueError) as excinfo:
        MetalPlatform._reject_unsupported(_fake_config(**changes))
    assert fragment in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_requests_the_engine_cannot_honour_are_rejected_the_rest_accepted():
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    from vllm_metal_rs.platform import MetalPlatform

    for params in (
        SamplingParams(max_tokens=4),
        SamplingParams(logprobs=2, prompt_logprobs=1),
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+")),
    ):
        MetalPlatform.validate_request({}, params)
    for params in (
        SamplingParams(logprob_token_ids=[1, 2]),
        SamplingParams(prompt_logprob_token_ids=[[1, 2]]),
        SamplingParams(thinking_token_budget=8),
    ):
        # A ValueError for offline callers; a client error (HTTP 400) for the server.
        with pytest.raises(ValueError, match="not supported") as excinfo:
            MetalPlatform.validate_request({}, params)
        assert isinstance(excinfo.value, VLLMClientError)


def test_metal_model_runner_is_the_rust_runner(core):
    from vllm_metal_rs import worker

    assert worker.MetalModelRunner is core.ModelRunner


def test_core_stub_types_every_export(core):
    """_core.pyi names every function and class the extension exports, and every method and
    attribute of its classes (and nothing it does not export)."""
    import ast
    from pathlib import Path

    import vllm_metal_rs

    stub = ast.parse((Path(vllm_metal_rs.__file__).parent / "_core.pyi").read_text())
    helpers = {"LogprobsArrays", "BackendInfo", "StepTimingDict"}  # types of the stub only
    top = {
        n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    } | {t.id for n in stub.body if isinstance(n, ast.Assign) for t in n.targets}
    exported = {n for n in dir(core) if not n.startswith("_")}
    assert top - helpers == exported, (top - helpers) ^ exported
    for cls in (n for n in stub.body if isinstance(n, ast.ClassDef) and n.name in exported):
        members = {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and f.name != "__init__"}
        real = {n for n in dir(getattr(core, cls.name)) if not n.startswith("_")}
        if cls.name == "EngineError":
            continue
        assert members == real, (cls.name, members ^ real)
