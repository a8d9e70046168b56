"""The BOF4 codebook optimizer (theoretical and data-driven) and exact Gaussian error figures."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch

from bofrs import _native
from bofrs._inputs import flatten_for_native
from bofrs._validate import check_block_size, check_choice
from bofrs.formats.blockwise.codebooks import NORMALIZATIONS, Codebook, resolve

METRICS = ("mse", "mae")

#: Levels the BOF4 paper pins, per normalization.
DEFAULT_PINS = {"absmax": (-1.0, 0.0, 1.0), "signed_absmax": (0.0, 1.0)}


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _level_list(values: object, name: str) -> list[float]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if not np.all(np.isfinite(array)) or np.any(np.abs(array) > 1.0):
        raise ValueError(f"{name} must hold finite values within [-1, 1], got {array.tolist()}")
    return [float(v) for v in array]


def _tensors(data: object) -> Iterable[tuple[str, object]]:
    """(label, tensor) pairs from one tensor, a mapping (its >=2-D float tensors) or an iterable."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        yield "data", data
    elif isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.dim() >= 2:
                yield f"data[{key!r}]", value
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        for k, value in enumerate(data):
            yield f"data[{k}]", value
    else:
        raise TypeError(
            "data must be a tensor, an array, a mapping of tensors (a state dict) or an iterable "
            f"of tensors, got {type(data).__name__}"
        )


def _histogram(
    data: object, block_size: int, metric: str, normalization: str, sample: float, seed: int
) -> _native.WeightHistogramBuilder:
    histogram = _native.WeightHistogramBuilder(block_size, metric, normalization, sample, seed)
    for label, tensor in _tensors(data):
        flat = flatten_for_native(tensor, label)
        try:
            histogram.add(flat.data, flat.element)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
    return histogram


def _default_name(metric: str, normalization: str, data_driven: bool, bits: int) -> str:
    name = "bof4" if bits == 4 else f"bof{bits}"
    name += "s" if normalization == "signed_absmax" else ""
    name += "-mae" if metric == "mae" else ""
    return name + ("-data" if data_driven else "")


def optimize_codebook(
    block_size: int = 64,
    *,
    metric: str = "mse",
    normalization: str = "absmax",
    pinned: Sequence[float] | None = None,
    data: object = None,
    bits: int = 4,
    init: Sequence[float] | Codebook | None = None,
    tolerance: float = 1e-10,
    max_iterations: int = 20_000,
    sample: float = 1.0,
    seed: int = 0,
    name: str | None = None,
) -> Codebook:
    """A codebook minimizing the block-wise quantization error on the *weights* (BOF4).

    Lloyd's iteration where every normalized value's error is weighted by its block scale
    (squared for ``metric="mse"``, absolute for ``"mae"``). Without ``data`` the weights are
    i.i.d. Gaussian and every expectation is integrated exactly over the distribution of the
    block maximum (the theoretical mode; the result does not depend on the weights' variance).
    With ``data`` (a tensor, an array, a state dict — whose float tensors of 2 or more
    dimensions are used — or an iterable of tensors) the blocks of every tensor, flattened
    row-major as :func:`bofrs.pack` cuts them, are streamed into a fine weighted histogram of
    bounded size; ``sample`` < 1 keeps that fraction of the blocks, chosen by ``seed``.

    ``normalization`` is ``"absmax"`` or ``"signed_absmax"`` (BOF4-S); ``pinned`` levels never
    move (default: -1, 0, 1 for absmax; 0, 1 for signed absmax; ``()`` pins nothing); ``bits``
    in 2..8 gives ``2**bits`` levels; ``init`` is a starting codebook (default evenly spaced).
    Iteration stops when no level moves by more than ``tolerance``; a ``RuntimeWarning`` says so
    if ``max_iterations`` is reached first.
    """
    block_size = check_block_size(block_size)
    check_choice(metric, METRICS, "metric")
    check_choice(normalization, NORMALIZATIONS, "normalization")
    bits = _check_int(bits, "bits", 2, 8)
    pins = _level_list(DEFAULT_PINS[normalization] if pinned is None else pinned, "pinned")
    start: list[float] | None = None
    if isinstance(init, Codebook):
        start = [float(v) for v in init.levels]
    elif init is not None:
        start = _level_list(init, "init")
    tolerance = _check_real(tolerance, "tolerance")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be positive and finite, got {tolerance}")
    max_iterations = _check_int(max_iterations, "max_iterations", 1)
    sample = _check_real(sample, "sample")
    if not 0 < sample <= 1:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    seed = _check_int(seed, "seed", 0, 2**64 - 1)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError("name must be a non-empty str")

    if data is None:
        levels, iterations, converged, _ = _native.optimize_gaussian(
            block_size, metric, normalization, bits, pins, start, tolerance, max_iterations
        )
    else:
        histogram = _histogram(data, block_size, metric, normalization, sample, seed)
        levels, iterations, converged, _ = histogram.optimize(
            bits, pins, start, tolerance, max_iterations
        )
    if not converged:
        warnings.warn(
            f"optimize_codebook: not converged after {iterations} iterations "
            f"(tolerance {tolerance}); raise max_iterations",
            RuntimeWarning,
            stacklevel=2,
        )
    label = name or _default_name(metric, normalization, data is not None, bits)
    return Codebook(label, levels, normalization, block_size)


def _levels_of(
    codebook: str | Codebook | npt.ArrayLike, block_size: int
) -> tuple[list[float], str | None]:
    if isinstance(codebook, (str, Codebook)):
        book = resolve(codebook, block_size)
        return [float(v) for v in book.levels], book.normalization
    levels = _level_list(codebook, "codebook")
    if len(levels) < 2 or any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError("codebook levels must be at least 2 values, sorted ascending")
    return levels, None


def expected_error(
    codebook: str | Codebook | npt.ArrayLike,
    block_size: int | None = None,
    *,
    metric: str = "mse",
    normalization: str | None = None,
) -> float:
    """Expected error per weight of a codebook on i.i.d. N(0, 1) weights, by exact integration.

    ``codebook``: a name, a :class:`bofrs.Codebook` or sorted levels in [-1, 1]. ``block_size``
    defaults to the codebook's own (else 64); ``normalization`` to the codebook's (else
    ``"absmax"``). ``metric="mse"`` gives E[(w - w^)^2], ``"mae"`` gives E|w - w^|, with exact
    block scales and nearest-level encoding. For weights of standard deviation sigma, multiply
    by sigma^2 (MSE) or sigma (MAE).
    """
    if block_size is None:
        own = codebook.block_size if isinstance(codebook, Codebook) else None
        block_size = own if own is not None else 64
    block_size = check_block_size(block_size)
    check_choice(metric, METRICS, "metric")
    levels, own_normalization = _levels_of(codebook, block_size)
    norm = normalization or own_normalization or "absmax"
    check_choice(norm, NORMALIZATIONS, "normalization")
    return float(_native.expected_error(levels, block_size, metric, norm))
