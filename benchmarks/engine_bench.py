"""Engine speed, side by side with mlx-lm: same weights, same MLX device, one process, alternating.

For every model and weight format this measures, for our engine and for mlx-lm in turn:
- decode tok/s at each batch size after a 128-token prompt (greedy);
- prefill tok/s and time to first token of one 1024-token prompt;
- peak memory: the side's weights plus the peak MLX allocation above the level before the run
  (KV cache and activations). Both sides share one libmlx, so the counters are the same.

Models: `smollm2` (the real SmolLM2-135M weights of `--smollm2-dir`; a GGUF is dequantized),
`llama1b` (random weights of the Llama-3.2-1B shape: decode speed does not depend on the values)
and `moe` (random weights of a tiny-but-wide Qwen3-MoE: 64 experts, 8 active, experts stacked as
mlx-lm's `switch_mlp`), `qwen35` (a Qwen3.5-shaped hybrid: Gated DeltaNet and gated full attention)
and `gptoss` (a gpt-oss-shaped model: sinks, sliding / full layers, experts with biases); see their
configs below.
All are written once as safetensors directories under `--cache-dir` (outside the repository) and
then loaded by both engines, so both run the very same tensors:
- `f32`: float32, the only format the CPU backend runs fast (BLAS); used on `--device cpu`;
- `bf16`: bfloat16; `q4`: MLX affine 4-bit (group 64) quantization of the bf16 weights, as
  mlx-lm's converter writes it; both used on `--device gpu`.

    python benchmarks/engine_bench.py --device cpu --models smollm2 --quick
    python benchmarks/engine_bench.py --device gpu --out results-gpu.json

mlx-lm is optional (`pip install mlx-lm==0.32.2`); without it only our engine is measured.
vLLM is not needed: the engine module is imported directly.

How each side is timed:
- ours: `ModelRunner.generate` (engine alone, all prompts batched). The decode step time is
  (time of generate(N + 1 tokens) - time of generate(1 token)) / N; both calls run the same
  prefill, and every step returns its sampled ids to the host (as in serving). Steps are
  pipelined as under vLLM's async scheduling (its default): step i + 1 is built and submitted,
  reading step i's ids on the device, before step i's ids are read; `--sync` waits for each
  step's ids first (vLLM with `--no-async-scheduling`).
- mlx-lm: the model with `make_prompt_cache`, greedy argmax, the loop of mlx-lm's own generator:
  step i + 1 is queued with `mx.async_eval` before the ids of step i are read to the host.
  The prompt goes through the model without its last token (evaluating only the cache), then the
  last token gives the first sampled id, as mlx-lm's generator does.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
DEFAULT_CACHE = Path(
    os.environ.get("VLLM_METAL_RS_BENCH_CACHE", Path.home() / ".cache" / "vllm-metal-rs-bench")
)
MLX_LM_PIN = "mlx-lm==0.32.2"
CACHE_FORMAT = 1  # bump when the prepared directories change
Q_GROUP, Q_BITS = 64, 4

LLAMA1B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# A tiny-but-wide mixture of experts (Qwen3-MoE layout): 64 experts of which 8 run per token, so
# the decode step is dominated by routing and gathered expert matmuls rather than dense layers.
MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 256,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# A Qwen3.5-shaped hybrid, as transformers 5 writes a `Qwen3_5ForCausalLM` text config: the
# per-layer shapes of Qwen3.5-0.8B (hidden 1024, gated full attention with 8 query / 2 KV heads of
# 256, RoPE on a quarter of each head; Gated DeltaNet with 16 key and 16 value heads of 128 and a
# 4-tap convolution; SwiGLU 3584; tied embeddings), 8 layers instead of 24 (full attention every
# 4th: layers 3 and 7) and a 32000-token vocabulary instead of 248320, so that the float32 copy
# fits the CPU runs. `model_type` is mlx-lm's module name (it has none for `qwen3_5_text`).
QWEN35_CONFIG = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5",
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "full_attention_interval": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    "vocab_size": 32000,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# A gpt-oss-shaped model: gpt-oss-20b's attention (64 query / 8 KV heads of 64, q/k/v/o biases, a
# sink per head, sliding-window-128 and full layers alternating, YaRN x32 over 4096 positions) and
# routing (32 experts with biases, 4 active, softmax over the top-4 router logits, clamped SwiGLU),
# with hidden and expert width 1024 instead of 2880, 4 layers instead of 24 and a 32000-token
# vocabulary. `truncate: true`: mlx-lm's YaRN always rounds the correction range (gpt-oss's config
# says false), so both sides rotate alike.
GPTOSS_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "sliding_window": 128,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "rope_theta": 150000,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": True,
        "original_max_position_embeddings": 4096,
    },
    "max_position_embeddings": 131072,
    "initial_context_length": 4096,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

VARIANT_DTYPE = {"f32": "float32", "bf16": "bfloat16", "q4": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# imports


def import_engine():
    """mlx.core and our `_core`, with vllm_metal_rs imported first (it puts OpenBLAS ahead of the
    reference BLAS before libmlx loads, on Linux). Falls back to the repository's python/ dir."""
    try:
        import vllm_metal_rs  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "python"))
        import vllm_metal_rs  # noqa: F401
    import mlx.core as mx

    from vllm_metal_rs import _core

    return mx, _core


def import_mlx_lm():
    try:
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model
    except ImportError as e:
        print(
            f"note: mlx-lm is not importable ({e}); measuring our engine only. "
            f"To compare, install it: pip install {MLX_LM_PIN}",
            file=sys.stderr,
        )
        return None
    return mlx_lm.__version__, load_model, make_prompt_cache


# ---------------------------------------------------------------------------------------------
# weights: one safetensors directory per (model, variant), shared by both engines


def float32_from_gguf(mx, model_dir: Path) -> dict:
    """HF-named float32 tensors of a GGUF checkpoint directory, as the engine reads them (its
    quants dequantized, Q/K rows in HF order), for engines without a GGUF loader."""
    from vllm_metal_rs import _core

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.safetensors"
        _core.gguf_to_safetensors(str(model_dir), str(out))
        weights = mx.load(str(out))
        mx.eval(list(weights.values()))
    return weights


def float32_from_safetensors(mx, model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.astype(mx.float32) for k, v in mx.load(str(f)).items()})
    return out


def _random_bf16(mx, shapes: dict, seed: int, special=None) -> dict:
    """bfloat16 tensors of these shapes: norms (1-D) at 1, the rest N(0, 0.02), seeded per name;
    `special(name, shape, key)` may return another value for a name (None: the default)."""
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        key = mx.random.key(seed * 100003 + i)
        value = special(name, shape, key) if special else None
        if value is not None:
            out[name] = value
        elif len(shape) == 1:
            out[name] = mx.ones(shape, dtype=mx.bfloat16)
        else:
            out[name] = mx.random.normal(shape, dtype=mx.bfloat16, scale=0.02, key=key)
        mx.eval(out[name])
    return out


def _attention_shapes(p: str, d: int, q: int, kv: int) -> dict:
    """A decoder layer's norms and attention projections, `{name: shape}`."""
    return {
        f"{p}.input_layernorm.weight": (d,),
        f"{p}.post_attention_layernorm.weight": (d,),
        f"{p}.self_attn.q_proj.weight": (q, d),
        f"{p}.self_attn.k_proj.weight": (kv, d),
        f"{p}.self_attn.v_proj.weight": (kv, d),
        f"{p}.self_attn.o_proj.weight": (d, q),
    }


def random_llama_bf16(mx, config: dict, seed: int = 0) -> dict:
    """Random bfloat16 weights of a Llama config (std 0.02, unit norms)."""
    d, f = config["hidden_size"], config["intermediate_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(_attention_shapes(p, d, q, kv))
        shapes.update({
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
        })
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    return _random_bf16(mx, shapes, seed)


def random_moe_bf16(mx, config: dict, seed: int = 0) -> dict:
    """Random bfloat16 weights of a Qwen3-MoE config, experts stacked as mlx-lm's `switch_mlp`
    (the layout of mlx-community MoE checkpoints, which both engines read)."""
    d, hd, e, f = config["hidden_size"], config["head_dim"], config["num_experts"], config["moe_intermediate_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (config["vocab_size"], d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(_attention_shapes(p, d, q, kv))
        shapes.update({
            f"{p}.self_attn.q_norm.weight": (hd,),
            f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate.weight": (e, d),
            f"{p}.mlp.switch_mlp.gate_proj.weight": (e, f, d),
            f"{p}.mlp.switch_mlp.up_proj.weight": (e, f, d),
            f"{p}.mlp.switch_mlp.down_proj.weight": (e, d, f),
        })
    return _random_bf16(mx, shapes, seed)


# The norms Qwen3.5 applies as (1 + weight); mlx-lm's converter stores them with the 1 added.
QWEN35_PLUS_ONE_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                         ".q_norm.weight", ".k_norm.weight")


def random_qwen35_bf16(mx, config: dict, seed: int = 0) -> dict:
    """Random weights of a Qwen3.5 text config in transformers' layout: convolution `[C, 1, K]`,
    the (1 + weight) norms' bare weights at 0 (gain 1, as transformers initialises them), the
    DeltaNet's gated norm at 1, `A_log` = log(1..16) (float32), `dt_bias` at 1."""
    d, f, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv, kern = config["linear_key_head_dim"], config["linear_value_head_dim"], config["linear_conv_kernel_dim"]
    conv_dim = 2 * hk * dk + hv * dv
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    for i, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                       f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d), f"{p}.mlp.down_proj.weight": (d, f)})
        if kind == "linear_attention":
            a = f"{p}.linear_attn"
            shapes.update({
                f"{a}.in_proj_qkv.weight": (conv_dim, d), f"{a}.in_proj_z.weight": (hv * dv, d),
                f"{a}.in_proj_b.weight": (hv, d), f"{a}.in_proj_a.weight": (hv, d),
                f"{a}.conv1d.weight": (conv_dim, 1, kern), f"{a}.dt_bias": (hv,), f"{a}.A_log": (hv,),
                f"{a}.norm.weight": (dv,), f"{a}.out_proj.weight": (d, hv * dv),
            })
        else:
            q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
            shapes.update({
                f"{p}.self_attn.q_proj.weight": (2 * q, d), f"{p}.self_attn.k_proj.weight": (kv, d),
                f"{p}.self_attn.v_proj.weight": (kv, d), f"{p}.self_attn.o_proj.weight": (d, q),
                f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,),
            })
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], d)

    def special(name, shape, key):
        if name.endswith(QWEN35_PLUS_ONE_NORMS):
            return mx.zeros(shape, dtype=mx.bfloat16)
        if name.endswith("A_log"):
            return mx.log(mx.linspace(1, 16, shape[0], dtype=mx.float32))
        if name.endswith("conv1d.weight"):
            return mx.random.normal(shape, dtype=mx.bfloat16, scale=0.3, key=key)
        return None

    return _random_bf16(mx, shapes, seed, special)


def qwen35_layout(mx, weights: dict, variant: str) -> dict:
    """f32 / bf16: transformers' layout as written. q4: mlx-lm's converter's (the text stack under
    `language_model.`, convolution `[C, K, 1]`, the 1 of the (1 + weight) norms added in)."""
    if variant != "q4":
        return weights
    out = {}
    for name, w in weights.items():
        if name.endswith("conv1d.weight"):
            w = w.moveaxis(2, 1)
        elif name.endswith(QWEN35_PLUS_ONE_NORMS):
            w = w + 1.0
        out["language_model." + name] = w
    return out


def random_gptoss_bf16(mx, config: dict, seed: int = 0) -> dict:
    """Random weights of a gpt-oss config in mlx-lm's layout (experts stacked `[E, out, in]` as
    `mlp.experts.{gate,up,down}_proj` with `.bias`, which both engines read; transformers' fused
    `gate_up_proj` `[E, in, 2 * out]` is what mlx-lm's sanitize cannot split). Biases N(0, 0.02),
    sinks N(0, 1), router N(0, 0.1) (logits of order one: few near-ties between experts)."""
    d, hd, e, f = config["hidden_size"], config["head_dim"], config["num_local_experts"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (config["vocab_size"], d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(_attention_shapes(p, d, q, kv))
        shapes.update({
            f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
            f"{p}.self_attn.v_proj.bias": (kv,), f"{p}.self_attn.o_proj.bias": (d,),
            f"{p}.self_attn.sinks": (config["num_attention_heads"],),
            f"{p}.mlp.router.weight": (e, d), f"{p}.mlp.router.bias": (e,),
            f"{p}.mlp.experts.gate_proj.weight": (e, f, d), f"{p}.mlp.experts.gate_proj.bias": (e, f),
            f"{p}.mlp.experts.up_proj.weight": (e, f, d), f"{p}.mlp.experts.up_proj.bias": (e, f),
            f"{p}.mlp.experts.down_proj.weight": (e, d, f), f"{p}.mlp.experts.down_proj.bias": (e, d),
        })

    def special(name, shape, key):
        if name.endswith(".bias"):
            return mx.random.normal(shape, dtype=mx.bfloat16, scale=0.02, key=key)
        if name.endswith("sinks"):
            return mx.random.normal(shape, dtype=mx.bfloat16, key=key)
        if name.endswith("router.weight"):
            return mx.random.normal(shape, dtype=mx.bfloat16, scale=0.1, key=key)
        return None

    return _random_bf16(mx, shapes, seed, special)


def _as_written(mx, weights: dict, variant: str) -> dict:
    return weights


# name: (config, random bfloat16 weights, the layout each variant is written in)
RANDOM_MODELS = {
    "llama1b": (LLAMA1B_CONFIG, random_llama_bf16, _as_written),
    "moe": (MOE_CONFIG, random_moe_bf16, _as_written),
    "qwen35": (QWEN35_CONFIG, random_qwen35_bf16, qwen35_layout),
    "gptoss": (GPTOSS_CONFIG, random_gptoss_bf16, _as_written),
}
MODELS = ("smollm2", *RANDOM_MODELS)


def _quantizable(name: str, w) -> bool:
    """What mlx-lm's quantizer converts: the weights of linear layers, embeddings and stacked
    experts whose rows split into whole groups (not biases, norms, convolutions or `A_log`)."""
    return name.endswith(".weight") and "conv1d" not in name and w.ndim >= 2 and w.shape[-1] % Q_GROUP == 0


def write_variant(mx, dest: Path, config: dict, weights: dict, variant: str, source: dict, layout=_as_written) -> None:
    """Write `weights` (float) as `variant` into `dest`: config.json, model.safetensors, bench.json;
    `layout(mx, weights, variant)` renames / reshapes them first."""
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "torch_dtype", "dtype")}
    cfg["torch_dtype"] = VARIANT_DTYPE[variant]
    tensors = {}
    for name, w in layout(mx, weights, variant).items():
        if not name.endswith("A_log"):  # kept float32, as mlx-lm keeps it
            w = w.astype(mx.float32 if variant == "f32" else mx.bfloat16)
        if variant == "q4" and _quantizable(name, w):
            wq, scales, biases = mx.quantize(w, group_size=Q_GROUP, bits=Q_BITS)
            base = name[: -len(".weight")]
            tensors.update({name: wq, f"{base}.scales": scales, f"{base}.biases": biases})
        else:
            tensors[name] = w
    if variant == "q4":
        cfg["quantization"] = {"group_size": Q_GROUP, "bits": Q_BITS}
    mx.eval(list(tensors.values()))
    mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "bench.json").write_text(json.dumps({"format": CACHE_FORMAT, "variant": variant, "source": source}) + "\n")
    if dest.exists():
        for p in dest.iterdir():
            p.unlink()
        dest.rmdir()
    tmp.rename(dest)


def _cached(dest: Path, source: dict) -> bool:
    try:
        meta = json.loads((dest / "bench.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == CACHE_FORMAT and meta.get("source") == source


def prepare(mx, model: str, variants: list[str], cache_dir: Path, smollm2_dir: Path) -> dict[str, Path]:
    """The directory of each variant of `model`, written on first use."""
    if model == "smollm2":
        src = smollm2_dir.resolve()
        ggufs = sorted(src.glob("*.gguf"))
        files = ggufs[:1] or sorted(src.glob("*.safetensors"))
        if not files:
            raise SystemExit(f"no .gguf or .safetensors in {src} (pass --smollm2-dir)")
        source = {"model": model, "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]}
    else:
        source = {"model": model, "seed": 0, "config": RANDOM_MODELS[model][0]}
    dirs = {v: cache_dir / f"{model}-{v}" for v in variants}
    todo = [v for v in variants if not _cached(dirs[v], source)]
    if todo:
        t0 = time.perf_counter()
        if model == "smollm2":
            config = json.loads((src / "config.json").read_text())
            weights = float32_from_gguf(mx, src) if ggufs else float32_from_safetensors(mx, src)
        else:
            config = dict(RANDOM_MODELS[model][0])
            weights = RANDOM_MODELS[model][1](mx, config)
        layout = RANDOM_MODELS[model][2] if model in RANDOM_MODELS else _as_written
        for v in todo:
            print(f"writing {model} {v} weights to {dirs[v]}", file=sys.stderr, flush=True)
            write_variant(mx, dirs[v], config, weights, v, source, layout)
        del weights
        gc.collect()
        mx.clear_cache()
        print(f"  prepared in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return dirs


# ---------------------------------------------------------------------------------------------
# the two sides


class Ours:
    name = "ours"

    def __init__(self, mx, core, path: Path, device: str, dtype: str | None, pipeline: bool = True, gather: bool = False):
        self.mx = mx
        self.kw = {} if pipeline else {"pipeline": False}
        extra = {"gather_attention": True} if gather else {}
        self.runner = core.ModelRunner(str(path), block_size=16, device=device, dtype=dtype, **extra)
        self.bs = 16
        if self.runner.state_geometry is not None:
            # A linear-attention state lives in one block's page, as under vLLM, which raises the
            # attention block size of hybrids until it fits (to a multiple of 16 here).
            self.bs = self.state_block_size(self.runner)
            del self.runner
            gc.collect()
            self.runner = core.ModelRunner(str(path), block_size=self.bs, device=device, dtype=dtype, **extra)
        self.weights_nbytes = self.runner.weights_nbytes
        self.dtype = self.runner.kv_cache_dtype

    @staticmethod
    def state_block_size(runner) -> int:
        size = {"float32": 4, "float16": 2, "bfloat16": 2}
        (cw, cc), (h, dk, dv), ssm_dtype = runner.state_geometry
        state = cw * cc * size[runner.kv_cache_dtype] + h * dk * dv * size[ssm_dtype]
        per_token = runner.kv_bytes_per_block() / runner.num_layers / runner.block_size
        return 16 * math.ceil(state / per_token / 16)

    def _window(self, blocks: int):
        mx = self.mx
        self.runner.allocate_kv_cache(1)  # drop the previous cache
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        self.runner.allocate_kv_cache(blocks)
        return base

    def _blocks(self, prompts, max_tokens: int) -> int:
        return sum(math.ceil((len(p) + max_tokens) / self.bs) for p in prompts)

    def decode(self, prompts: list[list[int]], steps: int) -> dict:
        base = self._window(self._blocks(prompts, steps + 1))
        t0 = time.perf_counter()
        self.runner.generate(prompts, 1, **self.kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.runner.generate(prompts, steps + 1, **self.kw)
        total = time.perf_counter() - t0
        peak = max(0, self.mx.get_peak_memory() - base)
        self.runner.allocate_kv_cache(1)
        return {"step_s": (total - first) / steps, "ttft_s": first, "peak_run_bytes": peak, "tokens": out[0]}

    def decode_after_prefill(self, prompts: list[list[int]], steps: int) -> dict:
        """Decode steps after long prompts, from one `generate`: its wall time less the prefill
        step's own timed parts (the runner's step profile), over the steps. Two generate calls
        (`decode`) would subtract two long prefills of their own noise from each other."""
        base = self._window(self._blocks(prompts, steps + 1))
        self.runner.take_step_profile()
        t0 = time.perf_counter()
        out = self.runner.generate(prompts, steps + 1, **self.kw)
        total = time.perf_counter() - t0
        first = self.runner.take_step_profile()[0]
        prefill = sum(first[k] for k in ("build", "submit", "sample_build", "wait"))
        peak = max(0, self.mx.get_peak_memory() - base)
        self.runner.allocate_kv_cache(1)
        return {"step_s": (total - prefill) / steps, "ttft_s": prefill, "peak_run_bytes": peak, "tokens": out[0]}

    def prompt_logits(self, prompt: list[int]):
        self.runner.allocate_kv_cache(self._blocks([prompt], 0) + 4)
        logits = self.runner.step_logits([("check", prompt, 0, list(range(self._blocks([prompt], 0))))])
        self.runner.allocate_kv_cache(1)
        return logits

    def first_token(self, prompt: list[int]) -> dict:
        base = self._window(self._blocks([prompt], 1))
        t0 = time.perf_counter()
        out = self.runner.generate([prompt], 1, **self.kw)
        ttft = time.perf_counter() - t0
        peak = max(0, self.mx.get_peak_memory() - base)
        self.runner.allocate_kv_cache(1)
        return {"ttft_s": ttft, "peak_run_bytes": peak, "tokens": out[0]}


class MlxLm:
    name = "mlx-lm"

    def __init__(self, mx, mlx_lm, path: Path):
        _, load_model, self.make_prompt_cache = mlx_lm
        from mlx.utils import tree_flatten

        self.mx = mx
        self.model, _ = load_model(Path(path))
        params = tree_flatten(self.model.parameters())
        mx.eval([v for _, v in params])
        self.weights_nbytes = sum(v.nbytes for _, v in params)
        dtypes = {str(v.dtype) for k, v in params if k.endswith("norm.weight")}
        self.dtype = ",".join(sorted(d.replace("mlx.core.", "") for d in dtypes))

    def _window(self):
        mx = self.mx
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        return base

    def _prefill(self, toks, cache):
        """All but the last token fill the cache; the last gives the first token."""
        mx = self.mx
        if toks.shape[1] > 1:
            self.model(toks[:, :-1], cache=cache)
            mx.eval([c.state for c in cache])
        logits = self.model(toks[:, -1:], cache=cache)
        return mx.argmax(logits[:, -1, :], axis=-1)

    def decode(self, prompts: list[list[int]], steps: int) -> dict:
        mx = self.mx
        base = self._window()
        toks = mx.array(prompts, dtype=mx.int32)
        cache = self.make_prompt_cache(self.model)
        t0 = time.perf_counter()
        y = self._prefill(toks, cache)
        rows = [y.tolist()]
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            nxt = mx.argmax(self.model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(nxt)
            if i > 0:
                rows.append(y.tolist())  # ids of the previous step, read while this one runs
            y = nxt
        rows.append(y.tolist())
        total = time.perf_counter() - t0
        peak = max(0, mx.get_peak_memory() - base)
        del cache
        return {"step_s": total / steps, "ttft_s": first, "peak_run_bytes": peak, "tokens": [r[0] for r in rows]}

    decode_after_prefill = decode  # prefill and steps are timed apart already

    def prompt_logits(self, prompt: list[int]):
        import numpy as np

        logits = self.model(self.mx.array([prompt], dtype=self.mx.int32))[0].astype(self.mx.float32)
        return np.array(logits)

    def first_token(self, prompt: list[int]) -> dict:
        mx = self.mx
        base = self._window()
        toks = mx.array([prompt], dtype=mx.int32)
        cache = self.make_prompt_cache(self.model)
        t0 = time.perf_counter()
        y = self._prefill(toks, cache).tolist()
        ttft = time.perf_counter() - t0
        peak = max(0, mx.get_peak_memory() - base)
        del cache
        return {"ttft_s": ttft, "peak_run_bytes": peak, "tokens": y}


# ---------------------------------------------------------------------------------------------
# measuring


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(side, samples: list[dict], tokens_per_run: int | None) -> dict:
    out = {"weights_bytes": side.weights_nbytes, "compute_dtype": side.dtype}
    if "step_s" in samples[0]:
        step = statistics.median(s["step_s"] for s in samples)
        out.update({"step_ms": step * 1e3, "tok_s": tokens_per_run / step, "samples_step_ms": [s["step_s"] * 1e3 for s in samples]})
    ttft = statistics.median(s["ttft_s"] for s in samples)
    out["ttft_ms"] = ttft * 1e3
    out["samples_ttft_ms"] = [s["ttft_s"] * 1e3 for s in samples]
    out["peak_bytes"] = side.weights_nbytes + max(s["peak_run_bytes"] for s in samples)
    return out


def alternate(sides, fn, reps: int) -> dict[str, list[dict]]:
    """`reps` runs of each side, alternating, the order flipped every repetition."""
    got = {s.name: [] for s in sides}
    for r in range(reps):
        for s in sides if r % 2 == 0 else sides[::-1]:
            got[s.name].append(fn(s))
    return got


def bench_variant(mx, core, mlx_lm, model: str, variant: str, path: Path, args) -> list[dict]:
    device = args.device
    dtype = None if device == "cpu" else VARIANT_DTYPE[variant]
    mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
    sides = [Ours(mx, core, path, device, dtype, pipeline=not args.sync, gather=args.gather)]
    if mlx_lm is not None:
        sides.append(MlxLm(mx, mlx_lm, path))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    label = {"model": model, "weights": variant}
    for s in sides:
        print(f"{model} {variant}: {s.name} weights {s.weights_nbytes / 2**20:.1f} MiB, computes {s.dtype}", file=sys.stderr, flush=True)
    rows = []
    if mlx_lm is not None:
        rows.append(logits_check(sides, label, vocab))
    for b in args.batches:
        prompts = prompts_for(b, args.prompt_len, vocab, seed=b)
        # Warm-up: allocator, and on a GPU the kernels of every shape the timed runs meet.
        for s in sides:
            s.decode(prompts, args.steps if device == "gpu" else 2)
        got = alternate(sides, lambda s: s.decode(prompts, args.steps), args.reps)
        row = {**label, "kind": "decode", "batch": b, "prompt_len": args.prompt_len, "steps": args.steps}
        for s in sides:
            row[s.name] = summarize(s, got[s.name], b)
        if mlx_lm is not None:
            row["ratio"] = row["ours"]["tok_s"] / row["mlx-lm"]["tok_s"]
            row["greedy_agree"] = f"{agree(got['ours'][0]['tokens'], got['mlx-lm'][0]['tokens'])}/{args.steps + 1}"
        rows.append(row)
        print_progress(row)
    for length in (n for n in args.prefill_len if n > 0):
        prompt = prompts_for(1, length, vocab, seed=1000)[0]
        if device == "gpu" or length <= 1024:  # a CPU warm-up of a long prompt only costs time
            for s in sides:
                s.first_token(prompt)
        got = alternate(sides, lambda s: s.first_token(prompt), args.reps)
        row = {**label, "kind": "prefill", "batch": 1, "prompt_len": length}
        for s in sides:
            row[s.name] = summarize(s, got[s.name], None)
            row[s.name]["tok_s"] = length / (row[s.name]["ttft_ms"] / 1e3)
        if mlx_lm is not None:
            row["ratio"] = row["ours"]["tok_s"] / row["mlx-lm"]["tok_s"]
            row["greedy_agree"] = f"{agree(got['ours'][0]['tokens'], got['mlx-lm'][0]['tokens'])}/1"
        rows.append(row)
        print_progress(row)
    for length in args.context_lens:
        # Decode step time after a prompt of `length` tokens: what grows with the context.
        prompts = prompts_for(args.context_batch, length, vocab, seed=2000 + length)
        if device == "gpu":
            for s in sides:
                s.decode_after_prefill(prompts, 4)
        got = alternate(sides, lambda s: s.decode_after_prefill(prompts, args.context_steps), args.context_reps or args.reps)
        row = {**label, "kind": "context", "batch": args.context_batch, "prompt_len": length, "steps": args.context_steps}
        for s in sides:
            row[s.name] = summarize(s, got[s.name], args.context_batch)
        if mlx_lm is not None:
            row["ratio"] = row["ours"]["tok_s"] / row["mlx-lm"]["tok_s"]
            row["greedy_agree"] = f"{agree(got['ours'][0]['tokens'], got['mlx-lm'][0]['tokens'])}/{args.context_steps + 1}"
        rows.append(row)
        print_progress(row)
    del sides
    gc.collect()
    mx.clear_cache()
    return rows


def logits_check(sides, label: dict, vocab: int) -> dict:
    """Both sides' logits at every position of one 64-token prompt: the largest difference
    relative to the row's largest logit (mlx-lm's), and the positions whose argmax agrees."""
    import numpy as np

    prompt = prompts_for(1, 64, vocab, seed=3000)[0]
    ours, ref = (np.asarray(s.prompt_logits(prompt), dtype=np.float32) for s in sides)
    err = float((np.abs(ours - ref).max(axis=-1) / np.abs(ref).max(axis=-1)).max())
    same = int((ours.argmax(-1) == ref.argmax(-1)).sum())
    row = {**label, "kind": "logits", "prompt_len": len(prompt), "max_rel_err": err, "argmax_agree": f"{same}/{len(prompt)}"}
    print(f"{label['model']} {label['weights']} prompt logits: max rel err {err:.2e}, argmax agree {same}/{len(prompt)}", file=sys.stderr, flush=True)
    return row


def print_progress(row: dict) -> None:
    parts = [f"{row['model']} {row['weights']} {row['kind']} B={row['batch']} L={row['prompt_len']}:"]
    for side in ("ours", "mlx-lm"):
        if side in row:
            r = row[side]
            parts.append(f"{side} {r['tok_s']:.1f} tok/s" + (f" ({r['step_ms']:.2f} ms/step)" if "step_ms" in r else f" (TTFT {r['ttft_ms']:.1f} ms)"))
    if "ratio" in row:
        parts.append(f"ratio {row['ratio']:.2f}, greedy agree {row['greedy_agree']}")
    print(" ".join(parts), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# report


def _f(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _cell(row: dict, side: str, key: str, scale: float = 1.0) -> str:
    return _f(row[side][key] * scale) if side in row else "-"


def markdown(result: dict) -> str:
    rows = result["rows"]
    dec = [r for r in rows if r["kind"] == "decode"]
    mib = 1 / 2**20
    m = result["meta"]
    lines = [
        f"Device {m['device']}: {m.get('device_name', '?')} ({m['backend']['backend']} backend"
        + (f", BLAS {m['backend']['blas']}" if m["device"] == "cpu" else "")
        + f"), MLX {m['mlx']}, "
        f"mlx-lm {m['mlx_lm'] or 'not installed'}; {m['note']}",
        f"Load average before / after: {m['load_before']} / {m['load_after']}; command: `{m['command']}`",
        "",
        f"Decode after a {dec[0]['prompt_len'] if dec else '?'}-token prompt, greedy "
        f"(median of {m['reps']} runs of {m['steps']} steps). Peak = weights + peak MLX allocation of the run.",
        "",
        "| model | weights | batch | ours tok/s | mlx-lm tok/s | ours / mlx-lm | ours ms/step | mlx-lm ms/step | ours peak MiB | mlx-lm peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["kind"] == "decode"):
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['batch']} | {_cell(r, 'ours', 'tok_s')} | {_cell(r, 'mlx-lm', 'tok_s')} | "
            f"{ratio} | {_cell(r, 'ours', 'step_ms')} | {_cell(r, 'mlx-lm', 'step_ms')} | "
            f"{_cell(r, 'ours', 'peak_bytes', mib)} | {_cell(r, 'mlx-lm', 'peak_bytes', mib)} |"
        )
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        lines += [
            "",
            "Prefill of one prompt: tok/s = prompt length / time to first token.",
            "",
            "| model | weights | prompt | ours tok/s | mlx-lm tok/s | ours / mlx-lm | ours TTFT ms | mlx-lm TTFT ms | ours peak MiB | mlx-lm peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in pre:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            lines.append(
                f"| {r['model']} | {r['weights']} | {r['prompt_len']} | {_cell(r, 'ours', 'tok_s')} | {_cell(r, 'mlx-lm', 'tok_s')} | "
                f"{ratio} | {_cell(r, 'ours', 'ttft_ms')} | {_cell(r, 'mlx-lm', 'ttft_ms')} | "
                f"{_cell(r, 'ours', 'peak_bytes', mib)} | {_cell(r, 'mlx-lm', 'peak_bytes', mib)} |"
            )
    ctx = [r for r in rows if r["kind"] == "context"]
    if ctx:
        lines += [
            "",
            f"Decode step after a prompt of each length (batch {ctx[0]['batch']}, median of {m.get('context_reps') or m['reps']} runs of "
            f"{ctx[0]['steps']} steps; ours: one generate less its prefill step).",
            "",
            "| model | weights | context | ours ms/step | mlx-lm ms/step | ours / mlx-lm (speed) | ours peak MiB | mlx-lm peak MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ctx:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            lines.append(
                f"| {r['model']} | {r['weights']} | {r['prompt_len']} | {_cell(r, 'ours', 'step_ms')} | {_cell(r, 'mlx-lm', 'step_ms')} | "
                f"{ratio} | {_cell(r, 'ours', 'peak_bytes', mib)} | {_cell(r, 'mlx-lm', 'peak_bytes', mib)} |"
            )
    chk = [r for r in rows if r["kind"] == "logits"]
    if chk:
        lines += ["", "Same weights, same function: prompt logits of a 64-token prompt, ours vs mlx-lm.", "",
                  "| model | weights | max rel err | argmax agree |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['weights']} | {r['max_rel_err']:.1e} | {r['argmax_agree']} |" for r in chk]
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _device_name(mx, device: str) -> str:
    try:
        info = mx.device_info(mx.Device(mx.cpu if device == "cpu" else mx.gpu))
        return str(info.get("device_name", "?"))
    except Exception:  # older MLX: no device_info
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], help="MLX device (default: the GPU when MLX has one)")
    ap.add_argument("--models", default="smollm2,llama1b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--variants", help="comma-separated weight formats: f32, bf16, q4 (default: f32 on cpu, bf16,q4 on gpu)")
    ap.add_argument("--batches", type=_ints, help="decode batch sizes (default 1,4,16,64)")
    ap.add_argument("--steps", type=int, help="decode steps per timed run (default 128)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length before decode (default 128)")
    ap.add_argument("--prefill-len", type=_ints, help="prompt lengths of the prefill / TTFT runs (default 1024; 0 skips)")
    ap.add_argument("--context-lens", type=_ints, default=[], help="decode step time after prompts of these lengths, e.g. 128,2048,8192")
    ap.add_argument("--context-batch", type=int, default=1, help="batch of the --context-lens rows (default 1)")
    ap.add_argument("--context-steps", type=int, default=32, help="decode steps of the --context-lens rows (default 32)")
    ap.add_argument("--context-reps", type=int, help="timed runs per side of the --context-lens rows (default --reps)")
    ap.add_argument("--reps", type=int, help="timed runs per side and row, alternating (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batches 1,4, 8 steps, prefill 256, 1 rep")
    ap.add_argument("--no-mlx-lm", action="store_true", help="measure our engine only")
    ap.add_argument("--sync", action="store_true", help="ours waits for each step's ids before building the next")
    ap.add_argument("--gather", action="store_true", help="ours gathers the history for decode attention (no page-reading kernel)")
    ap.add_argument("--smollm2-dir", type=Path, default=DEFAULT_SMOLLM2, help="SmolLM2-135M dir (GGUF or safetensors + config.json)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where prepared weights are kept (default %(default)s)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    quick = {"batches": [1, 4], "steps": 8, "prefill_len": [256], "reps": 1}
    full = {"batches": [1, 4, 16, 64], "steps": 128, "prefill_len": [1024], "reps": 3}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    load_before = _load()
    mx, core = import_engine()
    info = dict(core.backend_info())
    if args.device is None:
        args.device = info["device"]
    if args.device == "gpu" and info["device"] != "gpu":
        raise SystemExit("--device gpu: this MLX has no GPU backend (on CUDA: pip install 'mlx[cuda13]')")
    variants = (args.variants or ("f32" if args.device == "cpu" else "bf16,q4")).split(",")
    for v in variants:
        if v not in VARIANT_DTYPE:
            raise SystemExit(f"unknown weight format {v!r}: use f32, bf16, q4")
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}: use {', '.join(MODELS)}")
    mlx_lm = None if args.no_mlx_lm else import_mlx_lm()

    if args.device == "cpu":
        note = "CPU device: both compute float32 (our engine always does on CPU; mlx-lm is given float32 weights)"
        if variants != ["f32"]:
            note = ("CPU device: our engine computes float32 whatever the weights, mlx-lm computes the weights' "
                    "dtype; only the f32 rows compare like with like")
    else:
        note = ("GPU device: both compute in the weights' dtype (bf16; q4 = MLX affine 4-bit, group 64, "
                "bf16 scales and activations)")
    print(note, file=sys.stderr)
    rows = []
    for model in models:
        dirs = prepare(mx, model, variants, args.cache_dir.expanduser(), args.smollm2_dir)
        for v in variants:
            rows += bench_variant(mx, core, mlx_lm, model, v, dirs[v], args)

    result = {
        "meta": {
            "device": args.device,
            "backend": info,
            "device_name": _device_name(mx, args.device),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm[0] if mlx_lm else None,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "note": note,
            "steps": args.steps,
            "reps": args.reps,
            "context_reps": args.context_reps or args.reps,
            "load_before": load_before,
            "load_after": _load(),
            "command": " ".join(["python", "benchmarks/engine_bench.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "rows": rows,
    }
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
