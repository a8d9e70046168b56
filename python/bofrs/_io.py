"""Saving and loading packed and plain tensors in the safetensors format.

A bofrs file is an ordinary safetensors file. A packed tensor ``name`` is stored as two entries,
``name.codes`` (uint8) and ``name.scales`` (bf16 / f16 / f32); plain tensors keep their name. The
header metadata holds:

- ``format``: ``"pt"`` (what safetensors tools expect),
- ``bofrs.format``: ``"bofrs.packed"`` and ``bofrs.format_version``: ``"1"``,
- ``bofrs.manifest``: JSON mapping every name to its description (kind, shape, dtype, block size,
  codebook levels and normalization, scale dtype) and the CRC-32 of each stored buffer.

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

from . import _native
from ._codebooks import Codebook
from ._errors import FormatError
from ._inputs import dtype_from_name, dtype_name
from ._packed import SCALE_DTYPES, PackedTensor
from ._validate import check_block_size

FORMAT = "bofrs.packed"
FORMAT_VERSION = 1
_RESERVED_PREFIX = "bofrs."
_CODES, _SCALES = ".codes", ".scales"

PathLike = str | os.PathLike[str]


def _crc(tensor: torch.Tensor) -> int:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int(_native.crc32(raw))


def _text_crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def save_file(
    tensors: Mapping[str, PackedTensor | torch.Tensor],
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
                "scale_dtype": dtype_name(value.scale_dtype),
                "codebook": value.codebook.to_dict(),
            }
        elif isinstance(value, torch.Tensor):
            entries = {name: value}
            manifest[name] = {"kind": "tensor"}
        else:
            raise TypeError(
                f"tensors[{name!r}] must be a bofrs.PackedTensor or torch.Tensor, "
                f"got {type(value).__name__}"
            )
        for key, tensor in entries.items():
            if key in stored:
                raise ValueError(f"tensor name {key!r} is used twice (check names ending in "
                                 f"{_CODES!r} / {_SCALES!r})")
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
    header["bofrs.format_version"] = str(FORMAT_VERSION)
    header["bofrs.manifest"] = json.dumps(manifest, separators=(",", ":"))
    header["bofrs.manifest_crc32"] = str(_text_crc(header["bofrs.manifest"]))
    _safetensors_save(stored, os.fspath(path), metadata=header)


def load_file(path: PathLike, device: str | torch.device = "cpu") -> dict[str, PackedTensor | torch.Tensor]:
    """Reads a file written by :func:`save_file`, validating every field and checksum."""
    path = _existing(path)
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            manifest = _read_manifest(header)
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
    out: dict[str, PackedTensor | torch.Tensor] = {}
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
    if int(version) != FORMAT_VERSION:
        raise FormatError(
            f"bofrs file format version {version} is not supported by this bofrs "
            f"(reads version {FORMAT_VERSION}); upgrade or re-quantize"
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


def _rebuild(name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor]) -> PackedTensor | torch.Tensor:
    if entry["kind"] == "tensor":
        return _checked(entry, name, raw[name])
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{name}: invalid shape {shape!r}")
    block_size = check_block_size(entry["block_size"])
    dtype = dtype_from_name(entry["dtype"])
    scale_dtype = entry["scale_dtype"]
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(f"{name}: invalid scale_dtype {scale_dtype!r}")
    book = entry["codebook"]
    if not isinstance(book, dict):
        raise FormatError(f"{name}: invalid codebook {book!r}")
    codebook = Codebook.from_dict(book)
    codes = _checked(entry, name + _CODES, raw[name + _CODES])
    scales = _checked(entry, name + _SCALES, raw[name + _SCALES])
    if scales.dtype != SCALE_DTYPES[scale_dtype]:
        raise FormatError(f"{name}: scales stored as {scales.dtype}, manifest says {scale_dtype}")
    if not bool(torch.isfinite(scales).all()):
        raise FormatError(f"{name}: non-finite scale")
    packed = PackedTensor(codes, scales, tuple(shape), dtype, block_size, codebook)
    if packed.numel % 2 and int(codes[-1]) & 15:
        raise FormatError(f"{name}: padding nibble of the last code byte is not zero")
    return packed
