"""An independent numpy model of the bofrs format, written from the specification.

It shares no code with bofrs: codebook levels are passed in as plain arrays (for built-ins the
tests read them from ``bofrs.codebook(...).levels``). torch is used only to read inputs and for
the final cast of decoded values (``Tensor.to``, round to nearest even), as the spec says.

Specification:

- the input is flattened row-major and converted to float32 exactly (bf16 / f16 widen exactly,
  float64 rounds to nearest);
- blocks are ``block_size`` consecutive values, the last one possibly partial;
- the raw block scale is ``max |x|`` (absmax) or ``x[j]`` for the first ``j`` with ``|x[j]|``
  maximal (signed_absmax); the stored scale ``S`` is that value rounded (nearest even) to the
  scale dtype, kept as a float32 value; a scale that overflows the scale dtype is an error; a
  stored scale larger in magnitude than the input dtype's largest finite value (float16 input,
  bfloat16 scale: 65504 -> 65536) is replaced by its neighbour toward zero in the scale dtype;
- ``y = x / S`` in float32 (``y = 0`` when ``S == 0``);
- thresholds ``t_k = (c_k + c_{k+1}) * 0.5`` in float32; ``code = #{k : y > t_k}``;
- byte ``j`` is ``code[2j] << 4 | code[2j + 1]`` (an odd count leaves the last low nibble 0);
- decoding gives ``float32(levels[code]) * float32(S)`` in float32, then a cast to the output type.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

SCALE_DTYPES = ("bfloat16", "float16", "float32")
_WIDENED = (torch.float32, torch.bfloat16, torch.float16)


class Encoded(NamedTuple):
    codes: np.ndarray  # uint8, ceil(n / 2) bytes
    scales: np.ndarray  # float32, one per block, already rounded to the scale dtype
    numel: int


def flat_float32(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """The values of ``tensor`` in row-major order as float32; ValueError names the first
    non-finite (or float32-overflowing) flat index."""
    if isinstance(tensor, torch.Tensor):
        flat = tensor.detach().cpu().reshape(-1)
        if flat.dtype in _WIDENED:
            values = flat.float().numpy()
        elif flat.dtype == torch.float64:
            values = _narrow(flat.numpy())
        else:
            raise TypeError(f"unsupported dtype {flat.dtype}")
    else:
        array = np.asarray(tensor).reshape(-1)
        if array.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"unsupported dtype {array.dtype}")
        values = _narrow(array)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"non-finite value at flat index {bad[0]}")
    return values


def _narrow(array: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32; finite inputs."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def _toward_zero(stored: np.ndarray, scale_dtype: str) -> np.ndarray:
    """The neighbour toward zero of each (nonzero) value in the scale dtype."""
    if scale_dtype == "float16":
        half = stored.astype(np.float16)
        return np.nextafter(half, np.float16(0)).astype(np.float32)
    if scale_dtype == "bfloat16":
        bits = stored.astype(np.float32).view(np.uint32)
        return (bits - np.uint32(0x10000)).view(np.float32)
    return np.nextafter(stored.astype(np.float32), np.float32(0))


def round_scales(raw: np.ndarray, scale_dtype: str, input_max: float = float(np.finfo(np.float32).max)) -> np.ndarray:
    """Raw float32 block scales rounded to the storage type (as float32 values), kept within
    ``input_max`` in magnitude (see the module doc)."""
    if scale_dtype == "float32":
        stored = raw.astype(np.float32)
    elif scale_dtype == "float16":
        with np.errstate(over="ignore"):
            stored = raw.astype(np.float16).astype(np.float32)
    elif scale_dtype == "bfloat16":
        stored = round_to_bfloat16(raw)
    else:
        raise ValueError(f"unknown scale dtype {scale_dtype!r}")
    bad = np.flatnonzero(~np.isfinite(stored))
    if bad.size:
        raise ValueError(f"scale of block {bad[0]} overflows {scale_dtype}")
    over = np.abs(stored) > input_max
    if over.any():
        stored = stored.copy()
        stored[over] = _toward_zero(stored[over], scale_dtype)
    return stored


def input_max(tensor: torch.Tensor | np.ndarray) -> float:
    """Largest finite value of the input's dtype (float64 inputs are narrowed to float32)."""
    if isinstance(tensor, torch.Tensor):
        if tensor.dtype in (torch.float16, torch.bfloat16):
            return float(torch.finfo(tensor.dtype).max)
    elif np.asarray(tensor).dtype == np.float16:
        return float(np.finfo(np.float16).max)
    return float(np.finfo(np.float32).max)


def thresholds(levels: np.ndarray) -> np.ndarray:
    """The 15 float32 midpoints between neighbouring levels."""
    lv = np.asarray(levels, dtype=np.float32)
    return ((lv[:-1] + lv[1:]) * np.float32(0.5)).astype(np.float32)


def raw_scales(values: np.ndarray, block_size: int, normalization: str) -> np.ndarray:
    """Raw (unrounded) float32 scale of each block."""
    n = values.size
    blocks = -(-n // block_size)
    padded = np.zeros(blocks * block_size, dtype=np.float32)  # zero padding: never a maximum
    padded[:n] = values
    padded = padded.reshape(blocks, block_size)
    magnitude = np.abs(padded)
    if normalization == "absmax":
        return magnitude.max(axis=1) if blocks else np.zeros(0, np.float32)
    if normalization == "signed_absmax":
        first = magnitude.argmax(axis=1)  # argmax returns the first maximal index
        return padded[np.arange(blocks), first]
    raise ValueError(f"unknown normalization {normalization!r}")


def encode(
    tensor: torch.Tensor | np.ndarray,
    levels: np.ndarray,
    block_size: int,
    normalization: str = "absmax",
    scale_dtype: str = "bfloat16",
) -> Encoded:
    """Codes and stored scales of ``tensor`` per the specification."""
    values = flat_float32(tensor)
    n = values.size
    raw = raw_scales(values, block_size, normalization)
    scales = round_scales(raw, scale_dtype, input_max(tensor))
    per_value = np.repeat(scales, block_size)[:n]
    normalized = np.zeros(n, dtype=np.float32)
    np.divide(values, per_value, out=normalized, where=per_value != 0)
    codes = np.zeros(n + n % 2, dtype=np.uint8)
    for t in thresholds(levels):
        codes[:n] += normalized > t
    packed = (codes[0::2] << 4) | codes[1::2]
    return Encoded(packed.astype(np.uint8), scales, n)


def unpack_codes(codes: np.ndarray, numel: int) -> np.ndarray:
    """The 4-bit code of every value (high nibble first)."""
    nibbles = np.stack((codes >> 4, codes & 15), axis=-1).reshape(-1)
    return nibbles[:numel]


def decode(
    codes: np.ndarray, scales: np.ndarray, levels: np.ndarray, block_size: int, numel: int
) -> np.ndarray:
    """float32 ``levels[code] * scale`` of every value."""
    lv = np.asarray(levels, dtype=np.float32)
    per_value = np.repeat(np.asarray(scales, dtype=np.float32), block_size)[:numel]
    return lv[unpack_codes(codes, numel)] * per_value


def decode_as(values: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Decoded float32 values cast (nearest even) to ``dtype`` and reshaped."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype).reshape(shape)
