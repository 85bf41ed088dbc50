"""Checkpoint files in the formats the engine reads besides safetensors: GGUF files of the tiny
models (llama.cpp's layout) with transformers' GGUF loader as their reader, and MLX-quantized
directories (mlx-community's layout) with their dequantized twin for transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------
# transformers GGUF loading
# --------------------------------------------------------------------------------------------------


def load_hf_gguf(gguf_path: str | os.PathLike):
    """transformers' model from a GGUF file (dequantized to float32, llama.cpp's Q/K row permutation
    undone by transformers' GGUF loader).

    transformers requires `accelerate` for GGUF loading, but only as an install check: the load path
    of a GGUF file on CPU without device_map does not use it. If accelerate is missing we bypass that
    one check for this call only.
    """
    import torch
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    import functools

    import gguf

    p = Path(gguf_path).resolve()
    orig = mu.is_accelerate_available
    orig_name_map = gguf.get_tensor_name_map
    try:
        if not orig():
            mu.is_accelerate_available = lambda *a, **k: True
        # transformers rebuilds the same (pure) name map once per module of the model, ~8 s for
        # SmolLM2; the answer does not change, so memoize it for this call.
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_name_map)
        model = AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch.float32, attn_implementation="eager"
        )
    finally:
        mu.is_accelerate_available = orig
        gguf.get_tensor_name_map = orig_name_map
    return model.eval()


def load_hf_gguf_tokenizer(gguf_path: str | os.PathLike):
    from transformers import AutoTokenizer

    p = Path(gguf_path).resolve()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


# --------------------------------------------------------------------------------------------------
# Tiny GGUF writer (for loader tests)
# --------------------------------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's GGUF layout of q_proj/k_proj rows: within each head, the rotate-half pairs
    (i, i + d/2) become adjacent rows (2i, 2i + 1). transformers' GGUF loader undoes this."""
    out_dim, in_dim = w.shape
    d = out_dim // n_head
    return w.reshape(n_head, 2, d // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def write_tiny_gguf(
    out_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    weight_type=None,
    override_types: dict[str, "object"] | None = None,
) -> Path:
    """Write the tiny safetensors checkpoint in `model_dir` as a GGUF of its llama.cpp architecture
    ("llama" for LlamaForCausalLM, "qwen2" for Qwen2ForCausalLM, with its q/k/v biases).

    2-D weights are stored as `weight_type` (a gguf.GGMLQuantizationType, default F32); the RMSNorm
    gains always as F32, as llama.cpp does. `override_types` maps a GGUF tensor name (e.g. "blk.0.ffn_down.weight") to a
    gguf.GGMLQuantizationType to store that tensor in (quantized with gguf-py where it can, else raw
    bytes of the right size). Validate the F32 output with `load_hf_gguf` before relying on it.
    """
    import gguf
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    for f in files:
        tensors.update(load_file(str(model_dir / f)))

    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    n_head = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
    # llama.cpp permutes q/k rows (for its interleaved RoPE) in llama files only.
    permute = arch == "llama"
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
    }
    for i in range(cfg["num_hidden_layers"]):
        for k, v in per_layer.items():
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"

    override_types = override_types or {}
    for hf_name in sorted(tensors):
        if hf_name not in names:
            raise KeyError(f"unexpected tensor {hf_name}")
        g_name = names[hf_name]
        arr = np.ascontiguousarray(tensors[hf_name].astype(np.float32))
        if permute and hf_name.endswith("q_proj.weight"):
            arr = _llama_cpp_permute(arr, n_head)
        elif permute and hf_name.endswith("k_proj.weight"):
            arr = _llama_cpp_permute(arr, n_kv)
        qtype = override_types.get(g_name, weight_type if arr.ndim == 2 else None)
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g_name, arr)
            continue
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g_name, arr.astype(np.float16))
            continue
        try:
            data = gguf.quants.quantize(arr, qtype)
        except Exception:  # gguf-py cannot quantize this type: right-sized raw bytes
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = arr.shape
            assert cols % block == 0, f"{g_name}: {cols} columns not a multiple of {block}"
            rng = np.random.default_rng(0)
            data = rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
        w.add_tensor(g_name, data, raw_dtype=qtype)
    missing_override = set(override_types) - set(names.values())
    if missing_override:
        raise KeyError(f"no such GGUF tensor: {sorted(missing_override)}")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)


# --------------------------------------------------------------------------------------------------
# MLX-quantized directories (the layout of mlx-community checkpoints)
# --------------------------------------------------------------------------------------------------


def _copy_side_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())


#: The (1 + weight) norms of Qwen3-Next / Qwen3.5, which mlx-lm's converter stores with the 1 added.
_PLUS_ONE_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                   ".q_norm.weight", ".k_norm.weight")


def _mlx_lm_hybrid(tensors: dict, qcfg: dict, *, vl_wrapper: bool) -> tuple[dict, dict]:
    """mlx-lm's layout of Qwen3-Next / Qwen3.5 checkpoints: the convolution `[C, K, 1]`, the
    (1 + weight) norms with the 1 added, and (`vl_wrapper`, Qwen3.5's vision-language class) the
    text stack under `language_model.`."""
    out = {}
    for name, w in tensors.items():
        if name.endswith("conv1d.weight"):
            w = np.ascontiguousarray(np.moveaxis(w, 2, 1))
        elif name.endswith(_PLUS_ONE_NORMS) and w.ndim == 1:
            w = w + 1.0
        out[("language_model." + name) if vl_wrapper else name] = w
    if vl_wrapper:
        qcfg = {(f"language_model.{k}" if isinstance(v, dict) else k): v for k, v in qcfg.items()}
    return out, qcfg


def write_mlx_quantized(
    model_dir: str | os.PathLike,
    out_quantized: str | os.PathLike,
    out_dequantized: str | os.PathLike,
    *,
    group_size: int,
    bits: int,
    layer_bits: dict[str, int | str] | None = None,
    stack_experts: bool = False,
    hybrid_layout: str | None = None,
) -> tuple[Path, Path]:
    """Quantize the float32 checkpoint in `model_dir` with MLX's own quantizer (mx.quantize, affine)
    as mlx-lm's converter lays it out, and write the same weights dequantized (mx.dequantize) as a
    plain float32 checkpoint for transformers to run as the reference.

    Every 2-D `.weight` but the norms whose input dimension is a multiple of `group_size` is
    quantized (embedding and LM head included), as mlx-lm does. `layer_bits` maps a suffix of a
    layer path (e.g. "mlp.gate") to its own bit width, recorded as a per-layer entry of config.json's
    `quantization`, or to "mxfp4" (MLX's MXFP4 mode: groups of 32, 4 bits, uint8 scales, no
    biases; recorded with its mode). `stack_experts` writes MoE experts stacked as mlx-lm's `switch_mlp` tensors.
    gpt-oss's experts (transformers: `gate_up_proj` `[E, hidden, 2 * inter]`, gate and up columns
    interleaved, `down_proj` `[E, inter, hidden]`, x times them) are written as mlx-lm lays them
    out, stacked `experts.{gate,up,down}_proj.{weight,bias}` `[E, out, in]`, and quantized as such;
    the dequantized copy keeps transformers' layout.
    """
    import re

    import mlx.core as mx
    from safetensors.numpy import load_file, save_file

    src = Path(model_dir)
    outq, outd = Path(out_quantized), Path(out_dequantized)
    _copy_side_files(src, outq)
    _copy_side_files(src, outd)
    tensors = load_file(str(src / "model.safetensors"))
    fused = sorted(n[: -len(".gate_up_proj")] for n in tensors if n.endswith("mlp.experts.gate_up_proj"))
    for base in fused:
        gate_up, bias = tensors.pop(f"{base}.gate_up_proj"), tensors.pop(f"{base}.gate_up_proj_bias")
        for i, proj in enumerate(["gate_proj", "up_proj"]):
            tensors[f"{base}.{proj}.weight"] = np.ascontiguousarray(gate_up[:, :, i::2].transpose(0, 2, 1))
            tensors[f"{base}.{proj}.bias"] = np.ascontiguousarray(bias[:, i::2])
        tensors[f"{base}.down_proj.weight"] = np.ascontiguousarray(tensors.pop(f"{base}.down_proj").transpose(0, 2, 1))
        tensors[f"{base}.down_proj.bias"] = tensors.pop(f"{base}.down_proj_bias")
    layer_bits = layer_bits or {}
    quant: dict[str, np.ndarray] = {}
    deq: dict[str, np.ndarray] = {}
    qcfg: dict = {"group_size": group_size, "bits": bits}
    for name, w in sorted(tensors.items()):
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is None or w.ndim not in (2, 3) or "norm" in name or w.shape[-1] % group_size:
            quant[name] = deq[name] = w
            continue
        b = next((v for k, v in layer_bits.items() if prefix.endswith(k)), bits)
        if b == "mxfp4":
            qcfg[prefix] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            wq, scales = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")
            deq[name] = np.array(mx.dequantize(wq, scales, None, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
            quant[name], quant[f"{prefix}.scales"] = np.array(wq), np.array(scales)
            continue
        if b != bits:
            qcfg[prefix] = {"group_size": group_size, "bits": b}
        wq, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=b)
        deq[name] = np.array(mx.dequantize(wq, scales, biases, group_size=group_size, bits=b))
        quant[name] = np.array(wq)
        quant[f"{prefix}.scales"] = np.array(scales)
        quant[f"{prefix}.biases"] = np.array(biases)
    if stack_experts:
        pattern = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.(weight|scales|biases)$")
        groups: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
        for name in [n for n in quant if pattern.match(n)]:
            base, e, proj, kind = pattern.match(name).groups()
            groups.setdefault((base, proj, kind), {})[int(e)] = quant.pop(name)
        for (base, proj, kind), per in groups.items():
            quant[f"{base}.switch_mlp.{proj}.{kind}"] = np.stack([per[e] for e in sorted(per)])
    for base in fused:
        gate, up = deq.pop(f"{base}.gate_proj.weight"), deq.pop(f"{base}.up_proj.weight")
        gate_b, up_b = deq.pop(f"{base}.gate_proj.bias"), deq.pop(f"{base}.up_proj.bias")
        gate_up = np.empty((gate.shape[0], gate.shape[2], 2 * gate.shape[1]), dtype=gate.dtype)
        gate_up[:, :, 0::2], gate_up[:, :, 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
        bias = np.empty((gate_b.shape[0], 2 * gate_b.shape[1]), dtype=gate_b.dtype)
        bias[:, 0::2], bias[:, 1::2] = gate_b, up_b
        deq[f"{base}.gate_up_proj"], deq[f"{base}.gate_up_proj_bias"] = gate_up, bias
        deq[f"{base}.down_proj"] = np.ascontiguousarray(deq.pop(f"{base}.down_proj.weight").transpose(0, 2, 1))
        deq[f"{base}.down_proj_bias"] = deq.pop(f"{base}.down_proj.bias")
    if hybrid_layout is not None:
        quant, qcfg = _mlx_lm_hybrid(quant, qcfg, vl_wrapper=hybrid_layout == "vl")
    save_file(quant, str(outq / "model.safetensors"))
    save_file(deq, str(outd / "model.safetensors"))
    cfg = json.loads((outq / "config.json").read_text())
    # mlx-lm writes the same dict under both keys.
    cfg["quantization"] = qcfg
    cfg["quantization_config"] = qcfg
    (outq / "config.json").write_text(json.dumps(cfg, indent=2))
    return outq, outd


def write_openai_mxfp4(model_dir: str | os.PathLike, out: str | os.PathLike, out_reference: str | os.PathLike) -> tuple[Path, Path]:
    """The float32 gpt-oss checkpoint in `model_dir` with its experts in OpenAI's published MXFP4
    layout (`experts.gate_up_proj_blocks` `[E, 2 * inter, hidden / 32, 16]` uint8 and `_scales`,
    the same for `down_proj`; config.json `quantization_config.quant_method` "mxfp4", dtype
    bfloat16 as published), quantized with MLX's MXFP4 quantizer; and, as the reference, the same
    checkpoint with the experts dequantized by transformers' own MXFP4 conversion
    (`convert_moe_packed_tensors`), in transformers' float32 layout."""
    import mlx.core as mx
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src, outq, outr = Path(model_dir), Path(out), Path(out_reference)
    _copy_side_files(src, outq)
    _copy_side_files(src, outr)
    tensors = load_file(str(src / "model.safetensors"))
    quant, ref = {}, {}
    for name, w in tensors.items():
        if not (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
            quant[name] = ref[name] = w
            continue
        rows = mx.array(np.ascontiguousarray(w.transpose(0, 2, 1)))  # [E, out, in]
        wq, scales = mx.quantize(rows, group_size=32, bits=4, mode="mxfp4")
        e, out_rows, _ = rows.shape
        blocks = np.array(wq).view(np.uint8).reshape(e, out_rows, -1, 16)
        quant[f"{name}_blocks"], quant[f"{name}_scales"] = blocks, np.array(scales)
        ref[name] = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(np.array(scales)), dtype=torch.float32).numpy()
    save_file(quant, str(outq / "model.safetensors"))
    save_file(ref, str(outr / "model.safetensors"))
    cfg = json.loads((outq / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    cfg["dtype"] = "bfloat16"
    (outq / "config.json").write_text(json.dumps(cfg, indent=2))
    return outq, outr
