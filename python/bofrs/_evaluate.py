"""Evaluating formats on a model: per-layer weight error and, with text, perplexity."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._linearity import _format_error, dequantized, linear_layers, perplexity


def _fake_quantized(model: nn.Module, spec: str, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    saved = {}
    with torch.no_grad():
        for name, layer in layers.items():
            saved[name] = layer.weight.detach().clone()
            layer.weight.copy_(dequantized(layer.weight, spec))
    return saved


def _restore(layers: dict[str, nn.Linear], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in saved.items():
            layers[name].weight.copy_(weight)


def evaluate_formats(
    model: nn.Module,
    formats: Sequence[str],
    tokens: torch.Tensor | None = None,
    *,
    skip: Sequence[str] = ("lm_head",),
    progress: bool = True,
) -> dict[str, Any]:
    """For each format (specs as :func:`bofrs.layer_errors`): the average bits per weight, the
    relative squared error of every Linear layer and their size-weighted mean, and with
    ``tokens`` ((batch, seq) ids) the perplexity of the model with every layer quantized
    (weights decoded in place, restored afterwards) next to the unquantized baseline."""
    layers = linear_layers(model, skip)
    if not layers:
        raise ValueError("model has no Linear layer to quantize")
    sizes = {n: layer.weight.numel() for n, layer in layers.items()}
    total = sum(sizes.values())
    result: dict[str, Any] = {"layers": {n: {"numel": s} for n, s in sizes.items()}, "formats": {}}
    if tokens is not None:
        result["baseline_perplexity"] = perplexity(model, tokens)
    for spec in _progress(list(formats), progress):
        start = time.perf_counter()
        errors = {n: _format_error(layer.weight, spec) for n, layer in layers.items()}
        entry: dict[str, Any] = {
            "bits_per_weight": sum(errors[n][0] * sizes[n] for n in layers) / total,
            "mean_t2": sum(errors[n][1] * sizes[n] for n in layers) / total,
            "per_layer_t2": {n: errors[n][1] for n in layers},
        }
        if tokens is not None:
            saved = _fake_quantized(model, spec, layers)
            try:
                entry["perplexity"] = perplexity(model, tokens)
            finally:
                _restore(layers, saved)
        entry["seconds"] = time.perf_counter() - start
        result["formats"][spec] = entry
    return result


def _progress(items: list[str], enabled: bool) -> Any:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, desc="bofrs: evaluating", unit="format")


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of an :func:`evaluate_formats` result."""
    base = result.get("baseline_perplexity")
    head = "| format | bits/weight | mean t^2 |" + (" perplexity | increase |" if base else "")
    rule = "|---|---|---|" + ("---|---|" if base else "")
    lines = [head, rule]
    if base:
        lines.append(f"| unquantized | 16 or 32 | 0 | {base:.3f} | 0 |")
    for spec, entry in result["formats"].items():
        row = f"| {spec} | {entry['bits_per_weight']:.4f} | {entry['mean_t2']:.5f} |"
        if base:
            ppl = entry["perplexity"]
            row += f" {ppl:.3f} | {ppl - base:+.3f} |"
        lines.append(row)
    return "\n".join(lines)
