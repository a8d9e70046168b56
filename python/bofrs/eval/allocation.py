"""Mixed formats from the linearity theorem: per-format calibration and the knapsack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bofrs.eval.knapsack import Allocation, allocate
from bofrs.eval.linearity import build_menu, linear_layers
from bofrs.eval.fake import fake_quantized


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
    from bofrs.eval.linearity import METRICS, _metric

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


