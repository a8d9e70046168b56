"""One forward pass: the next-token logits of a causal language model on one window."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def next_token_logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """The (length - 1, vocab) logits predicting tokens 1..length-1 of ``window`` (1-D ids).
    ``model(ids)`` may return a tensor, a tuple starting with one, or an object with
    ``.logits`` (transformers; its key-value cache is not built)."""
    if window.dim() != 1 or window.shape[0] < 2:
        raise ValueError("a window must be 1-D with at least 2 tokens")
    ids = window[None].to(model_device(model))
    config = getattr(model, "config", None)
    out = model(ids, use_cache=False) if getattr(config, "use_cache", None) is not None else model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        raise TypeError("model(input_ids) must return logits of shape (batch, seq, vocab)")
    return out[0, :-1]
