"""Per-layer format allocation under a bit budget (the linearity theorem's knapsack)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bofrs import _native


@dataclass(frozen=True)
class Allocation:
    """One format per layer, the loss increase it predicts, and its average bits per weight."""

    choices: tuple[str, ...]
    predicted_increase: float
    average_bits: float


def _floats(values: object, name: str, length: int | None = None) -> list[float]:
    try:
        out = [float(v) for v in values]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} values (one per layer), got {len(out)}")
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ValueError(f"{name} must hold finite, non-negative values")
    return out


def allocate(
    alphas: Sequence[float],
    layer_sizes: Sequence[int],
    menu: Mapping[str, tuple[float | Sequence[float], Sequence[float]]],
    budget_bits: float,
    *,
    resolution: float = 1e-3,
) -> Allocation:
    """The per-layer formats minimizing ``sum_l alphas[l] * t2[l]`` within an average budget.

    ``menu`` maps a format name to ``(bits_per_weight, t2)``, ``t2[l]`` being the relative
    squared error ``||W^ - W||^2 / ||W||^2`` that format gives layer ``l`` (measured on the layer);
    ``bits_per_weight`` is one number or one per layer (exact storage, padding included).
    ``layer_sizes`` are the layers' weight counts; ``budget_bits`` the allowed average bits per
    weight. Solved exactly (multiple-choice knapsack, dynamic programming in Rust) after
    rounding each layer's bits *up* to ``resolution`` average bits, so the result always fits.
    """
    alpha = _floats(alphas, "alphas")
    sizes = _floats(layer_sizes, "layer_sizes", len(alpha))
    if not isinstance(menu, Mapping) or not menu:
        raise TypeError("menu must be a non-empty mapping: name -> (bits_per_weight, errors)")
    budget = float(budget_bits)
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"budget_bits must be positive, got {budget_bits}")
    if not (0 < resolution <= 1):
        raise ValueError(f"resolution must be in (0, 1], got {resolution}")
    names = list(menu)
    total = sum(sizes)
    if total <= 0:
        raise ValueError("layer_sizes must not all be zero")
    unit = total * resolution  # bits of one budget unit
    costs: list[int] = []
    losses: list[float] = []
    table = {}
    for name in names:
        entry = menu[name]
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise TypeError(f"menu[{name!r}] must be (bits_per_weight, errors)")
        raw_bits = entry[0]
        per_layer = (
            [float(raw_bits)] * len(alpha)
            if isinstance(raw_bits, (int, float))
            else _floats(raw_bits, f"menu[{name!r}] bits", len(alpha))
        )
        if any(not (b > 0 and math.isfinite(b)) for b in per_layer):
            raise ValueError(f"menu[{name!r}] bits must be positive, got {raw_bits}")
        table[name] = (per_layer, _floats(entry[1], f"menu[{name!r}] errors", len(alpha)))
    for layer in range(len(alpha)):
        for name in names:
            bits, errors = table[name]
            costs.append(math.ceil(sizes[layer] * bits[layer] / unit - 1e-9))
            losses.append(alpha[layer] * errors[layer])
    capacity = math.floor(budget / resolution + 1e-9)
    choices, loss, _ = _native.allocate(costs, losses, len(names), capacity)
    picked = tuple(names[q] for q in choices)
    bits_used = sum(sizes[l] * table[n][0][l] for l, n in enumerate(picked)) / total
    return Allocation(picked, float(loss), float(bits_used))
