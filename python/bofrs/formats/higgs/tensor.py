"""HIGGS: Hadamard-rotated weights quantized to Gaussian MSE-optimal grids (data-free)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from bofrs import _cuda, _native
from bofrs._cuda import _higgs as _cuda_higgs
from bofrs._dtypes import SCALE_DTYPES, dtype_name
from bofrs._inputs import flatten_for_native
from bofrs._validate import check_choice
from bofrs.formats.hadamard import check_group_size
from bofrs.formats.higgs import stored
from bofrs.formats.higgs.grids import Grid, grid
from bofrs.formats.tensor import QuantizedTensor

if TYPE_CHECKING:
    from bofrs.formats.format import HiggsFormat

#: Bits per weight -> (p, n) of the default grid for that width.
GRIDS_FOR_BITS = {
    2: {1: 4, 2: 16}, 3: {1: 8, 2: 64}, 4: {1: 16, 2: 256}, 5: {1: 32}, 6: {1: 64}, 8: {1: 256},
}  # fmt: skip


def higgs_grid(bits: int = 4, p: int = 2) -> Grid:
    """The grid HIGGS uses for ``bits`` per weight in ``p`` dimensions (ValueError otherwise)."""
    for value, name in ((bits, "bits"), (p, "p")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    sizes = GRIDS_FOR_BITS.get(int(bits), {})
    if int(p) not in sizes:
        valid = ", ".join(f"bits={b} p={q}" for b, d in GRIDS_FOR_BITS.items() for q in d)
        raise ValueError(f"no HIGGS grid for bits={bits}, p={p}; choose one of: {valid}")
    return grid(int(p), sizes[int(p)])


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    cols = int(shape[-1])
    return (shape.numel() // cols if cols else 0), cols


class HiggsTensor(QuantizedTensor):
    """A weight packed with HIGGS.

    Each row (last dimension) is cut into groups of ``group_size`` values, the last one padded
    with zeros; every group is rotated by the orthonormal Hadamard transform, divided by its
    RMS (``scales``, one per group, stored in ``scale_dtype``), and each ``p``-tuple of rotated
    values takes the ``log2(n)``-bit code of the nearest grid point (``codes``: per group, an
    LSB-first bit stream). :meth:`dequantize` returns the weight in its original basis;
    :meth:`rotated` the rotated weight ``W_rot`` (rows padded to whole groups), for kernels
    that rotate activations instead: ``W x == W_rot (H x)`` with ``H`` the same transform per
    input group (:func:`bofrs.hadamard`).
    """

    __slots__ = (
        "_codes", "_scales", "_shape", "_dtype", "_group_size", "_grid", "_scale_dtype", "_cuda_cache",
    )
    kind: ClassVar[str] = stored.KIND

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        shape: torch.Size,
        dtype: torch.dtype,
        group_size: int,
        grid: Grid,
    ) -> None:
        rows, cols = _rows_cols(shape)
        groups = rows * -(-cols // group_size)
        group_bytes = group_size // grid.p * int(np.log2(grid.n)) // 8
        if codes.dtype != torch.uint8 or codes.shape != (groups * group_bytes,):
            raise ValueError(f"codes must be {groups * group_bytes} uint8 values, got {tuple(codes.shape)}")
        if scales.dtype not in SCALE_DTYPES.values() or scales.shape != (groups,):
            raise ValueError(f"scales must be {groups} float values, got {tuple(scales.shape)}")
        self._codes, self._scales = codes, scales
        self._shape, self._dtype = torch.Size(shape), dtype
        self._group_size, self._grid = group_size, grid
        self._scale_dtype = dtype_name(scales.dtype)
        self._cuda_cache: tuple[tuple[int, int], _cuda_higgs.HiggsOperands] | None = None

    @property
    def group_size(self) -> int:
        """Values per rotated group."""
        return self._group_size

    @property
    def grid(self) -> Grid:
        """The Gaussian grid (``p``, ``n``, ``points``, ``mse``)."""
        return self._grid

    @property
    def format(self) -> HiggsFormat:
        """The :class:`bofrs.Format` of this tensor."""
        from bofrs.formats.format import HiggsFormat

        code_bits = int(self._grid.n).bit_length() - 1
        return HiggsFormat(code_bits // self._grid.p, self._grid.p, self._group_size, self._scale_dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"codes": self._codes, "scales": self._scales}

    def manifest(self) -> dict[str, Any]:
        return stored.manifest(self)

    @classmethod
    def stored_parts(cls, entry: Mapping[str, Any]) -> tuple[str, ...]:
        return ("codes", "scales")

    @classmethod
    def format_version(cls, entry: Mapping[str, Any]) -> int:
        return 2

    @classmethod
    def from_stored(cls, name: str, entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> HiggsTensor:
        return stored.from_stored(name, entry, parts)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return int(self._codes.numel() + self._scales.numel() * self._scales.element_size())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original weight (padding of the last group included)."""
        numel = self._shape.numel()
        return 8.0 * self.nbytes / numel if numel else 0.0

    def _decode(self, rotated: bool) -> torch.Tensor:
        rows, cols = _rows_cols(self._shape)
        out = _native.unpack_higgs(
            self._codes.cpu().numpy(),
            self._scales.cpu().float().numpy(),
            rows,
            cols,
            self._group_size,
            self._grid.p,
            np.ascontiguousarray(self._grid.points.ravel()),
            rotated,
        )
        return torch.from_numpy(out)

    def cuda_operands(self) -> _cuda_higgs.HiggsOperands:
        """The parts as the CUDA kernels read them (validated once per tensor, while neither part
        is modified in place; needs CuPy and a CUDA device)."""
        versions = (self._codes._version, self._scales._version)
        cache = self._cuda_cache
        if cache is not None and cache[0] == versions:
            return cache[1]
        rows, cols = _rows_cols(self._shape)
        ops = _cuda_higgs.operands(
            self._codes, self._scales, rows, cols, self._group_size, self._grid.p,
            self._grid.points,
        )
        self._cuda_cache = (versions, ops)
        return ops

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in its original basis and shape (``dtype`` default: the original's)."""
        if _cuda.enabled(self._codes.device):
            out = _cuda_higgs.dequantize(self.cuda_operands(), dtype or self._dtype, rotated=False)
            return out.reshape(self._shape)
        flat = self._decode(rotated=False)
        return flat.reshape(self._shape).to(dtype or self._dtype).to(self._codes.device)

    def rotated(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rotated weight, ``rows x padded_cols`` (2-D), scales applied."""
        if _cuda.enabled(self._codes.device):
            return _cuda_higgs.dequantize(self.cuda_operands(), dtype or self._dtype, rotated=True)
        rows, cols = _rows_cols(self._shape)
        padded = -(-cols // self._group_size) * self._group_size
        flat = self._decode(rotated=True)
        return flat.reshape(rows, padded).to(dtype or self._dtype).to(self._codes.device)

    def to(self, device: torch.device | str) -> HiggsTensor:
        """The same packed data on another device."""
        return HiggsTensor(
            self._codes.to(device), self._scales.to(device), self._shape, self._dtype,
            self._group_size, self._grid,
        )

    def __repr__(self) -> str:
        return (
            f"HiggsTensor(shape={tuple(self._shape)}, p={self._grid.p}, n={self._grid.n}, "
            f"group_size={self._group_size}, bits_per_weight={self.bits_per_weight:.4f})"
        )


def pack_higgs(
    tensor: object,
    bits: int = 4,
    p: int = 2,
    group_size: int = 1024,
    *,
    scale_dtype: str = "float16",
) -> HiggsTensor:
    """Quantizes a weight with HIGGS: per row, groups of ``group_size`` values are rotated by
    the orthonormal Hadamard transform, scaled by their RMS and matched to the ``p``-dimensional
    Gaussian MSE-optimal grid of ``2**(bits*p)`` points (4 bits: ``p=1`` 16 levels or ``p=2``
    256 points; also 2, 3 and 8 bits, and 5 or 6 bits with ``p=1``). The relative error is
    about the grid's MSE whatever the weight's distribution. Scales are stored in
    ``scale_dtype`` (float16 by default, as HIGGS).
    """
    g = higgs_grid(bits, p)
    group_size = check_group_size(group_size)
    check_choice(scale_dtype, tuple(SCALE_DTYPES), "scale_dtype")
    flat = flatten_for_native(tensor)
    rows, cols = _rows_cols(flat.shape)
    codes, scales = _native.pack_higgs(
        flat.data, flat.element, rows, cols, group_size, g.p,
        np.ascontiguousarray(g.points.ravel()), scale_dtype,
    )
    stored = torch.from_numpy(scales).to(SCALE_DTYPES[scale_dtype])
    return HiggsTensor(torch.from_numpy(codes), stored, flat.shape, flat.dtype, group_size, g).to(
        flat.device
    )
