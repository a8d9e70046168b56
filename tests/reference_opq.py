"""An independent numpy model of OPQ outliers and double-quantized ("dq8") scales.

Written from the specification (README, formats.md section 3), sharing no code with bofrs; the
plain block format comes from :mod:`reference`. float64 numpy throughout for the outlier rule
(``np.std(ddof=1)``, two-pass), scipy for the normal quantile.

OPQ: block of ``m`` values (the last may be partial; its own length is used); ``m < 2`` or zero
spread: no outliers; else ``w`` is an outlier iff ``|w| > std(block, ddof=1) * t(m, q)`` with
``t(m, q) = Phi^-1((q^(1/m) + 1) / 2)``. Outliers are zeroed before the scale is taken and coded
as 0; their stored value is the nearest bfloat16 / float16 (a result beyond the input dtype's
range, or a bfloat16 overflow, steps one value toward zero; float16 overflow is an error).

dq8: groups of 256 scales; ``lo`` = smallest nonzero magnitude, ``hi`` = largest, ``K`` = 255
(absmax) or 127 (signed: bit 7 is the sign), ``step = (hi - lo) / (K - 1)`` (float32); a zero
scale has code 0; a nonzero one ``1 + rint((m - lo) / step)`` clipped to ``1..K`` (1 when
``step == 0``), stepped down while its decoded value ``lo + (c - 1) * step`` exceeds the input
dtype's range; decoding multiplies then adds in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import norm

import reference

GROUP = 256


class OpqEncoded(NamedTuple):
    codes: np.ndarray  # uint8, packed as in reference.Encoded
    scales: np.ndarray  # float32 decoded scale per block
    scale_codes: np.ndarray | None  # dq8 bytes
    scale_params: np.ndarray | None  # dq8 (groups, 2) float32 [lo, step]
    outlier_indices: np.ndarray  # int64 ascending
    outlier_values: np.ndarray  # float32 values of the stored 16-bit outliers
    numel: int


def threshold(m: int, q: float) -> float:
    """``t(m, q)`` in float64."""
    tail = -np.expm1(np.log(q) / m) / 2.0
    return float(norm.isf(tail))


def outlier_mask(values: np.ndarray, block_size: int, q: float) -> np.ndarray:
    """Which float32 values are outliers (the rule of the module doc)."""
    n = values.size
    mask = np.zeros(n, dtype=bool)
    full = n // block_size * block_size
    if full:
        blocks = values[:full].astype(np.float64).reshape(-1, block_size)
        sigma = blocks.std(axis=1, ddof=1) if block_size > 1 else np.zeros(len(blocks))
        limit = sigma * threshold(block_size, q)
        mask[:full] = (np.abs(blocks) > limit[:, None]).reshape(-1) & np.repeat(sigma > 0, block_size)
    m = n - full
    if m >= 2:
        tail = values[full:].astype(np.float64)
        sigma = tail.std(ddof=1)
        if sigma > 0:
            mask[full:] = np.abs(tail) > sigma * threshold(m, q)
    return mask


def store_outliers(values: np.ndarray, dtype: str, input_max: float) -> np.ndarray:
    """Stored 16-bit values (as float32) of float32 outliers."""
    if dtype == "bfloat16":
        stored = reference.round_to_bfloat16(values)
        bits = stored.view(np.uint32).copy()
        over = ~np.isfinite(stored) | (np.abs(stored) > input_max)
        bits[over] -= np.uint32(0x10000)
        return bits.view(np.float32)
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise ValueError("outlier beyond the float16 range")
    stored = half.astype(np.float32)
    over = np.abs(stored) > input_max
    stored[over] = np.nextafter(half[over], np.float16(0)).astype(np.float32)
    return stored


def dq8(raw: np.ndarray, signed: bool, input_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, ``[lo, step]`` per group and decoded float32 scales of raw float32 scales."""
    k = 127 if signed else 255
    codes = np.zeros(raw.size, dtype=np.uint8)
    decoded = np.zeros(raw.size, dtype=np.float32)
    params = np.zeros((-(-raw.size // GROUP), 2), dtype=np.float32)
    for g in range(params.shape[0]):
        s = raw[g * GROUP : (g + 1) * GROUP].astype(np.float32)
        m = np.abs(s)
        nonzero = m > 0
        c = np.zeros(s.size, dtype=np.int64)
        lo = step = np.float32(0)
        if nonzero.any():
            lo, hi = m[nonzero].min(), m[nonzero].max()
            step = np.float32((hi - lo) / np.float32(k - 1))
            if step == 0:
                c[nonzero] = 1
            else:
                q = np.rint((m - lo) / step).astype(np.float32)
                c[nonzero] = np.clip(np.float32(1) + q, 1, k).astype(np.int64)[nonzero]
            for _ in range(k):
                value = lo + (c - 1).astype(np.float32) * step
                bad = (c > 1) & (~np.isfinite(value) | (value > input_max))
                if not bad.any():
                    break
                c[bad] -= 1
        magnitude = np.where(c == 0, np.float32(0), lo + (c - 1).astype(np.float32) * step)
        negative = np.signbit(s) if signed else np.zeros(s.size, dtype=bool)
        codes[g * GROUP : g * GROUP + s.size] = c | np.where(negative, 0x80, 0)
        decoded[g * GROUP : g * GROUP + s.size] = np.where(negative, -magnitude, magnitude)
        params[g] = (lo, step)
    return codes, params, decoded


def encode(
    tensor: torch.Tensor | np.ndarray,
    levels: np.ndarray,
    block_size: int,
    normalization: str,
    scale_dtype: str,
    q: float | None,
    outlier_dtype: str = "bfloat16",
) -> OpqEncoded:
    """The packed form of ``tensor`` with OPQ (``q``; None: off) and dq8 or plain scales."""
    values = reference.flat_float32(tensor)
    n = values.size
    input_max = reference.input_max(tensor)
    mask = outlier_mask(values, block_size, q) if q is not None else np.zeros(n, dtype=bool)
    zeroed = values.copy()
    zeroed[mask] = 0
    raw = reference.raw_scales(zeroed, block_size, normalization)
    scale_codes = scale_params = None
    if scale_dtype == "dq8":
        scale_codes, scale_params, scales = dq8(raw, normalization == "signed_absmax", input_max)
    else:
        scales = reference.round_scales(raw, scale_dtype, input_max)
    per_value = np.repeat(scales, block_size)[:n]
    normalized = np.zeros(n, dtype=np.float32)
    np.divide(zeroed, per_value, out=normalized, where=per_value != 0)
    codes = np.zeros(n + n % 2, dtype=np.uint8)
    for t in reference.thresholds(levels):
        codes[:n] += normalized > t
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    indices = np.flatnonzero(mask)
    stored = store_outliers(values[indices], outlier_dtype, input_max)
    return OpqEncoded(packed, scales, scale_codes, scale_params, indices, stored, n)


def decode(encoded: OpqEncoded, levels: np.ndarray, block_size: int) -> np.ndarray:
    """float32 decoded values: ``levels[code] * scale``, outliers written back."""
    out = reference.decode(encoded.codes, encoded.scales, levels, block_size, encoded.numel)
    out[encoded.outlier_indices] = encoded.outlier_values
    return out
