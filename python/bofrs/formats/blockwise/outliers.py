"""OPQ outliers of a packed tensor: flat indices and their stored 16-bit values."""

from __future__ import annotations

import math
import numbers

import torch

from bofrs import _native
from bofrs._dtypes import HALF_DTYPES, INDEX_DTYPES

#: Storage types of outlier values.
OUTLIER_DTYPES = HALF_DTYPES


def index_dtype(numel: int) -> torch.dtype:
    """The smallest unsigned integer type that holds every flat index of ``numel`` values."""
    if numel <= 1 << 16:
        return torch.uint16
    if numel <= 1 << 32:
        return torch.uint32
    return torch.uint64


def check_quantile(opq: object) -> float | None:
    """``opq`` as a float in (0, 1), or None; TypeError / ValueError naming ``opq`` otherwise."""
    if opq is None:
        return None
    if isinstance(opq, bool) or not isinstance(opq, numbers.Real):
        raise TypeError(f"opq must be a float in (0, 1) or None, got {type(opq).__name__}")
    q = float(opq)
    if not (0.0 < q < 1.0) or math.isnan(q):
        raise ValueError(f"opq must be strictly between 0 and 1, got {opq!r}")
    return q


def opq_threshold(block_size: int, q: float) -> float:
    """OPQ threshold factor ``t(I, q) = Phi^-1((q^(1/I) + 1) / 2)``: a value is an outlier when
    its magnitude exceeds ``t`` times its block's sample standard deviation."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    checked = check_quantile(q)
    if checked is None:
        raise TypeError("q must be a float in (0, 1)")
    return float(_native.opq_threshold(block_size, checked))


class Outliers:
    """The outliers OPQ took out of a packed tensor (read-only).

    ``indices``: flat indices into the original tensor, strictly ascending, in the smallest
    unsigned type that holds ``numel - 1`` (uint16 / uint32 / uint64). ``values``: the outliers
    rounded to ``bfloat16`` or ``float16``; decoding writes exactly these back. ``q``: the
    quantile the threshold was built from.
    """

    __slots__ = ("_indices", "_values", "_q")

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, q: float) -> None:
        if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES or indices.dim() != 1:
            raise ValueError("outlier indices must be a 1-D uint16 / uint32 / uint64 tensor")
        if not isinstance(values, torch.Tensor) or values.dtype not in OUTLIER_DTYPES.values():
            raise ValueError("outlier values must be a bfloat16 or float16 tensor")
        if values.shape != indices.shape:
            raise ValueError(
                f"{indices.numel()} outlier indices but {values.numel()} values"
            )
        if values.device != indices.device:
            raise ValueError("outlier indices and values must be on the same device")
        self._indices = indices
        self._values = values
        self._q = check_quantile(q)

    @property
    def indices(self) -> torch.Tensor:
        """Flat indices, strictly ascending."""
        return self._indices

    @property
    def values(self) -> torch.Tensor:
        """Stored outlier values (bfloat16 or float16)."""
        return self._values

    @property
    def q(self) -> float:
        """The OPQ quantile."""
        assert self._q is not None
        return self._q

    @property
    def count(self) -> int:
        """Number of outliers."""
        return int(self._indices.numel())

    @property
    def dtype(self) -> torch.dtype:
        """Storage type of the values."""
        return self._values.dtype

    @property
    def nbytes(self) -> int:
        """Storage of indices plus values."""
        return self.count * (self._indices.element_size() + self._values.element_size())

    def to(self, device: torch.device | str) -> Outliers:
        """A copy on ``device``."""
        return Outliers(self._indices.to(device), self._values.to(device), self.q)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"Outliers(count={self.count}, q={self.q}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"index_dtype={str(self._indices.dtype).removeprefix('torch.')})"
        )
