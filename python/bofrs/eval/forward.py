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
def next_token_logits(
    model: nn.Module, window: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The (length - 1, vocab) logits predicting tokens 1..length-1 of ``window`` (1-D ids),
    or only those at ``positions`` (indices into 0..length-2; a transformers model then
    projects only those hidden states onto the vocabulary, ``logits_to_keep``). ``model(ids)``
    may return a tensor, a tuple starting with one, or an object with ``.logits``
    (transformers; its key-value cache is not built)."""
    if window.dim() != 1 or window.shape[0] < 2:
        raise ValueError("a window must be 1-D with at least 2 tokens")
    ids = window[None].to(model_device(model))
    config = getattr(model, "config", None)
    transformers_like = getattr(config, "use_cache", None) is not None
    kwargs: dict[str, object] = {"use_cache": False} if transformers_like else {}
    if positions is not None and transformers_like:
        kwargs["logits_to_keep"] = positions.to(ids.device)
    out = model(ids, **kwargs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    kept = positions is not None and transformers_like
    length = int(positions.numel()) if kept and positions is not None else ids.shape[1]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != (1, length):
        raise TypeError("model(input_ids) must return logits of shape (batch, seq, vocab)")
    if kept:
        return out[0]
    logits = out[0, :-1]
    return logits if positions is None else logits[positions.to(logits.device)]
