"""``QuantizedTensor``: what every packed tensor of bofrs is (:class:`bofrs.PackedTensor`,
:class:`bofrs.HiggsTensor`), and the table of them that files, checkpoints and modules use.

A new kind of packed tensor subclasses it and adds itself to :func:`tensor_kinds`; files
(:mod:`bofrs.io.files`) then store and validate it through :meth:`QuantizedTensor.parts`,
:meth:`QuantizedTensor.manifest` and :meth:`QuantizedTensor.from_stored` without knowing it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from typing_extensions import Self

    from bofrs.formats.format import Format


class QuantizedTensor(ABC):
    """A quantized tensor: its original shape and dtype, its :class:`bofrs.Format`, the stored
    parts (codes and scales at least), exact storage, and decoding."""

    __slots__ = ()

    #: The manifest ``kind`` of this tensor type in bofrs files.
    kind: ClassVar[str]

    # Every kind keeps its original shape and dtype, and its codes and scales, in these slots.
    _shape: torch.Size
    _dtype: torch.dtype
    _codes: torch.Tensor
    _scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """Shape of the original tensor."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the original tensor (the default of :meth:`dequantize`)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Where the stored parts are."""
        return self._codes.device

    @property
    def codes(self) -> torch.Tensor:
        """The packed codes (uint8, flat)."""
        return self._codes

    @property
    def scales(self) -> torch.Tensor:
        """The scales, in their storage dtype."""
        return self._scales

    @property
    @abstractmethod
    def format(self) -> Format:
        """How this tensor is quantized (a :class:`bofrs.Format`)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Exact storage in bytes of every stored part."""

    @property
    @abstractmethod
    def bits_per_weight(self) -> float:
        """Storage bits per original value."""

    @property
    def numel(self) -> int:
        """Number of values of the original tensor."""
        return self.shape.numel()

    @property
    def outlier_count(self) -> int:
        """Values kept outside the codes (OPQ outliers); 0 for formats without them."""
        return 0

    @abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded tensor, in ``dtype`` (default: the original dtype), on :attr:`device`."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Self:
        """The same tensor with its parts on ``device``."""

    @abstractmethod
    def parts(self) -> dict[str, torch.Tensor]:
        """The stored buffers by name suffix (``"codes"``, ``"scales"``, ...), as files hold them."""

    @abstractmethod
    def manifest(self) -> dict[str, Any]:
        """The file description of this tensor (``kind``, shape, dtype, its format; no checksums)."""

    @classmethod
    @abstractmethod
    def stored_parts(cls, entry: Mapping[str, Any]) -> tuple[str, ...]:
        """The part suffixes a manifest entry of this kind has stored."""

    @classmethod
    @abstractmethod
    def format_version(cls, entry: Mapping[str, Any]) -> int:
        """The oldest bofrs file format version that can hold this entry."""

    @classmethod
    @abstractmethod
    def from_stored(cls, name: str, entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> Self:
        """The tensor of a manifest entry and its (checksummed) parts, every field validated;
        :class:`bofrs.FormatError` when something does not fit."""


def tensor_kinds() -> dict[str, type[QuantizedTensor]]:
    """Every packed tensor type by its manifest kind."""
    from bofrs.formats.blockwise.packed import PackedTensor
    from bofrs.formats.higgs.tensor import HiggsTensor

    return {cls.kind: cls for cls in (PackedTensor, HiggsTensor)}
