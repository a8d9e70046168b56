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
from bofrs._errors import FormatError
from bofrs.formats.tensor import QuantizedTensor, tensor_kinds

FORMAT = "bofrs.packed"
#: The newest version written and read; files without outliers or dq8 scales are written as 1.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_RESERVED_PREFIX = "bofrs."
#: Manifest kind of plain tensors (stored under their own name).
PLAIN = "tensor"

PathLike = str | os.PathLike[str]


def _crc(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0  # CRC-32 of no bytes (an empty tensor may have strides .view() refuses)
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int(_native.crc32(raw))


def _text_crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


Stored = QuantizedTensor | torch.Tensor


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
        if isinstance(value, QuantizedTensor):
            entries = {f"{name}.{suffix}": part for suffix, part in value.parts().items()}
            manifest[name] = value.manifest()
            version = max(version, type(value).format_version(manifest[name]))
        elif isinstance(value, torch.Tensor):
            entries = {name: value}
            manifest[name] = {"kind": PLAIN}
        else:
            raise TypeError(
                f"tensors[{name!r}] must be a bofrs.PackedTensor, bofrs.HiggsTensor or torch.Tensor, "
                f"got {type(value).__name__}"
            )
        for key, tensor in entries.items():
            if key in stored:
                raise ValueError(f"tensor name {key!r} is used twice (check names ending in a part "
                                 f"suffix such as '.codes' or '.scales')")
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
            kinds = tensor_kinds()
            for name, entry in manifest.items():
                cls = kinds.get(entry.get("kind"))  # type: ignore[arg-type]
                if cls is not None and cls.format_version(entry) > version:
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
    if kind == PLAIN:
        return (name,)
    cls = tensor_kinds().get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise FormatError(f"entry {name!r} has unknown kind {kind!r}")
    return tuple(f"{name}.{suffix}" for suffix in cls.stored_parts(entry))


def _checked(entry: Mapping[str, Any], key: str, tensor: torch.Tensor) -> torch.Tensor:
    crcs = entry["crc32"]
    if not isinstance(crcs, dict) or not isinstance(crcs.get(key), int):
        raise FormatError(f"{key}: missing checksum")
    if _crc(tensor) != crcs[key]:
        raise FormatError(f"{key}: checksum mismatch (file corrupted or tampered with)")
    return tensor


def _rebuild(name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor]) -> Stored:
    if entry["kind"] == PLAIN:
        return _checked(entry, name, raw[name])
    cls = tensor_kinds()[entry["kind"]]
    parts = {
        suffix: _checked(entry, f"{name}.{suffix}", raw[f"{name}.{suffix}"])
        for suffix in cls.stored_parts(entry)
    }
    return cls.from_stored(name, entry, parts)
