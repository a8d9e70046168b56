"""Evaluating formats on a model: per-layer weight error and, with text, perplexity."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bofrs._allocate import Allocation, allocate
from bofrs._linearity import _quantized_error, build_menu, dequantized, linear_layers, perplexity


@contextmanager
def fake_quantized(model: nn.Module, choice: str | Mapping[str, str]) -> Iterator[nn.Module]:
    """Within the block, ``model``'s Linear layers hold their weights quantized and decoded
    again (fake quantization): every layer but ``lm_head`` in one format spec (as
    :func:`bofrs.layer_errors`), or each named layer of a ``{layer: spec}`` mapping (an
    allocation). The original weights come back exactly on exit, also on error."""
    if isinstance(choice, str):
        layers = linear_layers(model)
        plan = {name: choice for name in layers}
    else:
        layers = linear_layers(model, ())
        unknown = [n for n in choice if n not in layers]
        if unknown:
            raise ValueError(f"choice: no Linear layer named {unknown[0]!r}")
        plan = dict(choice)
    with torch.no_grad():
        decoded = {name: dequantized(layers[name].weight, spec) for name, spec in plan.items()}
    with _swapped(layers, decoded):
        yield model


@contextmanager
def _swapped(layers: Mapping[str, nn.Linear], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The named layers hold ``weights`` within the block, their own weights again after."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, weight in weights.items():
                saved[name] = layers[name].weight.detach().clone()
                layers[name].weight.copy_(weight)
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)


def calibrate_errors(
    model: nn.Module,
    tokens: torch.Tensor,
    alphas: Mapping[str, float],
    errors: Mapping[str, Mapping[str, tuple[float, float]]],
    *,
    metric: str = "cross_entropy",
    batch_size: int = 1,
) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, float]]:
    """Per-format corrections of the linearity theorem, measured on calibration ``tokens``.

    The theorem treats a format's error as noise of the same relative size; block-wise formats
    keep each block's largest weight exact and hurt less than that noise. For each format of
    ``errors`` (from :func:`bofrs.layer_errors`) the model is quantized uniformly, its loss
    increase measured (``metric`` as in :func:`bofrs.estimate_sensitivity`, in the unit of
    ``alphas``) and divided by the prediction ``sum_l alpha_l t_l^2``: that factor ``c_f``
    multiplies the format's ``t^2`` in the returned errors (formats predicted to change the
    loss by under 1e-4 keep ``c_f = 1``). Returns ``(scaled errors, {format: c_f})``, ready for
    :func:`allocate_model`."""
    from bofrs._linearity import METRICS, _metric

    if metric not in METRICS or metric == "perplexity":
        raise ValueError(f"metric must be 'cross_entropy' or 'kl', got {metric!r}")
    names = list(errors)
    missing = [n for n in names if n not in alphas]
    if missing:
        raise ValueError(f"alphas: no value for layer {missing[0]!r}")
    formats = list(errors[names[0]]) if names else []
    measure = _metric(model, metric, tokens, 0, 0, 0, batch_size)
    base = measure() if metric != "kl" else 0.0
    factors = {}
    for spec in formats:
        predicted = sum(max(0.0, float(alphas[n])) * errors[n][spec][1] for n in names)
        if predicted < 1e-4:
            factors[spec] = 1.0
            continue
        with fake_quantized(model, {n: spec for n in names}):
            factors[spec] = max(0.0, measure() - base) / predicted
    scaled = {
        n: {spec: (errors[n][spec][0], errors[n][spec][1] * factors[spec]) for spec in formats}
        for n in names
    }
    return scaled, factors


def allocate_model(
    model: nn.Module,
    alphas: Mapping[str, float],
    errors: Mapping[str, Mapping[str, tuple[float, float]]],
    budget_bits: float,
    *,
    formats: Sequence[str] | None = None,
    resolution: float = 1e-4,
) -> tuple[dict[str, str], Allocation]:
    """A format per layer of ``model`` within ``budget_bits`` average bits: the exact knapsack
    (:func:`bofrs.allocate`) over ``errors`` (from :func:`bofrs.layer_errors`, restricted to
    ``formats`` when given) weighted by ``alphas`` (from :func:`bofrs.estimate_sensitivity`;
    negative ones, noise that happened to help, count as 0). Returns ``{layer: spec}``, ready
    for :func:`fake_quantized`, and the :class:`bofrs.Allocation`. ``resolution`` (average
    bits) is finer than :func:`bofrs.allocate`'s default: each layer's cost is rounded up to it,
    and at 1e-3 a model of 200 small layers loses up to 0.2 bits of its budget to rounding."""
    names = list(errors)
    missing = [n for n in names if n not in alphas]
    if missing:
        raise ValueError(f"alphas: no value for layer {missing[0]!r}")
    layers = linear_layers(model, ())
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"errors: no Linear layer named {unknown[0]!r}")
    specs = list(formats) if formats is not None else list(errors[names[0]]) if names else []
    order, menu = build_menu({n: {s: errors[n][s] for s in specs} for n in names})
    sizes = [layers[n].weight.numel() for n in order]
    plan = allocate(
        [max(0.0, float(alphas[n])) for n in order], sizes, menu, budget_bits, resolution=resolution
    )
    return dict(zip(order, plan.choices)), plan


def evaluate_formats(
    model: nn.Module,
    formats: Sequence[str | tuple[str, Mapping[str, str]]],
    tokens: torch.Tensor | None = None,
    *,
    skip: Sequence[str] = ("lm_head",),
    progress: bool = True,
) -> dict[str, Any]:
    """For each format (specs as :func:`bofrs.layer_errors`, or ``(name, {layer: spec})`` for
    a per-layer allocation): the average bits per weight, the relative squared error of every
    Linear layer and their size-weighted mean, and with ``tokens`` ((batch, seq) ids) the
    perplexity of the model with every layer quantized (weights decoded in place, restored
    afterwards) next to the unquantized baseline."""
    layers = linear_layers(model, skip)
    if not layers:
        raise ValueError("model has no Linear layer to quantize")
    sizes = {n: layer.weight.numel() for n, layer in layers.items()}
    total = sum(sizes.values())
    result: dict[str, Any] = {"layers": {n: {"numel": s} for n, s in sizes.items()}, "formats": {}}
    if tokens is not None:
        result["baseline_perplexity"] = perplexity(model, tokens)
    for entry_spec in _progress(list(formats), progress):
        start = time.perf_counter()
        if isinstance(entry_spec, str):
            label, plan = entry_spec, {n: entry_spec for n in layers}
        else:
            label, plan = entry_spec[0], dict(entry_spec[1])
            if set(plan) != set(layers):
                raise ValueError(f"formats: allocation {label!r} must name every evaluated layer")
        bits, t2, decoded = {}, {}, {}
        for name, layer in layers.items():
            bits[name], t2[name], back = _quantized_error(layer.weight, plan[name])
            if tokens is not None:
                decoded[name] = back.to(dtype=layer.weight.dtype, device=layer.weight.device)
        entry: dict[str, Any] = {
            "bits_per_weight": sum(bits[n] * sizes[n] for n in layers) / total,
            "mean_t2": sum(t2[n] * sizes[n] for n in layers) / total,
            "per_layer_t2": t2,
        }
        if not isinstance(entry_spec, str):
            entry["choices"] = plan
        if tokens is not None:
            with _swapped(layers, decoded):
                entry["perplexity"] = perplexity(model, tokens)
            del decoded
        entry["seconds"] = time.perf_counter() - start
        result["formats"][label] = entry
    return result


def _progress(items: list[Any], enabled: bool) -> Any:
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
