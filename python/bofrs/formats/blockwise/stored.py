"""A :class:`PackedTensor` in a bofrs file: its manifest entry (``kind`` ``"packed"``) and parts
(``codes``, ``scales``, and when used ``scale_scales``, ``outlier_indices``, ``outlier_values``),
and the validated way back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bofrs._dtypes import SCALE_DTYPES, dtype_from_name, dtype_name
from bofrs._errors import FormatError
from bofrs._validate import check_block_size
from bofrs.formats.blockwise.codebooks import Codebook
from bofrs.formats.blockwise.outliers import (
    OUTLIER_DTYPES,
    Outliers,
    check_quantile,
    index_dtype,
)

if TYPE_CHECKING:
    from bofrs.formats.blockwise.packed import PackedTensor

KIND = "packed"


def manifest(packed: PackedTensor) -> dict[str, Any]:
    """The manifest entry of ``packed`` (without checksums)."""
    entry: dict[str, Any] = {
        "kind": KIND,
        "shape": list(packed.shape),
        "dtype": dtype_name(packed.dtype),
        "block_size": packed.block_size,
        "scale_dtype": packed.scale_format,
        "codebook": packed.codebook.to_dict(),
    }
    if packed.rotation is not None:
        entry["rotation"] = packed.rotation
    if packed.outliers is not None:
        entry["outliers"] = {
            "q": packed.outliers.q,
            "dtype": dtype_name(packed.outliers.dtype),
            "index_dtype": dtype_name(packed.outliers.indices.dtype),
            "count": packed.outliers.count,
        }
    return entry


def parts(packed: PackedTensor) -> dict[str, torch.Tensor]:
    """The stored buffers of ``packed`` by suffix."""
    out = {"codes": packed.codes, "scales": packed.scales}
    if packed.scale_scales is not None:
        out["scale_scales"] = packed.scale_scales
    if packed.outliers is not None:
        out["outlier_indices"] = packed.outliers.indices
        out["outlier_values"] = packed.outliers.values
    return out


def stored_parts(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The part suffixes an entry has stored."""
    keys: tuple[str, ...] = ("codes", "scales")
    if entry.get("scale_dtype") == "dq8":
        keys += ("scale_scales",)
    if "outliers" in entry:
        keys += ("outlier_indices", "outlier_values")
    return keys


def format_version(entry: Mapping[str, Any]) -> int:
    """2 for outliers, dq8 scales or a rotation (which version-1 readers do not know), else 1."""
    return 2 if "outliers" in entry or "rotation" in entry or entry.get("scale_dtype") == "dq8" else 1


def shape_of(name: str, entry: Mapping[str, Any]) -> list[int]:
    """The entry's shape, checked."""
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{name}: invalid shape {shape!r}")
    return shape


def from_stored(name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor]) -> PackedTensor:
    """The packed tensor of an entry, every field validated."""
    from bofrs.formats.blockwise.packed import DQ8, DQ_GROUP, PackedTensor

    shape = shape_of(name, entry)
    block_size = check_block_size(entry["block_size"])
    dtype = dtype_from_name(entry["dtype"])
    scale_dtype = entry["scale_dtype"]
    if scale_dtype not in SCALE_DTYPES and scale_dtype != DQ8:
        raise FormatError(f"{name}: invalid scale_dtype {scale_dtype!r}")
    book = entry["codebook"]
    if not isinstance(book, dict):
        raise FormatError(f"{name}: invalid codebook {book!r}")
    codebook = Codebook.from_dict(book)
    codes, scales = raw["codes"], raw["scales"]
    want = torch.uint8 if scale_dtype == DQ8 else SCALE_DTYPES[scale_dtype]
    if scales.dtype != want:
        raise FormatError(f"{name}: scales stored as {scales.dtype}, manifest says {scale_dtype}")
    if not bool(torch.isfinite(scales).all()):
        raise FormatError(f"{name}: non-finite scale")
    scale_scales = None
    if scale_dtype == DQ8:
        scale_scales = raw["scale_scales"]
        if scale_scales.dtype != torch.float32 or scale_scales.dim() != 2:
            raise FormatError(f"{name}: scale_scales must be a 2-D float32 tensor")
        if not bool((torch.isfinite(scale_scales) & (scale_scales >= 0)).all()):
            raise FormatError(f"{name}: scale_scales must be finite and non-negative")
        blocks = scales.numel()
        if scale_scales.shape != (-(-blocks // DQ_GROUP), 2):
            raise FormatError(f"{name}: scale_scales has shape {tuple(scale_scales.shape)}")
    outliers = _outliers(name, entry, raw, torch.Size(shape).numel())
    rotation = entry.get("rotation")
    if rotation is not None and (
        isinstance(rotation, bool) or not isinstance(rotation, int) or not shape
        or rotation < 16 or rotation & (rotation - 1) or shape[-1] % rotation
    ):
        raise FormatError(f"{name}: invalid rotation {rotation!r}")
    packed = PackedTensor(
        codes, scales, tuple(shape), dtype, block_size, codebook,
        scale_scales=scale_scales, outliers=outliers, rotation=rotation,
    )  # fmt: skip
    if scale_scales is not None and not bool(torch.isfinite(packed.decoded_scales()).all()):
        raise FormatError(f"{name}: double-quantized scales decode to non-finite values")
    if packed.numel % 2 and int(codes[-1]) & 15:
        raise FormatError(f"{name}: padding nibble of the last code byte is not zero")
    return packed


def _outliers(
    name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor], numel: int
) -> Outliers | None:
    """The outliers of an entry, validated (None when it has none)."""
    if "outliers" not in entry:
        return None
    info = entry["outliers"]
    if not isinstance(info, dict):
        raise FormatError(f"{name}: invalid outliers entry {info!r}")
    indices, values = raw["outlier_indices"], raw["outlier_values"]
    value_dtype = info.get("dtype")
    if value_dtype not in OUTLIER_DTYPES or values.dtype != OUTLIER_DTYPES[value_dtype]:
        raise FormatError(f"{name}: outlier values stored as {values.dtype}, manifest says {value_dtype!r}")
    expected_index = index_dtype(numel)
    if info.get("index_dtype") != dtype_name(expected_index) or indices.dtype != expected_index:
        raise FormatError(
            f"{name}: outlier indices must be {dtype_name(expected_index)} for {numel} values, "
            f"stored as {indices.dtype} (manifest: {info.get('index_dtype')!r})"
        )
    count = info.get("count")
    if indices.dim() != 1 or values.dim() != 1 or count != indices.numel() or count != values.numel():
        raise FormatError(f"{name}: outlier count does not match the manifest ({count!r})")
    flat = indices.numpy().astype("uint64")
    if flat.size and (bool((flat[1:] <= flat[:-1]).any()) or int(flat[-1]) >= numel):
        raise FormatError(f"{name}: outlier indices must be strictly ascending and below {numel}")
    if not bool(torch.isfinite(values).all()):
        raise FormatError(f"{name}: non-finite outlier value")
    try:
        q = check_quantile(info.get("q"))
    except (TypeError, ValueError) as err:
        raise FormatError(f"{name}: invalid outlier quantile: {err}") from err
    if q is None:
        raise FormatError(f"{name}: missing outlier quantile")
    return Outliers(indices, values, q)
