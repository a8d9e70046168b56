"""Codebooks: sorted levels in [-1, 1] and how blocks are normalized before matching them."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from bofrs import _native
from bofrs._validate import check_block_size, check_choice

NORMALIZATIONS = ("absmax", "signed_absmax")

#: Built-in codebooks: name -> (normalization, depends on the block size).
_BUILTIN: dict[str, tuple[str, bool]] = {
    "nf4": ("absmax", False),
    "af4": ("absmax", True),
    "fp4": ("absmax", False),
    "int4": ("absmax", False),
    "bof4": ("absmax", True),
    "bof4-mae": ("absmax", True),
    "bof4s": ("signed_absmax", True),
    "bof4s-mae": ("signed_absmax", True),
}

#: Bit widths a codebook may have (``2**bits`` levels); :func:`bofrs.pack` stores 4-bit codes.
CODEBOOK_BITS = range(2, 9)


class Codebook:
    """A codebook: ``2**bits`` ascending float32 levels in [-1, 1] and a block normalization.

    4-bit codebooks (16 levels) are what :func:`bofrs.pack` stores; other widths (2..8 bits)
    come from :func:`bofrs.optimize_codebook` and can be evaluated with
    :func:`bofrs.expected_error`.

    ``normalization`` is ``"absmax"`` (blocks divided by their largest magnitude) or
    ``"signed_absmax"`` (divided by the signed value of their largest-magnitude element, which
    then maps to +1). ``block_size`` is the block size the table was built for, or ``None`` when
    it does not depend on it.
    """

    __slots__ = ("_name", "_levels", "_normalization", "_block_size")

    def __init__(
        self,
        name: str,
        levels: npt.ArrayLike,
        normalization: str = "absmax",
        block_size: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str")
        check_choice(normalization, NORMALIZATIONS, "normalization")
        if block_size is not None:
            check_block_size(block_size)
        array = np.array(levels, dtype=np.float64)
        sizes = tuple(1 << b for b in CODEBOOK_BITS)
        if array.ndim != 1 or array.shape[0] not in sizes:
            raise ValueError(
                f"levels must hold 2**bits values for bits in 2..8 {sizes}, "
                f"got shape {array.shape}"
            )
        if not np.all(np.isfinite(array)) or np.any(np.abs(array) > 1.0):
            raise ValueError("levels must be finite and within [-1, 1]")
        single = array.astype(np.float32)
        if np.any(np.diff(single) < 0):
            raise ValueError("levels must be sorted ascending")
        single.setflags(write=False)
        self._name = name
        self._levels = single
        self._normalization = normalization
        self._block_size = block_size

    @property
    def name(self) -> str:
        """The codebook's name (for built-ins, the name ``bofrs.codebook`` takes)."""
        return self._name

    @property
    def levels(self) -> npt.NDArray[np.float32]:
        """The levels, ascending, as a read-only float32 array."""
        return self._levels

    @property
    def bits(self) -> int:
        """Bits per code: ``log2(len(levels))``."""
        return int(self._levels.shape[0]).bit_length() - 1

    @property
    def normalization(self) -> str:
        """``"absmax"`` or ``"signed_absmax"``."""
        return self._normalization

    @property
    def block_size(self) -> int | None:
        """Block size the levels were built for, or ``None`` if they do not depend on it."""
        return self._block_size

    @property
    def thresholds(self) -> npt.NDArray[np.float32]:
        """The float32 midpoints between neighbouring levels used by the encoder."""
        lv = self._levels
        mids: npt.NDArray[np.float32] = ((lv[:-1] + lv[1:]) * np.float32(0.5)).astype(np.float32)
        return mids

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (levels as exact float values)."""
        return {
            "name": self._name,
            "levels": [float(v) for v in self._levels],
            "normalization": self._normalization,
            "block_size": self._block_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Codebook:
        """Inverse of :meth:`to_dict`."""
        return cls(data["name"], data["levels"], data["normalization"], data.get("block_size"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codebook):
            return NotImplemented
        return (
            self._name == other._name
            and self._normalization == other._normalization
            and self._block_size == other._block_size
            and bool(np.array_equal(self._levels, other._levels))
        )

    def __hash__(self) -> int:
        return hash((self._name, self._normalization, self._block_size, self._levels.tobytes()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{v:.4f}" for v in self._levels)
        suffix = f", block_size={self._block_size}" if self._block_size is not None else ""
        return f"Codebook({self._name!r}, [{shown}], {self._normalization!r}{suffix})"


def available_codebooks() -> tuple[str, ...]:
    """Names :func:`codebook` accepts."""
    return tuple(_BUILTIN)


def codebook(name: str, block_size: int = 64) -> Codebook:
    """The built-in codebook ``name`` (see :func:`available_codebooks`) for a block size."""
    check_choice(name, available_codebooks(), "codebook")
    check_block_size(block_size)
    normalization, per_block_size = _BUILTIN[name]
    return _builtin(name, block_size if per_block_size else None, normalization)


@functools.lru_cache(maxsize=None)
def _builtin(name: str, block_size: int | None, normalization: str) -> Codebook:
    levels = _native.builtin_levels(name, block_size if block_size is not None else 64)
    return Codebook(name, levels, normalization, block_size)


def resolve(spec: str | Codebook, block_size: int) -> Codebook:
    """A codebook from a name or an instance (checked against the block size)."""
    if isinstance(spec, Codebook):
        if spec.block_size is not None and spec.block_size != block_size:
            raise ValueError(
                f"codebook {spec.name!r} was built for block_size={spec.block_size}, "
                f"not {block_size}"
            )
        return spec
    if isinstance(spec, str):
        return codebook(spec, block_size)
    raise TypeError(f"codebook must be a name or a bofrs.Codebook, got {type(spec).__name__}")
