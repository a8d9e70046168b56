"""Block-wise encoding: a float tensor and a :class:`BlockwiseFormat` -> :class:`PackedTensor`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bofrs import _native
from bofrs._dtypes import HALF_DTYPES, INDEX_DTYPES, from_native
from bofrs._inputs import as_tensor, flatten_for_native
from bofrs.formats.blockwise.outliers import Outliers, index_dtype
from bofrs.formats.blockwise.packed import (
    DQ8,
    DQ_GROUP,
    PackedTensor,
    scales_from_native,
)
from bofrs.formats.hadamard import check_group_size, hadamard, natural_group_size

if TYPE_CHECKING:
    from bofrs.formats.format import BlockwiseFormat


def pack_blockwise(tensor: object, fmt: BlockwiseFormat, *, isa: str | None = None) -> PackedTensor:
    """``tensor`` packed in ``fmt`` (see :func:`bofrs.pack`); on the tensor's device."""
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be a str or None, got {type(isa).__name__}")
    book = fmt.resolved_codebook()
    group = rotation_group(tensor, fmt.rotation)
    flat = flatten_for_native(tensor)
    shape, dtype = flat.shape, flat.dtype
    if group is not None:
        flat = flatten_for_native(hadamard(as_tensor(tensor, "tensor").float(), group))
    q = fmt.opq
    codes, scales, scale_codes, scale_params, indices, values = _native.pack_ext(
        flat.data, flat.element, book.levels, fmt.block_size, book.normalization,
        fmt.scale_dtype, q, fmt.outlier_dtype, isa,
    )  # fmt: skip
    numel = flat.shape.numel()
    outliers = None
    if q is not None:
        outliers = Outliers(
            # Already of the index type (the native call picks the same); no copy then.
            torch.from_numpy(indices.astype(INDEX_DTYPES[index_dtype(numel)], copy=False)),
            from_native(values, HALF_DTYPES[fmt.outlier_dtype]),
            q,
        )
    if fmt.scale_dtype == DQ8:
        assert scale_codes is not None and scale_params is not None
        stored_scales = torch.from_numpy(scale_codes)
        scale_scales: torch.Tensor | None = torch.from_numpy(scale_params).reshape(-1, 2)
        assert scale_scales is not None and scale_scales.shape[0] == -(-stored_scales.numel() // DQ_GROUP)
    else:
        stored_scales = scales_from_native(scales, fmt.scale_dtype)
        scale_scales = None
    packed = PackedTensor(
        torch.from_numpy(codes), stored_scales, shape, dtype, fmt.block_size, book,
        scale_scales=scale_scales, outliers=outliers, rotation=group,
    )  # fmt: skip
    return packed.to(flat.device)


def rotation_group(tensor: object, rotation: str | int | None) -> int | None:
    """The Hadamard group of ``rotation`` for ``tensor``'s rows (None: no rotation)."""
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
