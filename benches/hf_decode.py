"""Greedy decoding of a transformers causal LM with its KV cache, for the benches that time it
(across the transformers versions that name the cache ``cache`` or ``past_key_values``)."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any


def cache_argument(model: Any) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` (transformers >= 5.2x), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def kv_cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` or, in older transformers, ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def greedy_decode_seconds(
    model: Any, prompt_ids: Any, new_tokens: int, around: Callable[[], Any] = contextlib.nullcontext
) -> float:
    """Seconds taken by ``new_tokens`` greedy single-token steps with the KV cache after the
    (untimed) prompt; the steps, not the prompt, run inside the context manager ``around()``.
    Only the last token's logits are computed (``logits_to_keep=1``)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
        cache, token = kv_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        key = cache_argument(model)
        with around():
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, **{key: cache}, use_cache=True, logits_to_keep=1)
                cache, token = kv_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - start
