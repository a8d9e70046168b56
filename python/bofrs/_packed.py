"""PackedTensor: 4-bit codes, per-block scales, and what is needed to decode them."""

from __future__ import annotations

import numpy as np
import torch

from . import _native
from ._codebooks import Codebook
from ._inputs import dtype_name
from ._validate import check_block_size

#: Decoder output types of the native layer (others are decoded to float32, then cast).
_NATIVE_OUTPUTS = (torch.float32, torch.bfloat16, torch.float16)
#: Scale storage types.
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PackedTensor:
    """A tensor quantized to 4-bit codes in blocks.

    Layout: the tensor is flattened row-major and cut into blocks of ``block_size`` consecutive
    values (the last may be partial). ``codes`` is a flat uint8 tensor of ``ceil(numel / 2)``
    bytes: value ``2j`` in the high nibble of byte ``j``, value ``2j + 1`` in its low nibble (an
    odd count leaves the last low nibble 0). ``scales`` holds one scale per block. Value ``i``
    decodes to ``codebook.levels[code_i] * scales[i // block_size]``.
    """

    __slots__ = ("_codes", "_scales", "_shape", "_dtype", "_block_size", "_codebook")

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        block_size: int,
        codebook: Codebook,
    ) -> None:
        check_block_size(block_size)
        if not isinstance(codebook, Codebook):
            raise TypeError("codebook must be a bofrs.Codebook")
        shape = torch.Size(shape)
        numel = shape.numel()
        if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != (numel + 1) // 2:
            raise ValueError(
                f"codes must be a 1-D uint8 tensor of {(numel + 1) // 2} bytes for shape "
                f"{tuple(shape)}, got {codes.dtype} of shape {tuple(codes.shape)}"
            )
        blocks = -(-numel // block_size)
        if scales.dtype not in SCALE_DTYPES.values() or scales.shape != (blocks,):
            raise ValueError(
                f"scales must be a 1-D float tensor of {blocks} values, got {scales.dtype} "
                f"of shape {tuple(scales.shape)}"
            )
        if codes.device != scales.device:
            raise ValueError("codes and scales must be on the same device")
        self._codes = codes
        self._scales = scales
        self._shape = shape
        self._dtype = dtype
        self._block_size = block_size
        self._codebook = codebook

    @property
    def shape(self) -> torch.Size:
        """Shape of the original tensor."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the original tensor (the default of :meth:`dequantize`)."""
        return self._dtype

    @property
    def block_size(self) -> int:
        """Values per block."""
        return self._block_size

    @property
    def codebook(self) -> Codebook:
        """The codebook the codes index."""
        return self._codebook

    @property
    def codes(self) -> torch.Tensor:
        """Packed 4-bit codes, two per byte (uint8, flat)."""
        return self._codes

    @property
    def scales(self) -> torch.Tensor:
        """One scale per block, in the storage dtype (see :attr:`scale_dtype`)."""
        return self._scales

    @property
    def scale_dtype(self) -> torch.dtype:
        """Storage dtype of the scales."""
        return self._scales.dtype

    @property
    def device(self) -> torch.device:
        """Where codes and scales live."""
        return self._codes.device

    @property
    def numel(self) -> int:
        """Number of values of the original tensor."""
        return self._shape.numel()

    @property
    def nbytes(self) -> int:
        """Exact storage in bytes: codes plus scales."""
        return self._codes.numel() + self._scales.numel() * self._scales.element_size()

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per original value (``8 * nbytes / numel``; the nominal rate if empty)."""
        if self.numel == 0:
            return 4.0 + 8.0 * self._scales.element_size() / self._block_size
        return 8.0 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded tensor, in ``dtype`` (default: the original dtype), on :attr:`device`."""
        dtype = self._dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a torch float dtype, got {dtype!r}")
        if self.device.type == "cpu":
            flat = self._dequantize_native(dtype)
        else:
            flat = self._dequantize_torch(dtype)
        return flat.reshape(self._shape)

    def _dequantize_native(self, dtype: torch.dtype) -> torch.Tensor:
        out_dtype = dtype if dtype in _NATIVE_OUTPUTS else torch.float32
        raw = _native.unpack(
            self._codes.contiguous().numpy(),
            self._scales.float().contiguous().numpy(),
            self._codebook.levels,
            self._block_size,
            self.numel,
            dtype_name(out_dtype),
        )
        flat = torch.from_numpy(raw)
        if out_dtype != torch.float32:
            flat = flat.view(torch.int16).view(out_dtype)
        return flat if out_dtype == dtype else flat.to(dtype)

    def _dequantize_torch(self, dtype: torch.dtype) -> torch.Tensor:
        """Device-agnostic decoder with the same float32 arithmetic as the native one."""
        levels = torch.from_numpy(self._codebook.levels).to(self.device)
        nibbles = torch.stack((self._codes >> 4, self._codes & 15), dim=-1).reshape(-1)
        nibbles = nibbles[: self.numel].long()
        scales = self._scales.float().repeat_interleave(self._block_size)[: self.numel]
        return (levels[nibbles] * scales).to(dtype)

    def to(self, device: torch.device | str) -> PackedTensor:
        """A copy on ``device`` (itself if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return PackedTensor(
            self._codes.to(device),
            self._scales.to(device),
            self._shape,
            self._dtype,
            self._block_size,
            self._codebook,
        )

    def __repr__(self) -> str:
        return (
            f"PackedTensor(shape={tuple(self._shape)}, dtype={dtype_name(self._dtype)}, "
            f"codebook={self._codebook.name!r}, block_size={self._block_size}, "
            f"scale_dtype={dtype_name(self.scale_dtype)}, "
            f"bits_per_weight={self.bits_per_weight:.4f}, device={self.device})"
        )


def scales_from_native(scales: np.ndarray, scale_dtype: str) -> torch.Tensor:
    """Native float32 scales (already rounded) as a tensor of the storage dtype (exact)."""
    return torch.from_numpy(scales).to(SCALE_DTYPES[scale_dtype])
