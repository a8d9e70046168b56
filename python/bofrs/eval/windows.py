"""Token windows for scoring: non-overlapping, each opened by BOS when the model expects one.

Gemma-3 (``add_bos_token`` in its GGUF) is far off without BOS at the start of its input: on
Pride and Prejudice its perplexity is about 150 on windows cut out of the middle of the text
and about 35 when each window starts with BOS. llama.cpp's ``llama-perplexity`` puts BOS at
the start of every window for such models; so do we.
"""

from __future__ import annotations

from typing import Any

import torch


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id if ``tokenizer`` puts BOS in front of a text (the model was trained with
    it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", return_tensors="pt").input_ids[0]
    return int(bos) if ids.numel() and int(ids[0]) == int(bos) else None


def token_windows(
    ids: torch.Tensor, length: int, *, bos: int | None = None, max_windows: int | None = None
) -> torch.Tensor:
    """``ids`` (1-D token ids of a text) cut into (count, length) windows, as many as fit (at
    most ``max_windows``). With ``bos``, a leading BOS in ``ids`` is dropped and each window
    is BOS followed by the next ``length - 1`` tokens of text, so every text token is scored
    exactly once; without, windows are consecutive ``length`` tokens (the first token of each
    is context only)."""
    if ids.dim() != 1:
        raise ValueError("ids must be 1-D token ids")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        ids = ids[1:]
    step = length - 1 if bos is not None else length
    count = ids.numel() // step
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"corpus: {ids.numel()} tokens, fewer than one window of {length}")
    text = ids[: count * step].reshape(count, step).long()
    if bos is None:
        return text
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), text], dim=1)


def tokenize_windows(
    tokenizer: Any, text: str, length: int, *, max_windows: int | None = None, skip_tokens: int = 0
) -> torch.Tensor:
    """``text`` tokenized and cut by :func:`token_windows` (BOS as the tokenizer says),
    after ``skip_tokens`` tokens of text."""
    if tokenizer is None:
        raise ValueError("corpus: the model has no tokenizer to read text with")
    bos = bos_token(tokenizer)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        ids = ids[1:]
    return token_windows(ids[skip_tokens:], length, bos=bos, max_windows=max_windows)
