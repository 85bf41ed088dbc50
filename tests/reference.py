"""Reference helpers for the correctness tests.

Everything in here is independent of the Rust engine: it builds tiny random checkpoints with
transformers, runs transformers as the oracle, and compares results. The engine under test is only
ever fed the files these helpers write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Tolerances (documented once, used everywhere)
# --------------------------------------------------------------------------------------------------

#: Relative error bound for float32 logits: rel_err(a, b) = max|a - b| / max|b| over a logits row.
LOGITS_REL_TOL = 1e-4
#: A greedy token may differ from transformers' only at a near-tie: top-1 minus top-2 logit below this.
NEAR_TIE_GAP = 1e-3

#: Special tokens of the tiny tokenizer (ids fixed so that configs can refer to them).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
NUM_BYTES = 256

# --------------------------------------------------------------------------------------------------
# Tiny random Llama checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    """Shape and options of a tiny random Llama checkpoint."""

    seed: int = 0
    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 20000.0
    #: None, or a transformers rope dict without rope_theta, e.g. {"rope_type": "linear", "factor": 4.0}
    rope_scaling: dict | None = None
    #: "hf5": config.json exactly as transformers 5 save_pretrained writes it (`rope_parameters`);
    #: "legacy": rewritten to the pre-5 layout (`rope_theta` + `rope_scaling`) that most published
    #: Llama checkpoints still carry.
    config_format: str = "hf5"
    #: save_pretrained max_shard_size (e.g. "100KB") to get a sharded checkpoint with an index.
    max_shard_size: str | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    #: std of the random weights; larger than Llama's 0.02 so that attention is sharp and
    #: position/rope mistakes show up in the logits.
    init_std: float = 0.08
    architecture: str = "LlamaForCausalLM"
    #: More config.json fields of the family (passed to its transformers config class).
    extra_config: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.extra_config.get("head_dim", self.hidden_size // self.num_heads)

    def kv_bytes_per_block(self, block_size: int, dtype_bytes: int = 4) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes * block_size


# Llama 3 rope scaling. head_dim 16 and theta 20000 give wavelengths 6.3 .. ~36000 positions;
# with original_max_position_embeddings=64, low_freq_factor=1, high_freq_factor=4 the
# wavelengths < 16 are kept, those > 64 are divided by factor 8, and the ones in between are
# smoothed: all three regimes of the llama3 formula are exercised at every position > 0.
_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

#: The linear-attention dimensions of the tiny hybrid (Qwen3-Next / Qwen3.5) checkpoints.
_HYBRID = {
    "head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}

#: Named variants used across the test-suite.
TINY_VARIANTS: dict[str, TinySpec] = {
    # GQA (4 query heads over 2 KV heads), untied lm_head.
    "gqa_untied": TinySpec(seed=1),
    # Tied embeddings (no lm_head.weight in the checkpoint).
    "tied": TinySpec(seed=2, tie_word_embeddings=True),
    # Plain multi-head attention.
    "mha": TinySpec(seed=3, num_kv_heads=4, num_layers=2),
    "llama3": TinySpec(seed=4, rope_scaling=_LLAMA3_SCALING),
    "llama3_legacy": TinySpec(seed=4, rope_scaling=_LLAMA3_SCALING, config_format="legacy"),
    "linear": TinySpec(seed=5, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "linear_legacy": TinySpec(
        seed=5, rope_scaling={"rope_type": "linear", "factor": 4.0}, config_format="legacy"
    ),
    # Sharded safetensors with model.safetensors.index.json.
    "sharded": TinySpec(seed=6, max_shard_size="100KB"),
    # YaRN with transformers' defaults (beta_fast 32, beta_slow 1, truncated ramp bounds, attention
    # factor 0.1 ln(factor) + 1); max_position_embeddings / original = factor, as YaRN expects.
    "yarn": TinySpec(
        seed=7,
        max_position_embeddings=512,
        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    ),
}


#: One tiny checkpoint per model family, each exercising what sets the family apart. Windows are
#: shorter than the test prompts; head_dim differs from hidden/heads where the family allows it.
_WINDOW = 24
FAMILY_VARIANTS: dict[str, TinySpec] = {
    # q/k/v biases.
    "qwen2": TinySpec(seed=11, architecture="Qwen2ForCausalLM"),
    # per-head q_norm / k_norm, head_dim 24 (hidden 64 / 4 heads would be 16).
    "qwen3": TinySpec(seed=12, architecture="Qwen3ForCausalLM", extra_config={"head_dim": 24}),
    # sliding window on every layer.
    "mistral": TinySpec(seed=13, architecture="MistralForCausalLM", extra_config={"sliding_window": _WINDOW}),
    # soft-capped attention scores and logits (caps small enough to bite), sandwich norms,
    # (1 + w) gains, query_pre_attn_scalar != head_dim, local/global/local layers.
    "gemma2": TinySpec(
        seed=14,
        architecture="Gemma2ForCausalLM",
        tie_word_embeddings=True,
        extra_config={
            "query_pre_attn_scalar": 24,
            "sliding_window": _WINDOW,
            "attn_logit_softcapping": 1.5,
            "final_logit_softcapping": 3.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "hidden_activation": "gelu_pytorch_tanh",
        },
    ),
    # per-head (1 + w) q/k norms, local layers with their own rope base, linear scaling on the
    # global layer.
    "gemma3": TinySpec(
        seed=15,
        architecture="Gemma3ForCausalLM",
        tie_word_embeddings=True,
        extra_config={
            "query_pre_attn_scalar": 24,
            "sliding_window": _WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
            "hidden_activation": "gelu_pytorch_tanh",
        },
    ),
    # fused qkv / gate_up projections, longrope with original context 64 (the 100-token prompt
    # runs on the long factors, shorter ones on the short factors).
    "phi3": TinySpec(
        seed=16,
        architecture="Phi3ForCausalLM",
        max_position_embeddings=256,
        extra_config={
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + 0.9 * i for i in range(8)],
                "original_max_position_embeddings": 64,
            },
        },
    ),
    # 4 experts, 2 active, renormalised.
    "mixtral": TinySpec(
        seed=17,
        architecture="MixtralForCausalLM",
        extra_config={"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # 8 experts, 3 active, renormalised; layer 1 is dense (mlp_only_layers).
    "qwen3_moe": TinySpec(
        seed=18,
        architecture="Qwen3MoeForCausalLM",
        extra_config={
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    # 8 experts in 4 groups of 2, the best 2 groups kept, 3 experts active, chosen with a routing
    # bias and weighed by sigmoid score (renormalised, scaled 2.5), a shared expert; layer 0 dense;
    # RoPE on half of each head (head_dim 24: 12 rotated); q/k norms; q/k/v biases (none on o).
    "glm4_moe": TinySpec(
        seed=20,
        architecture="Glm4MoeForCausalLM",
        extra_config={
            "head_dim": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "first_k_dense_replace": 1,
            "use_qk_norm": True,
            "attention_bias": True,
            "partial_rotary_factor": 0.5,
        },
    ),
    # layer 1 of 3 without positional encoding (NoPE: every 2nd layer), tied embeddings.
    "smollm3": TinySpec(
        seed=19,
        architecture="SmolLM3ForCausalLM",
        tie_word_embeddings=True,
        extra_config={"no_rope_layer_interval": 2},
    ),
    # attention sinks (large enough to bite), sliding / full / sliding layers with a window shorter
    # than the prompts, YaRN (original context 64, factor 8, untruncated ramp), 4 experts with
    # biases, 2 active (softmax over the router's top-2 logits), a SwiGLU limit small enough to clamp.
    "gpt_oss": TinySpec(
        seed=22,
        architecture="GptOssForCausalLM",
        max_position_embeddings=512,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        },
        extra_config={
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": _WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "swiglu_limit": 0.5,
        },
    ),
    # Hybrid: Gated DeltaNet layers 0, 1, 3 and gated full attention at layer 2 (RoPE on a quarter
    # of each head), 2 key heads read by 4 value heads; 8 experts, 3 active, with a gated shared
    # expert; layer 1 dense.
    "qwen3_next": TinySpec(seed=23, architecture="Qwen3NextForCausalLM", num_layers=4, extra_config=_HYBRID | {
        "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        "num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "norm_topk_prob": True, "mlp_only_layers": [1],
    }),
    # Qwen3.5 dense: the same stack with the DeltaNet projections apart, full attention last.
    "qwen3_5": TinySpec(seed=24, architecture="Qwen3_5ForCausalLM", num_layers=4, extra_config=_HYBRID | {
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    }),
    "qwen3_5_moe": TinySpec(seed=25, architecture="Qwen3_5MoeForCausalLM", num_layers=3, extra_config=_HYBRID | {
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    }),
    # Gemma 4: local / global layers of different shapes (global: head_dim 32, two KV heads, V = K:
    # rows twice the local ones', so vLLM gives the local layers' groups twice larger blocks;
    # proportional RoPE turning 4 of 16 frequencies), the last two layers reading the K/V of
    # layers 2 and 1 (with twice wider MLPs), per-layer inputs, experts beside every MLP, learned
    # layer scalars, soft-capped logits.
    "gemma4": TinySpec(
        seed=23,
        architecture="Gemma4ForCausalLM",
        num_layers=5,
        tie_word_embeddings=True,
        extra_config={
            "global_head_dim": 32,
            "num_global_key_value_heads": 2,
            "attention_k_eq_v": True,
            "sliding_window": _WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
            },
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": 320,
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
            "final_logit_softcapping": 3.0,
            "hidden_activation": "gelu_pytorch_tanh",
        },
    ),
}
TINY_VARIANTS.update(FAMILY_VARIANTS)
# Phi-3 with partial rotary embeddings (Phi-4-mini's layout): longrope on 12 of 16 features per head.
TINY_VARIANTS["phi3_partial"] = TinySpec(
    seed=21,
    architecture="Phi3ForCausalLM",
    max_position_embeddings=256,
    extra_config={
        "original_max_position_embeddings": 64,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [1.0 + 0.9 * i for i in range(6)],
            "original_max_position_embeddings": 64,
        },
    },
)


def chat_template() -> str:
    return (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer without merges: one token per byte, plus specials and fillers.

    Ids: 0 <pad>, 1 <s>, 2 </s>, 3..258 the 256 bytes, 259..vocab_size-1 <extra_i> fillers, so the
    tokenizer covers exactly the model's vocabulary (every id a random model samples decodes).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < NUM_SPECIAL + NUM_BYTES:
        raise ValueError(f"vocab_size {vocab_size} < {NUM_SPECIAL + NUM_BYTES}")
    specials = ["<pad>", "<s>", "</s>"]
    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    extras = [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    for e in extras:
        vocab[e] = len(vocab)
    assert len(vocab) == vocab_size

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials + extras])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=chat_template(),
        model_max_length=4096,
    )
    return fast


#: transformers model_type of each architecture the tiny checkpoints come in.
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "SmolLM3ForCausalLM": "smollm3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
    "Gemma4ForCausalLM": "gemma4_text",
}


def _hf_config(spec: TinySpec):
    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope = dict(spec.rope_scaling, rope_theta=spec.rope_theta)
    kwargs = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters=rope,
        initializer_range=spec.init_std,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        head_dim=spec.head_dim,
    )
    kwargs.update(spec.extra_config)
    return AutoConfig.for_model(MODEL_TYPES[spec.architecture], **kwargs)


def randomize_(model, spec: TinySpec) -> None:
    """Deterministic random weights, including non-trivial RMSNorm gains, routing biases and
    attention sinks."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("linear_attn.A_log"):
                # Slow decays (A ~ 0.05), so the state carries far back along the prompt.
                p.copy_(-3.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("linear_attn.conv1d.weight"):
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))
            elif name.endswith("self_attn.sinks"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen))
            elif name.endswith(("router.scale", "router.per_expert_scale")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("router.proj.weight"):
                # Router logits of order one: no near-ties between the experts' scores.
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(spec.init_std * torch.randn(p.shape, generator=gen))
        # Saved buffers that steer the model (GLM-4.5's routing bias, zero at init).
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.2 * torch.randn(b.shape, generator=gen))


def make_tiny_model(out_dir: str | os.PathLike, spec: TinySpec) -> Path:
    """Write a tiny random checkpoint of spec.architecture (float32 safetensors, tokenizer,
    generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    config = _hf_config(spec)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    assert type(model).__name__ == spec.architecture, type(model).__name__
    randomize_(model, spec)
    if spec.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    kwargs = {}
    if spec.max_shard_size:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(out, **kwargs)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    ).save_pretrained(out)
    build_tokenizer(spec.vocab_size).save_pretrained(out)

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["architectures"] == [spec.architecture], cfg["architectures"]
    if spec.config_format == "legacy":
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rope
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    elif spec.config_format != "hf5":
        raise ValueError(spec.config_format)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def load_hf(model_dir: str | os.PathLike, **overrides):
    """transformers' own model from the files on disk (float32, eval); `overrides` change config
    fields."""
    import torch
    from transformers import AutoModelForCausalLM

    # Eager attention: transformers' SDPA path skips Gemma 2's attention soft-capping.
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", **overrides
    )
    return model.eval()


def hf_logits(model, token_ids: Sequence[int]) -> np.ndarray:
    """transformers' logits for every position of one full sequence: float32 [T, vocab]."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs reference {b.shape}"
    denom = float(np.max(np.abs(b)))
    assert denom > 0, "reference logits are all zero"
    return float(np.max(np.abs(a - b))) / denom


def rowwise_rel_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """rel_err per row (per token): max_v|a - b| / max_v|b|."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs reference {b.shape}"
    return np.max(np.abs(a - b), axis=-1) / np.max(np.abs(b), axis=-1)


def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int):
    """transformers' greedy continuation (model.generate, do_sample=False, EOS disabled).

    Returns (new_token_ids, per-step logits [max_new_tokens, vocab]).
    """
    import torch
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        num_beams=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    # generate() fills unset options from the model's own generation config (which names an EOS):
    # take that away for the call.
    saved = model.generation_config
    model.generation_config = GenerationConfig(pad_token_id=gc.pad_token_id)
    try:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([list(prompt)], dtype=torch.long),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                generation_config=gc,
            )
    finally:
        model.generation_config = saved
    new = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack([step[0] for step in out.logits]).float().numpy()
    assert len(new) == max_new_tokens, (
        f"transformers stopped after {len(new)} of {max_new_tokens} tokens (EOS not disabled?)"
    )
    return new, logits


def top2_gap(row: np.ndarray) -> float:
    top = np.sort(np.asarray(row, dtype=np.float64))[-2:]
    return float(top[1] - top[0])


def check_greedy_match(
    ours: Sequence[int],
    ref: Sequence[int],
    ref_logits: np.ndarray,
    *,
    what: str,
    gap: float = NEAR_TIE_GAP,
) -> str | None:
    """Compare a greedy continuation with transformers' token by token.

    Identical -> None. At the first differing step the reference's top-1/top-2 logit gap must be
    below `gap` and our token must be one of the reference's two best (a near-tie that float
    rounding may break either way); then a short note is returned (the sequences legitimately
    diverge after that step). Anything else raises AssertionError with the details.
    """
    ours = list(ours)
    ref = list(ref)
    assert len(ours) == len(ref), f"{what}: got {len(ours)} tokens, transformers {len(ref)}: {ours} vs {ref}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        row = ref_logits[i]
        g = top2_gap(row)
        best2 = set(np.argsort(row)[-2:].tolist())
        assert g < gap and a in best2, (
            f"{what}: token {i} differs: ours {a} vs transformers {b} "
            f"(transformers logits: ours' {row[a]:.6f}, its own {row[b]:.6f}, top-2 gap {g:.3g} "
            f">= {gap} or ours not in top-2)\n ours: {ours}\n  ref: {ref}"
        )
        return f"{what}: near-tie at step {i} (gap {g:.2e}), compared up to there"
    return None


# --------------------------------------------------------------------------------------------------
# Paged-attention schedule helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class PagedRequest:
    """A request fed to ModelRunner.step_logits chunk by chunk (teacher-forced tokens)."""

    req_id: str
    tokens: list[int]
    blocks: list[int]
    block_size: int
    pos: int = 0
    #: pass the whole allocation every step (True) or only the blocks covering positions so far.
    full_table: bool = False
    logits: dict[int, np.ndarray] = field(default_factory=dict)

    def chunk(self, n: int):
        assert self.pos + n <= len(self.tokens), f"{self.req_id}: schedule runs past the sequence"
        start = self.pos
        ids = self.tokens[start : start + n]
        needed = -(-(start + n) // self.block_size)
        assert needed <= len(self.blocks), f"{self.req_id}: needs {needed} blocks, has {len(self.blocks)}"
        table = list(self.blocks) if self.full_table else list(self.blocks[:needed])
        return (self.req_id, ids, start, table)

    def advance(self, n: int, rows: np.ndarray) -> None:
        for i in range(n):
            self.logits[self.pos + i] = rows[i]
        self.pos += n
