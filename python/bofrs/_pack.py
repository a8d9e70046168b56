"""bofrs.pack / bofrs.unpack."""

from __future__ import annotations

from typing import Literal, overload

import numpy as np
import torch

from . import _native
from ._codebooks import Codebook, resolve
from ._hadamard import check_group_size, hadamard, natural_group_size
from ._higgs import HiggsTensor, pack_higgs
from ._inputs import as_tensor, flatten_for_native
from ._outliers import OUTLIER_DTYPES, Outliers, check_quantile, index_dtype
from ._packed import DQ8, DQ_GROUP, SCALE_FORMATS, PackedTensor, scales_from_native
from ._validate import check_block_size, check_choice


@overload
def pack(  # type: ignore[overload-overlap]  # "higgs" is also a str
    tensor: object,
    codebook: Literal["higgs"],
    block_size: int = ...,
    *,
    scale_dtype: str = ...,
    bits: int = ...,
    p: int = ...,
    group_size: int = ...,
) -> HiggsTensor: ...


@overload
def pack(
    tensor: object,
    codebook: str | Codebook = ...,
    block_size: int = ...,
    *,
    scale_dtype: str = ...,
    opq: float | None = ...,
    outlier_dtype: str = ...,
    rotation: str | int | None = ...,
    isa: str | None = ...,
) -> PackedTensor: ...


def pack(
    tensor: object,
    codebook: str | Codebook = "nf4",
    block_size: int = 64,
    *,
    scale_dtype: str = "bfloat16",
    opq: float | None = None,
    outlier_dtype: str = "bfloat16",
    rotation: str | int | None = None,
    isa: str | None = None,
    bits: int = 4,
    p: int = 2,
    group_size: int = 1024,
) -> PackedTensor | HiggsTensor:
    """Quantizes a float tensor to 4-bit codes in blocks of ``block_size`` consecutive values.

    ``codebook="higgs"`` is :func:`bofrs.pack_higgs` instead (options ``bits``, ``p``,
    ``group_size``, ``scale_dtype``; ``block_size`` is not used).

    ``tensor``: a torch tensor (float32, bfloat16, float16, float64; any shape, contiguous or
    not, any device) or a numpy float array. ``codebook``: a name from
    :func:`bofrs.available_codebooks` or a :class:`bofrs.Codebook`. ``scale_dtype``: storage of
    the block scales, ``"bfloat16"`` (default, 4.25 bits per weight at block size 64),
    ``"float16"``, ``"float32"``, or ``"dq8"`` (double quantization: 8 bits per scale plus two
    float32 per group of 256 scales, 4.129 bits per weight at block size 64); scales are
    rounded (or double-quantized) before encoding. ``opq``: OPQ quantile ``q`` in (0, 1) (the
    paper uses 0.95) or None (default, off): values beyond ``sigma_b * t(I, q)`` in their
    block are outliers, zeroed before the scale is taken and stored separately as
    ``outlier_dtype`` (``"bfloat16"`` or ``"float16"``) with their flat indices; see
    :attr:`PackedTensor.outliers`. ``rotation``: ``"hadamard"`` rotates every row (last
    dimension) by the orthonormal Hadamard transform per group of the largest power of two
    dividing it (at most 1024), or of the given int group size, before quantizing: rotated
    weights are close to Gaussian, the distribution BOF4 is optimized for;
    :meth:`PackedTensor.dequantize` rotates back. ``isa`` forces a kernel
    variant (``"portable"``, ``"avx2"``; default: the best this CPU has) — all
    give identical results.

    Each block is normalized by its absmax (or signed absmax, per the codebook) and every value
    gets the code of the nearest level; a value exactly between two levels takes the lower one.
    Raises ValueError naming the first flat index of a NaN or infinity.
    """
    if isinstance(codebook, str) and codebook == "higgs":
        if opq is not None or rotation is not None:
            raise ValueError("opq and rotation do not apply to codebook='higgs' (it rotates itself)")
        return pack_higgs(tensor, bits, p, group_size, scale_dtype=scale_dtype)
    block_size = check_block_size(block_size)
    check_choice(scale_dtype, SCALE_FORMATS, "scale_dtype")
    q = check_quantile(opq)
    check_choice(outlier_dtype, tuple(OUTLIER_DTYPES), "outlier_dtype")
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be a str or None, got {type(isa).__name__}")
    book = resolve(codebook, block_size)
    if book.bits != 4:
        raise ValueError(
            f"codebook: pack stores 4-bit codes, {book.name!r} has {book.bits}-bit levels"
        )
    group = _rotation_group(tensor, rotation)
    flat = flatten_for_native(tensor)
    shape, dtype = flat.shape, flat.dtype
    if group is not None:
        flat = flatten_for_native(hadamard(as_tensor(tensor, "tensor").float(), group))
    codes, scales, scale_codes, scale_params, indices, values = _native.pack_ext(
        flat.data,
        flat.element,
        book.levels,
        block_size,
        book.normalization,
        scale_dtype,
        q,
        outlier_dtype,
        isa,
    )
    numel = flat.shape.numel()
    outliers = None
    if q is not None:
        outliers = Outliers(
            # Already of the index type (the native call picks the same); no copy then.
            torch.from_numpy(indices.astype(_NUMPY_INDEX[index_dtype(numel)], copy=False)),
            torch.from_numpy(values.view(np.int16)).view(OUTLIER_DTYPES[outlier_dtype]),
            q,
        )
    if scale_dtype == DQ8:
        assert scale_codes is not None and scale_params is not None
        stored_scales = torch.from_numpy(scale_codes)
        scale_scales: torch.Tensor | None = torch.from_numpy(scale_params).reshape(-1, 2)
        assert scale_scales is not None and scale_scales.shape[0] == -(-stored_scales.numel() // DQ_GROUP)
    else:
        stored_scales = scales_from_native(scales, scale_dtype)
        scale_scales = None
    packed = PackedTensor(
        torch.from_numpy(codes),
        stored_scales,
        shape,
        dtype,
        block_size,
        book,
        scale_scales=scale_scales,
        outliers=outliers,
        rotation=group,
    )
    return packed.to(flat.device)


def _rotation_group(tensor: object, rotation: str | int | None) -> int | None:
    if rotation is None:
        return None
    shape = as_tensor(tensor, "tensor").shape
    if len(shape) == 0:
        raise ValueError("rotation needs a tensor with at least one dimension")
    if rotation == "hadamard":
        return natural_group_size(int(shape[-1]))
    if isinstance(rotation, str):
        raise ValueError(f"rotation must be 'hadamard', a group size or None; got {rotation!r}")
    group = check_group_size(rotation)
    if shape[-1] % group:
        raise ValueError(f"rotation group {group} does not divide the last dimension ({shape[-1]})")
    return group


_NUMPY_INDEX = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}


def unpack(packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same as ``packed.dequantize(dtype)``."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"packed must be a bofrs.PackedTensor, got {type(packed).__name__}")
    return packed.dequantize(dtype)
