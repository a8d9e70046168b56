"""bofrs.pack / bofrs.unpack."""

from __future__ import annotations

import torch

from . import _native
from ._codebooks import Codebook, resolve
from ._inputs import flatten_for_native
from ._packed import SCALE_DTYPES, PackedTensor, scales_from_native
from ._validate import check_block_size, check_choice


def pack(
    tensor: object,
    codebook: str | Codebook = "nf4",
    block_size: int = 64,
    *,
    scale_dtype: str = "bfloat16",
    isa: str | None = None,
) -> PackedTensor:
    """Quantizes a float tensor to 4-bit codes in blocks of ``block_size`` consecutive values.

    ``tensor``: a torch tensor (float32, bfloat16, float16, float64; any shape, contiguous or
    not, any device) or a numpy float array. ``codebook``: a name from
    :func:`bofrs.available_codebooks` or a :class:`bofrs.Codebook`. ``scale_dtype``: storage of
    the block scales, ``"bfloat16"`` (default, 4.25 bits per weight at block size 64),
    ``"float16"`` or ``"float32"``; scales are rounded before encoding. ``isa`` forces a kernel
    variant (``"portable"``, ``"avx2"``, ``"avx512"``; default: the best this CPU has) — all
    give identical results.

    Each block is normalized by its absmax (or signed absmax, per the codebook) and every value
    gets the code of the nearest level; a value exactly between two levels takes the lower one.
    Raises ValueError naming the first flat index of a NaN or infinity.
    """
    block_size = check_block_size(block_size)
    check_choice(scale_dtype, tuple(SCALE_DTYPES), "scale_dtype")
    book = resolve(codebook, block_size)
    if book.bits != 4:
        raise ValueError(
            f"codebook: pack stores 4-bit codes, {book.name!r} has {book.bits}-bit levels"
        )
    flat = flatten_for_native(tensor)
    codes, scales = _native.pack(
        flat.data,
        flat.element,
        book.levels,
        block_size,
        book.normalization,
        scale_dtype,
        isa,
    )
    packed = PackedTensor(
        torch.from_numpy(codes),
        scales_from_native(scales, scale_dtype),
        flat.shape,
        flat.dtype,
        block_size,
        book,
    )
    return packed.to(flat.device)


def unpack(packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same as ``packed.dequantize(dtype)``."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"packed must be a bofrs.PackedTensor, got {type(packed).__name__}")
    return packed.dequantize(dtype)
