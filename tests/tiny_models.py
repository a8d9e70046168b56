"""Tiny random transformers models for the tests that need a whole model (shared by several
test modules; a test that builds one is skipped where transformers does not import)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

#: A 2-layer Llama with grouped-query attention, small enough to build in milliseconds.
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of :data:`TINY_LLAMA` with ``overrides`` (any ``LlamaConfig``
    field), its weights drawn after ``torch.manual_seed(seed)``; in training mode, as built."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model: torch.nn.Module = transformers.LlamaForCausalLM(config)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids``, without autograd."""
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out
