"""Encoder (embedding / cross-encoder) helpers: sentences of mixed length, tiny random BERT-family
checkpoints written with transformers, and transformers' forward as their oracle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Encoders (embeddings)
# --------------------------------------------------------------------------------------------------

#: Smallest cosine accepted between our embedding and sentence-transformers' of the same input.
COSINE_MIN = 0.9999


def cosine(a, b) -> np.ndarray:
    """Row-wise cosine similarity, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


#: Sentences of mixed length (1 to ~60 tokens) for embedding tests.
SENTENCES = [
    "Hello world",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn text into vectors that can be compared by cosine similarity.",
    "MLX runs on Apple silicon, on CUDA GPUs and on the CPU.",
    "Is it raining?",
    "Paged attention keeps the key and value cache in fixed-size blocks, so that requests of very "
    "different lengths share one pool of memory without fragmentation or copies.",
    "42",
    "Sentence embeddings are the mean of the token vectors, normalised to unit length.",
    "The cat sat on the mat.",
    "A man is playing a guitar on the street while people walk by.",
    "Where is the nearest train station?",
    "Large language models are served in batches to use the hardware well.",
    "¿Dónde está la biblioteca?",
    "Rust gives memory safety without a garbage collector.",
    "I like green tea.",
    "Quantum computers use qubits, which can be in superpositions of states, to solve some problems "
    "much faster than classical computers can, though building them at scale remains hard.",
    "Tokyo is the capital of Japan.",
    "The weather today is sunny with a light breeze from the west.",
    "How do I reset my password?",
    "The stock market fell sharply after the announcement.",
    "Please close the door.",
    "She wrote a long letter to her grandmother describing the trip.",
    "Vectors",
    "Retrieval augmented generation looks up relevant passages before answering.",
    "Two plus two is four.",
    "The museum opens at nine in the morning and closes at five in the evening on weekdays.",
    "Dogs are loyal animals.",
    "An apple a day keeps the doctor away.",
    "What time is it?",
    "The river flows through the valley to the sea.",
    "Good night!",
]


def write_tiny_bert(
    out_dir: str | os.PathLike, *, seed: int = 0, architecture: str = "BertModel", tokenizer_from=None, **config
) -> Path:
    """A tiny random encoder (float32 safetensors + config.json) with non-trivial LayerNorm gains
    and biases: `architecture` BertModel, BertForSequenceClassification, XLMRobertaModel or
    XLMRobertaForSequenceClassification; `config` overrides its config fields;
    `tokenizer_from`: a directory whose tokenizer files are copied beside it."""
    import shutil

    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = dict(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        type_vocab_size=2,
        hidden_act="gelu",
    )
    fields.update(config)
    torch.manual_seed(seed)
    family = "XLMRoberta" if architecture.startswith("XLMRoberta") else "Bert"
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, architecture)
    kwargs = {"add_pooling_layer": False} if architecture.endswith("Model") else {}
    model = model_cls(config_cls(**fields), **kwargs).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
                shutil.copy(f, out / f.name)
    return out


def hf_encoder_hidden(model_dir: str | os.PathLike, token_ids: Sequence[int], token_type_ids=None) -> np.ndarray:
    """transformers' last hidden state [T, hidden] of one unpadded sequence (float32, eager)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    kwargs = {}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([list(token_type_ids)])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(token_ids)]), **kwargs)
    return out.last_hidden_state[0].float().numpy()


def hf_classifier_logits(model_dir: str | os.PathLike, token_ids: Sequence[int], token_type_ids=None) -> np.ndarray:
    """transformers' sequence-classification logits [num_labels] of one sequence (float32)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    kwargs = {}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([list(token_type_ids)])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(token_ids)]), **kwargs)
    return out.logits[0].float().numpy()
