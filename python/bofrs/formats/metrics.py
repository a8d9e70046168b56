"""Quantization error of a packed tensor against its original."""

from __future__ import annotations

import math

import torch

from bofrs._inputs import as_tensor
from bofrs.formats.tensor import QuantizedTensor

_CHUNK = 1 << 22


def quantization_error(original: object, packed: QuantizedTensor) -> dict[str, float]:
    """Error statistics of ``packed`` against ``original`` (computed in float64).

    Returns ``mse``, ``mae``, ``max_abs_error``, ``relative_mse`` (mse over the mean square of
    the original; 0 when both are 0), ``sqnr_db`` (``-10 log10 relative_mse``; inf when exact),
    ``bits_per_weight`` and ``outlier_fraction`` (OPQ outliers over all values; 0 without OPQ).
    """
    if not isinstance(packed, QuantizedTensor):
        raise TypeError(
            f"packed must be a bofrs.PackedTensor or bofrs.HiggsTensor, got {type(packed).__name__}"
        )
    reference = as_tensor(original, "original")
    if reference.shape != packed.shape:
        raise ValueError(
            f"original has shape {tuple(reference.shape)}, packed has {tuple(packed.shape)}"
        )
    reference = reference.reshape(-1).cpu()
    decoded = packed.to("cpu").dequantize(torch.float32).reshape(-1)
    n = reference.numel()
    sq = ab = signal = 0.0
    worst = 0.0
    for start in range(0, n, _CHUNK):
        ref = reference[start : start + _CHUNK].double()
        if not bool(torch.isfinite(ref).all()):
            bad = start + int((~torch.isfinite(ref)).nonzero()[0, 0])
            raise ValueError(f"original holds a non-finite value at flat index {bad}")
        diff = ref - decoded[start : start + _CHUNK].double()
        sq += float((diff * diff).sum())
        ab += float(diff.abs().sum())
        signal += float((ref * ref).sum())
        worst = max(worst, float(diff.abs().max()))
    mse = sq / n if n else 0.0
    relative = (sq / signal) if signal > 0 else (0.0 if sq == 0 else math.inf)
    return {
        "mse": mse,
        "mae": ab / n if n else 0.0,
        "max_abs_error": worst,
        "relative_mse": relative,
        "sqnr_db": -10.0 * math.log10(relative) if relative > 0 else math.inf,
        "bits_per_weight": packed.bits_per_weight,
        "outlier_fraction": packed.outlier_count / n if n else 0.0,
    }
