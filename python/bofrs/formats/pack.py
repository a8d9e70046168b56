"""bofrs.pack / bofrs.unpack: any :class:`bofrs.Format` from the keyword arguments users know."""

from __future__ import annotations

from typing import Literal, overload

import torch

from bofrs._validate import check_block_size, check_choice
from bofrs.formats.blockwise.codebooks import Codebook, available_codebooks
from bofrs.formats.blockwise.packed import PackedTensor
from bofrs.formats.format import BLOCKWISE_SCALES, KEPT, Format
from bofrs.formats.higgs.tensor import HiggsTensor


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
    fmt = _format_of(codebook, block_size, scale_dtype, opq, outlier_dtype, rotation, bits, p, group_size)
    return fmt.pack(tensor, isa=isa)  # type: ignore[return-value]


def _format_of(
    codebook: object, block_size: int, scale_dtype: str, opq: float | None, outlier_dtype: str,
    rotation: str | int | None, bits: int, p: int, group_size: int,
) -> Format:
    """The format :func:`pack`'s arguments name: a :class:`Format` or a spec string with options
    (``"bof4s@128+opq"``) as ``codebook`` stands alone; a codebook name or object takes the rest."""
    spec = codebook if isinstance(codebook, Format) else None
    if isinstance(codebook, str) and codebook not in available_codebooks() and codebook != "higgs":
        if "@" in codebook or "+" in codebook or codebook.startswith("higgs") or codebook in KEPT:
            spec = Format.parse(codebook)  # spec syntax: its own error names what is wrong
    if spec is not None:
        given = {
            "block_size": block_size != 64, "scale_dtype": scale_dtype != "bfloat16", "opq": opq is not None,
            "outlier_dtype": outlier_dtype != "bfloat16", "rotation": rotation is not None,
        }  # fmt: skip
        clash = [k for k, v in given.items() if v]
        if clash:
            raise ValueError(f"codebook is a whole format ({spec}); do not also pass {', '.join(clash)}")
        return spec
    if isinstance(codebook, str) and codebook == "higgs":
        return Format.from_options(
            "higgs", scale_dtype=scale_dtype, opq=opq,
            rotation=rotation, bits=bits, p=p, group_size=group_size,
        )  # fmt: skip
    check_block_size(block_size)
    check_choice(scale_dtype, BLOCKWISE_SCALES, "scale_dtype")
    return Format.from_options(
        codebook,  # type: ignore[arg-type]
        block_size, scale_dtype=scale_dtype, opq=opq, outlier_dtype=outlier_dtype, rotation=rotation,
    )  # fmt: skip


def unpack(packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same as ``packed.dequantize(dtype)``."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"packed must be a bofrs.PackedTensor, got {type(packed).__name__}")
    return packed.dequantize(dtype)
