"""PackedTensor: 4-bit codes, per-block scales, and what is needed to decode them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from bofrs import _cuda, _native
from bofrs._cuda import _blockwise as _cuda_blockwise
from bofrs._dtypes import (
    NATIVE_FLOATS,
    SCALE_DTYPES,
    dtype_name,
    from_native,
    to_native,
)
from bofrs._validate import check_block_size
from bofrs.formats.blockwise import stored
from bofrs.formats.blockwise.codebooks import Codebook
from bofrs.formats.blockwise.outliers import Outliers
from bofrs.formats.hadamard import check_group_size, hadamard
from bofrs.formats.tensor import QuantizedTensor

if TYPE_CHECKING:
    from bofrs.formats.format import BlockwiseFormat

#: Double-quantized scales: one byte per block, ``[lo, step]`` (float32) per group of this many.
DQ8 = "dq8"
DQ_GROUP = 256
#: Every ``scale_dtype`` accepted by :func:`bofrs.pack`.
SCALE_FORMATS = (*SCALE_DTYPES, DQ8)


class PackedTensor(QuantizedTensor):
    """A tensor quantized to 4-bit codes in blocks.

    Layout: the tensor is flattened row-major and cut into blocks of ``block_size`` consecutive
    values (the last may be partial). ``codes`` is a flat uint8 tensor of ``ceil(numel / 2)``
    bytes: value ``2j`` in the high nibble of byte ``j``, value ``2j + 1`` in its low nibble (an
    odd count leaves the last low nibble 0). ``scales`` holds one scale per block. Value ``i``
    decodes to ``codebook.levels[code_i] * decoded_scales()[i // block_size]``, except the
    OPQ outliers (:attr:`outliers`), which decode to their stored values.

    With double-quantized scales (:attr:`scale_format` ``"dq8"``), ``scales`` is one uint8 per
    block and ``scale_scales`` a float32 ``(ceil(blocks / 256), 2)`` tensor of ``[lo, step]``
    per group of 256 scales (see the README for the code).
    """

    __slots__ = (
        "_codes",
        "_scales",
        "_shape",
        "_dtype",
        "_block_size",
        "_codebook",
        "_scale_scales",
        "_outliers",
        "_rotation",
        "_cuda_cache",
        "_fused_cache",
    )
    kind: ClassVar[str] = stored.KIND

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        block_size: int,
        codebook: Codebook,
        *,
        scale_scales: torch.Tensor | None = None,
        outliers: Outliers | None = None,
        rotation: int | None = None,
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
        dq = scales.dtype == torch.uint8
        if (not dq and scales.dtype not in SCALE_DTYPES.values()) or scales.shape != (blocks,):
            raise ValueError(
                f"scales must be a 1-D float (or uint8, double-quantized) tensor of {blocks} "
                f"values, got {scales.dtype} of shape {tuple(scales.shape)}"
            )
        if dq:
            groups = -(-blocks // DQ_GROUP)
            if (
                not isinstance(scale_scales, torch.Tensor)
                or scale_scales.dtype != torch.float32
                or scale_scales.shape != (groups, 2)
            ):
                raise ValueError(
                    f"double-quantized scales need scale_scales: a float32 tensor of shape "
                    f"({groups}, 2)"
                )
            if scale_scales.device != scales.device:
                raise ValueError("scales and scale_scales must be on the same device")
        elif scale_scales is not None:
            raise ValueError("scale_scales is only used with double-quantized (uint8) scales")
        if codes.device != scales.device:
            raise ValueError("codes and scales must be on the same device")
        if outliers is not None:
            if not isinstance(outliers, Outliers):
                raise TypeError("outliers must be a bofrs.Outliers or None")
            if outliers.indices.device != codes.device:
                raise ValueError("outliers must be on the same device as the codes")
        if rotation is not None:
            rotation = check_group_size(rotation)
            if len(shape) == 0 or shape[-1] % rotation:
                raise ValueError(
                    f"rotation group {rotation} does not divide the last dimension of {tuple(shape)}"
                )
        self._rotation = rotation
        self._scale_scales = scale_scales
        self._outliers = outliers
        self._codes = codes
        self._scales = scales
        self._shape = shape
        self._dtype = dtype
        self._block_size = block_size
        self._codebook = codebook
        self._cuda_cache: tuple[tuple[int, ...], _cuda_blockwise.BlockOperands] | None = None
        #: The fused CPU kernel's operands and the part versions they were built from (see
        #: :func:`bofrs.formats.blockwise.matmul.operands`).
        self._fused_cache: tuple[tuple[int, ...], Any] | None = None

    @property
    def rotation(self) -> int | None:
        """Group size of the Hadamard rotation the codes were taken in (``None``: no rotation).

        With a rotation the codes encode ``hadamard(W, rotation)``, the rows rotated per group
        of ``rotation`` values; :meth:`dequantize` rotates back (the transform is its own
        inverse) and :meth:`dequantize_rotated` returns the rotated weight, for kernels that
        rotate activations instead (``W x == W_rot hadamard(x)``).
        """
        return self._rotation

    @property
    def block_size(self) -> int:
        """Values per block."""
        return self._block_size

    @property
    def codebook(self) -> Codebook:
        """The codebook the codes index."""
        return self._codebook

    @property
    def scale_dtype(self) -> torch.dtype:
        """Storage dtype of :attr:`scales` (``torch.uint8`` for double-quantized scales)."""
        return self._scales.dtype

    @property
    def scale_format(self) -> str:
        """How scales are stored: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"dq8"``."""
        return DQ8 if self._scales.dtype == torch.uint8 else dtype_name(self._scales.dtype)

    @property
    def scale_scales(self) -> torch.Tensor | None:
        """dq8 only: float32 ``[lo, step]`` per group of 256 scales (else None)."""
        return self._scale_scales

    @property
    def outliers(self) -> Outliers | None:
        """The OPQ outliers (None when packed without OPQ)."""
        return self._outliers

    @property
    def outlier_count(self) -> int:
        """Number of OPQ outliers (0 without OPQ)."""
        return 0 if self._outliers is None else self._outliers.count

    @property
    def format(self) -> BlockwiseFormat:
        """The :class:`bofrs.Format` of this tensor (its codebook object, rotation group)."""
        from bofrs.formats.format import BlockwiseFormat

        outliers = self._outliers
        return BlockwiseFormat(
            self._codebook, self._block_size, self.scale_format,
            None if outliers is None else outliers.q,
            "bfloat16" if outliers is None else dtype_name(outliers.dtype), self._rotation,
        )  # fmt: skip

    def parts(self) -> dict[str, torch.Tensor]:
        return stored.parts(self)

    def manifest(self) -> dict[str, Any]:
        return stored.manifest(self)

    @classmethod
    def stored_parts(cls, entry: Mapping[str, Any]) -> tuple[str, ...]:
        return stored.stored_parts(entry)

    @classmethod
    def format_version(cls, entry: Mapping[str, Any]) -> int:
        return stored.format_version(entry)

    @classmethod
    def from_stored(cls, name: str, entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> PackedTensor:
        return stored.from_stored(name, entry, parts)

    def decoded_scales(self) -> torch.Tensor:
        """The float32 scale of every block, as the decoder uses it, on :attr:`device`."""
        if self._scale_scales is None:
            return self._scales.float()
        signed = self._codebook.normalization == "signed_absmax"
        if self.device.type == "cpu":
            raw = _native.decode_scales(
                self._scales.contiguous().numpy(),
                self._scale_scales.contiguous().reshape(-1).numpy(),
                signed,
            )
            return torch.from_numpy(raw)
        return _dq_scales_torch(self._scales, self._scale_scales, signed)

    @property
    def nbytes(self) -> int:
        """Exact storage in bytes: codes + scales + scale groups (dq8) + outlier indices and
        values. No fixed header is counted (shape, codebook, dtypes: file metadata)."""
        total = self._codes.numel() + self._scales.numel() * self._scales.element_size()
        if self._scale_scales is not None:
            total += self._scale_scales.numel() * self._scale_scales.element_size()
        if self._outliers is not None:
            total += self._outliers.nbytes
        return total

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per original value (``8 * nbytes / numel``; for an empty tensor the
        nominal rate of codes and scales)."""
        if self.numel == 0:
            rate = 4.0 + 8.0 * self._scales.element_size() / self._block_size
            if self._scale_scales is not None:
                rate += 64.0 / (DQ_GROUP * self._block_size)
            return rate
        return 8.0 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded tensor, in ``dtype`` (default: the original dtype), on :attr:`device`."""
        dtype = self._dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a torch float dtype, got {dtype!r}")
        if self._rotation is None:
            return self._decode(dtype).reshape(self._shape)
        rotated = self._decode(torch.float32).reshape(self._shape)
        return hadamard(rotated, self._rotation).to(dtype)

    def dequantize_rotated(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded tensor without undoing the rotation (see :attr:`rotation`)."""
        dtype = self._dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a torch float dtype, got {dtype!r}")
        return self._decode(dtype).reshape(self._shape)

    def _decode(self, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return self._dequantize_native(dtype)
        if _cuda.enabled(self.device):
            return _cuda_blockwise.dequantize(self.cuda_operands(), dtype)
        return self._dequantize_torch(dtype)

    def cuda_operands(self) -> _cuda_blockwise.BlockOperands:
        """The parts as the CUDA kernels read them, validated like the CPU decoder does (one
        synchronization), once per tensor: kept while no part is modified in place. Needs CuPy
        and a CUDA device (:class:`bofrs._cuda.CudaKernelsUnavailable` otherwise)."""
        outliers = self._outliers
        parts = [self._codes, self._scales, self._scale_scales]
        if outliers is not None:
            parts += [outliers.indices, outliers.values]
        versions = tuple(-1 if t is None else t._version for t in parts)
        cache = self._cuda_cache
        if cache is not None and cache[0] == versions:
            return cache[1]
        ops = _cuda_blockwise.operands(
            self._codes, self._scales, self._scale_scales,
            self._codebook.normalization == "signed_absmax", self._codebook.levels,
            self.numel, self._block_size,
            None if outliers is None else outliers.indices,
            None if outliers is None else outliers.values,
        )  # fmt: skip
        self._cuda_cache = (versions, ops)
        return ops

    def _dequantize_native(self, dtype: torch.dtype) -> torch.Tensor:
        """The native decoder, fed every part in its stored dtype (nothing converted first)."""
        out_dtype = dtype if dtype in NATIVE_FLOATS else torch.float32
        extra: dict[str, object] = {}
        if self._outliers is not None:
            extra = {
                "outlier_indices": self._outliers.indices.contiguous().numpy(),
                "outlier_values": to_native(self._outliers.values.contiguous()),
                "outlier_dtype": dtype_name(self._outliers.dtype),
            }
        scales = self._scales.contiguous()
        if self._scale_scales is not None:
            extra["scale_params"] = self._scale_scales.contiguous().reshape(-1).numpy()
            extra["signed"] = self._codebook.normalization == "signed_absmax"
            stored = scales.numpy()
        else:
            stored = to_native(scales)
        raw = _native.unpack(
            self._codes.contiguous().numpy(), stored, self._codebook.levels, self._block_size,
            self.numel, dtype_name(out_dtype), scale_dtype=self.scale_format,
            **extra,  # type: ignore[arg-type]
        )  # fmt: skip
        flat = from_native(raw, out_dtype)
        return flat if out_dtype == dtype else flat.to(dtype)

    def _dequantize_torch(self, dtype: torch.dtype) -> torch.Tensor:
        """Device-agnostic decoder with the same float32 arithmetic as the native one."""
        levels = torch.from_numpy(self._codebook.levels.copy()).to(self.device)
        nibbles = torch.stack((self._codes >> 4, self._codes & 15), dim=-1).reshape(-1)
        nibbles = nibbles[: self.numel].long()
        scales = self.decoded_scales().repeat_interleave(self._block_size)[: self.numel]
        values = levels[nibbles] * scales
        if self._outliers is not None and self._outliers.count:
            values[self._outliers.indices.long()] = self._outliers.values.float()
        return values.to(dtype)

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
            scale_scales=None if self._scale_scales is None else self._scale_scales.to(device),
            outliers=None if self._outliers is None else self._outliers.to(device),
            rotation=self._rotation,
        )

    def __repr__(self) -> str:
        return (
            f"PackedTensor(shape={tuple(self._shape)}, dtype={dtype_name(self._dtype)}, "
            f"codebook={self._codebook.name!r}, block_size={self._block_size}, "
            f"scale_dtype={self.scale_format}, "
            f"outliers={'off' if self._outliers is None else self._outliers.count}, "
            f"rotation={self._rotation}, "
            f"bits_per_weight={self.bits_per_weight:.4f}, device={self.device})"
        )


def scales_from_native(scales: np.ndarray, scale_dtype: str) -> torch.Tensor:
    """Native scales as a tensor of the storage dtype: uint16 bits of bfloat16 / float16 scales
    are viewed (no copy, and no torch kernel whose worker threads would then compete with the
    next native call), float32 scales are rounded to ``scale_dtype`` (exact: already rounded)."""
    if scales.dtype == np.uint16:
        return from_native(scales, SCALE_DTYPES[scale_dtype])
    return torch.from_numpy(scales).to(SCALE_DTYPES[scale_dtype])


def _dq_scales_torch(codes: torch.Tensor, params: torch.Tensor, signed: bool) -> torch.Tensor:
    """dq8 decoding with torch ops, the same float32 arithmetic as the native one (multiply,
    then add: no fused multiply-add)."""
    magnitude_code = (codes & 0x7F) if signed else codes
    c = magnitude_code.float()
    blocks = codes.numel()
    lo = params[:, 0].repeat_interleave(DQ_GROUP)[:blocks]
    step = params[:, 1].repeat_interleave(DQ_GROUP)[:blocks]
    magnitude = torch.where(c == 0, torch.zeros_like(c), lo + (c - 1.0) * step)
    if signed:
        magnitude = torch.where((codes & 0x80) != 0, -magnitude, magnitude)
    return magnitude
