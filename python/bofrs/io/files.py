"""Saving and loading packed and plain tensors in the safetensors format.

A bofrs file is an ordinary safetensors file. A packed tensor ``name`` is stored as two entries,
``name.codes`` (uint8) and ``name.scales`` (bf16 / f16 / f32, or uint8 for double-quantized
scales), plus, when used, ``name.scale_scales`` (float32 ``[lo, step]`` per group of 256 dq8
scales), ``name.outlier_indices`` (uint16 / uint32 / uint64) and ``name.outlier_values`` (bf16 /
f16); a HIGGS tensor (:class:`bofrs.HiggsTensor`) as ``name.codes`` and ``name.scales`` with
its grid in the manifest; plain tensors keep their name. The header metadata holds:

- ``format``: ``"pt"`` (what safetensors tools expect),
- ``bofrs.format``: ``"bofrs.packed"`` and ``bofrs.format_version``: ``"1"``, or ``"2"`` when
  some tensor uses OPQ outliers, dq8 scales, a rotation or HIGGS (so a version-1 reader refuses such a file
  cleanly; this reader reads both, and files of version 1 written before them),
- ``bofrs.manifest``: JSON mapping every name to its description (kind, shape, dtype, block size,
  codebook levels and normalization, scale dtype; version 2 adds ``outliers``: q, value dtype,
  index dtype, count) and the CRC-32 of each stored buffer.

Loading checks the whole manifest against the stored entries and every checksum: a truncated,
tampered or foreign file raises :class:`bofrs.FormatError`.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _safetensors_save

from bofrs import _native
from bofrs.formats.blockwise.codebooks import Codebook
from bofrs._errors import FormatError
from bofrs._inputs import dtype_from_name, dtype_name
from bofrs.formats.higgs.grids import Grid
from bofrs.formats.higgs.tensor import HiggsTensor
from bofrs.formats.blockwise.outliers import OUTLIER_DTYPES, Outliers, check_quantile, index_dtype
from bofrs.formats.blockwise.packed import DQ8, DQ_GROUP, SCALE_DTYPES, PackedTensor
from bofrs._validate import check_block_size

FORMAT = "bofrs.packed"
#: The newest version written and read; files without outliers or dq8 scales are written as 1.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_RESERVED_PREFIX = "bofrs."
_CODES, _SCALES = ".codes", ".scales"
_SCALE_SCALES, _OUTLIER_INDICES, _OUTLIER_VALUES = ".scale_scales", ".outlier_indices", ".outlier_values"
_SUFFIXES = (_CODES, _SCALES, _SCALE_SCALES, _OUTLIER_INDICES, _OUTLIER_VALUES)

PathLike = str | os.PathLike[str]


def _crc(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0  # CRC-32 of no bytes (an empty tensor may have strides .view() refuses)
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int(_native.crc32(raw))


def _text_crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


Stored = PackedTensor | HiggsTensor | torch.Tensor


def save_file(
    tensors: Mapping[str, Stored],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes packed and plain tensors to a safetensors file (see the module doc for the layout).

    ``metadata``: extra str -> str header entries (keys starting with ``bofrs.`` are reserved).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to tensors, got {type(tensors).__name__}")
    stored: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict[str, Any]] = {}
    version = 1
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, got {name!r}")
        if isinstance(value, PackedTensor):
            entries = {name + _CODES: value.codes, name + _SCALES: value.scales}
            manifest[name] = {
                "kind": "packed",
                "shape": list(value.shape),
                "dtype": dtype_name(value.dtype),
                "block_size": value.block_size,
                "scale_dtype": value.scale_format,
                "codebook": value.codebook.to_dict(),
            }
            if value.scale_scales is not None:
                entries[name + _SCALE_SCALES] = value.scale_scales
                version = 2
            if value.rotation is not None:
                manifest[name]["rotation"] = value.rotation
                version = 2
            if value.outliers is not None:
                entries[name + _OUTLIER_INDICES] = value.outliers.indices
                entries[name + _OUTLIER_VALUES] = value.outliers.values
                manifest[name]["outliers"] = {
                    "q": value.outliers.q,
                    "dtype": dtype_name(value.outliers.dtype),
                    "index_dtype": dtype_name(value.outliers.indices.dtype),
                    "count": value.outliers.count,
                }
                version = 2
        elif isinstance(value, HiggsTensor):
            entries = {name + _CODES: value.codes, name + _SCALES: value.scales}
            manifest[name] = {
                "kind": "higgs",
                "shape": list(value.shape),
                "dtype": dtype_name(value.dtype),
                "group_size": value.group_size,
                "scale_dtype": dtype_name(value.scales.dtype),
                "grid": {
                    "p": value.grid.p,
                    "n": value.grid.n,
                    "mse": value.grid.mse,
                    "points": [float(v) for v in value.grid.points.ravel()],
                },
            }
            version = 2
        elif isinstance(value, torch.Tensor):
            entries = {name: value}
            manifest[name] = {"kind": "tensor"}
        else:
            raise TypeError(
                f"tensors[{name!r}] must be a bofrs.PackedTensor, bofrs.HiggsTensor or torch.Tensor, "
                f"got {type(value).__name__}"
            )
        for key, tensor in entries.items():
            if key in stored:
                raise ValueError(f"tensor name {key!r} is used twice (check names ending in "
                                 f"{' / '.join(map(repr, _SUFFIXES))})")
            stored[key] = tensor.detach().cpu().contiguous()
        manifest[name]["crc32"] = {key: _crc(stored[key]) for key in entries}
    header = {"format": "pt"}
    for key, text in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(text, str):
            raise TypeError("metadata must map str to str")
        if key.startswith(_RESERVED_PREFIX) or key == "format":
            raise ValueError(f"metadata key {key!r} is reserved")
        header[key] = text
    header["bofrs.format"] = FORMAT
    header["bofrs.format_version"] = str(version)
    header["bofrs.manifest"] = json.dumps(manifest, separators=(",", ":"))
    header["bofrs.manifest_crc32"] = str(_text_crc(header["bofrs.manifest"]))
    _safetensors_save(stored, os.fspath(path), metadata=header)


def load_file(path: PathLike, device: str | torch.device = "cpu") -> dict[str, Stored]:
    """Reads a file written by :func:`save_file`, validating every field and checksum."""
    path = _existing(path)
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            manifest = _read_manifest(header)
            version = int(header["bofrs.format_version"])
            for name, entry in manifest.items():
                if version < 2 and (
                    "outliers" in entry
                    or "rotation" in entry
                    or entry.get("scale_dtype") == DQ8
                    or entry.get("kind") == "higgs"
                ):
                    raise FormatError(
                        f"{name}: outliers / dq8 scales / rotation / HIGGS need format version 2"
                    )
            keys = set(handle.keys())
            expected = {k for name, entry in manifest.items() for k in _stored_keys(name, entry)}
            if keys != expected:
                missing, extra = sorted(expected - keys), sorted(keys - expected)
                raise FormatError(f"stored tensors do not match the manifest (missing {missing}, "
                                  f"unexpected {extra})")
            raw = {key: handle.get_tensor(key) for key in sorted(keys)}
    except FormatError:
        raise
    except Exception as err:  # safetensors raises its own error types for broken files
        raise FormatError(f"{path}: not a readable safetensors file: {err}") from err
    out: dict[str, Stored] = {}
    for name, entry in manifest.items():
        try:
            out[name] = _rebuild(name, entry, raw).to(device)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"{path}: invalid entry {name!r}: {err}") from err
    return out


def read_metadata(path: PathLike) -> dict[str, str]:
    """The user metadata of a bofrs file (without the reserved ``bofrs.`` keys)."""
    path = _existing(path)
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as err:
        raise FormatError(f"{path}: not a readable safetensors file: {err}") from err
    _read_manifest(header)
    return {k: v for k, v in header.items() if not k.startswith(_RESERVED_PREFIX) and k != "format"}


def _existing(path: PathLike) -> str:
    """``path`` as a str; FileNotFoundError (not FormatError) when nothing is there."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def _read_manifest(header: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    if header.get("bofrs.format") != FORMAT:
        raise FormatError("not a bofrs file (no 'bofrs.format' key in the safetensors header)")
    version = header.get("bofrs.format_version", "")
    if not version.isdigit():
        raise FormatError(f"invalid bofrs.format_version {version!r}")
    if int(version) not in _READABLE_VERSIONS:
        raise FormatError(
            f"bofrs file format version {version} is not supported by this bofrs "
            f"(reads versions {', '.join(map(str, _READABLE_VERSIONS))}); upgrade or re-quantize"
        )
    text = header.get("bofrs.manifest", "")
    if header.get("bofrs.manifest_crc32") != str(_text_crc(text)):
        raise FormatError("bofrs.manifest checksum mismatch (header corrupted or tampered with)")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(f"corrupt bofrs.manifest: {err}") from err
    if not isinstance(manifest, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in manifest.items()
    ):
        raise FormatError("corrupt bofrs.manifest: expected an object of objects")
    return manifest


def _stored_keys(name: str, entry: Mapping[str, Any]) -> tuple[str, ...]:
    kind = entry.get("kind")
    if kind == "packed":
        keys: tuple[str, ...] = (name + _CODES, name + _SCALES)
        if entry.get("scale_dtype") == DQ8:
            keys += (name + _SCALE_SCALES,)
        if "outliers" in entry:
            keys += (name + _OUTLIER_INDICES, name + _OUTLIER_VALUES)
        return keys
    if kind == "higgs":
        return (name + _CODES, name + _SCALES)
    if kind == "tensor":
        return (name,)
    raise FormatError(f"entry {name!r} has unknown kind {kind!r}")


def _checked(entry: Mapping[str, Any], key: str, tensor: torch.Tensor) -> torch.Tensor:
    crcs = entry["crc32"]
    if not isinstance(crcs, dict) or not isinstance(crcs.get(key), int):
        raise FormatError(f"{key}: missing checksum")
    if _crc(tensor) != crcs[key]:
        raise FormatError(f"{key}: checksum mismatch (file corrupted or tampered with)")
    return tensor


def _shape(name: str, entry: Mapping[str, Any]) -> list[int]:
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{name}: invalid shape {shape!r}")
    return shape


def _rebuild_higgs(name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor]) -> HiggsTensor:
    shape = _shape(name, entry)
    spec = entry["grid"]
    if not isinstance(spec, dict):
        raise FormatError(f"{name}: invalid grid {spec!r}")
    p, n, points = spec.get("p"), spec.get("n"), spec.get("points")
    if p not in (1, 2) or n not in (4, 8, 16, 32, 64, 256) or not isinstance(points, list) or len(points) != n * p:
        raise FormatError(f"{name}: invalid grid (p={p!r}, n={n!r})")
    grid_points = torch.tensor(points, dtype=torch.float64)
    if not bool(torch.isfinite(grid_points).all()) or (p == 1 and not bool((grid_points.diff() > 0).all())):
        raise FormatError(f"{name}: grid points must be finite (and ascending in 1-D)")
    grid = Grid(p, n, grid_points.float().numpy().reshape(n, p), float(spec.get("mse", 0.0)))
    scale_dtype = entry["scale_dtype"]
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(f"{name}: invalid scale_dtype {scale_dtype!r}")
    codes = _checked(entry, name + _CODES, raw[name + _CODES])
    scales = _checked(entry, name + _SCALES, raw[name + _SCALES])
    if scales.dtype != SCALE_DTYPES[scale_dtype]:
        raise FormatError(f"{name}: scales stored as {scales.dtype}, manifest says {scale_dtype}")
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise FormatError(f"{name}: scales must be finite and non-negative")
    group_size = entry["group_size"]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise FormatError(f"{name}: invalid group_size {group_size!r}")
    return HiggsTensor(codes, scales, torch.Size(shape), dtype_from_name(entry["dtype"]), group_size, grid)


def _rebuild(name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor]) -> Stored:
    if entry["kind"] == "tensor":
        return _checked(entry, name, raw[name])
    if entry["kind"] == "higgs":
        return _rebuild_higgs(name, entry, raw)
    shape = _shape(name, entry)
    block_size = check_block_size(entry["block_size"])
    dtype = dtype_from_name(entry["dtype"])
    scale_dtype = entry["scale_dtype"]
    if scale_dtype not in SCALE_DTYPES and scale_dtype != DQ8:
        raise FormatError(f"{name}: invalid scale_dtype {scale_dtype!r}")
    book = entry["codebook"]
    if not isinstance(book, dict):
        raise FormatError(f"{name}: invalid codebook {book!r}")
    codebook = Codebook.from_dict(book)
    codes = _checked(entry, name + _CODES, raw[name + _CODES])
    scales = _checked(entry, name + _SCALES, raw[name + _SCALES])
    want = torch.uint8 if scale_dtype == DQ8 else SCALE_DTYPES[scale_dtype]
    if scales.dtype != want:
        raise FormatError(f"{name}: scales stored as {scales.dtype}, manifest says {scale_dtype}")
    if not bool(torch.isfinite(scales).all()):
        raise FormatError(f"{name}: non-finite scale")
    scale_scales = None
    if scale_dtype == DQ8:
        scale_scales = _checked(entry, name + _SCALE_SCALES, raw[name + _SCALE_SCALES])
        if scale_scales.dtype != torch.float32 or scale_scales.dim() != 2:
            raise FormatError(f"{name}: scale_scales must be a 2-D float32 tensor")
        if not bool((torch.isfinite(scale_scales) & (scale_scales >= 0)).all()):
            raise FormatError(f"{name}: scale_scales must be finite and non-negative")
        blocks = scales.numel()
        if scale_scales.shape != (-(-blocks // DQ_GROUP), 2):
            raise FormatError(f"{name}: scale_scales has shape {tuple(scale_scales.shape)}")
    outliers = _rebuild_outliers(name, entry, raw, torch.Size(shape).numel())
    rotation = entry.get("rotation")
    if rotation is not None and (
        isinstance(rotation, bool) or not isinstance(rotation, int) or not shape
        or rotation < 16 or rotation & (rotation - 1) or shape[-1] % rotation
    ):
        raise FormatError(f"{name}: invalid rotation {rotation!r}")
    packed = PackedTensor(
        codes,
        scales,
        tuple(shape),
        dtype,
        block_size,
        codebook,
        scale_scales=scale_scales,
        outliers=outliers,
        rotation=rotation,
    )
    if scale_scales is not None and not bool(torch.isfinite(packed.decoded_scales()).all()):
        raise FormatError(f"{name}: double-quantized scales decode to non-finite values")
    if packed.numel % 2 and int(codes[-1]) & 15:
        raise FormatError(f"{name}: padding nibble of the last code byte is not zero")
    return packed


def _rebuild_outliers(
    name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor], numel: int
) -> Outliers | None:
    """The outliers of a packed entry, validated (None when the entry has none)."""
    if "outliers" not in entry:
        return None
    info = entry["outliers"]
    if not isinstance(info, dict):
        raise FormatError(f"{name}: invalid outliers entry {info!r}")
    indices = _checked(entry, name + _OUTLIER_INDICES, raw[name + _OUTLIER_INDICES])
    values = _checked(entry, name + _OUTLIER_VALUES, raw[name + _OUTLIER_VALUES])
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
