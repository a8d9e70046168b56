"""save_file / load_file / read_metadata: round trips and rejection of broken files."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import bofrs
from checks import SCALE_DTYPES, assert_same_bits, weights

Manifest = dict[str, Any]


# --- the safetensors layout: 8-byte little-endian header length, JSON header, data ---------


def read_layout(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_layout(path: Path, header: dict[str, Any], data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, data = read_layout(path)
    edit(header)
    write_layout(path, header, data)


def assert_rejected(path: Path, match: str | None = None) -> None:
    """:func:`bofrs.load_file` refuses the file with a :class:`bofrs.FormatError` (whose message
    matches the regular expression ``match``, when given)."""
    with pytest.raises(bofrs.FormatError, match=match):
        bofrs.load_file(path)


def set_manifest(header: dict[str, Any], manifest: Manifest, fix_crc: bool = True) -> None:
    """Stores ``manifest``; with ``fix_crc`` also its checksum (a careful tamperer)."""
    text = json.dumps(manifest)
    header["__metadata__"]["bofrs.manifest"] = text
    if fix_crc:
        header["__metadata__"]["bofrs.manifest_crc32"] = str(zlib.crc32(text.encode()))


def edit_manifest(path: Path, edit: Callable[[Manifest], None], fix_crc: bool = True) -> None:
    def on_header(header: dict[str, Any]) -> None:
        manifest = json.loads(header["__metadata__"]["bofrs.manifest"])
        edit(manifest)
        set_manifest(header, manifest, fix_crc)

    edit_header(path, on_header)


def rewrite_entry(path: Path, key: str, change: Callable[[bytearray], None], fix_crc: bool) -> None:
    """Changes the stored bytes of ``key``; with ``fix_crc`` also updates its checksum."""
    header, data = read_layout(path)
    start, end = header[key]["data_offsets"]
    buffer = bytearray(data)
    piece = bytearray(buffer[start:end])
    change(piece)
    buffer[start:end] = piece
    if fix_crc:
        manifest = json.loads(header["__metadata__"]["bofrs.manifest"])
        name = key.rsplit(".", 1)[0] if key.endswith((".codes", ".scales")) else key
        manifest[name]["crc32"][key] = zlib.crc32(bytes(piece))
        set_manifest(header, manifest)
    write_layout(path, header, bytes(buffer))


# --- round trips --------------------------------------------------------------------------------


def sample_tensors(scale_dtype: str) -> dict[str, bofrs.PackedTensor | torch.Tensor]:
    signed = bofrs.Codebook("signed_int4", bofrs.codebook("int4").levels, "signed_absmax")
    return {
        "layer.weight": bofrs.pack(weights((33, 65), torch.bfloat16), "nf4", 64, scale_dtype=scale_dtype),
        "odd": bofrs.pack(weights(7, torch.float16, seed=1), "af4", 32, scale_dtype=scale_dtype),
        "f64": bofrs.pack(weights((3, 5, 7), torch.float64, seed=2), "fp4", 16, scale_dtype=scale_dtype),
        "signed": bofrs.pack(weights(1000, seed=3), signed, 128, scale_dtype=scale_dtype),
        "scalar": bofrs.pack(torch.tensor(2.5), "int4", 4096, scale_dtype=scale_dtype),
        "empty": bofrs.pack(torch.empty(0, 3), "nf4", 64, scale_dtype=scale_dtype),
        "bias": weights(65, torch.bfloat16, seed=4),
        "ids": torch.arange(11, dtype=torch.int64),
    }


def assert_same_packed(a: bofrs.PackedTensor, b: bofrs.PackedTensor) -> None:
    assert (a.shape, a.dtype, a.block_size, a.codebook) == (b.shape, b.dtype, b.block_size, b.codebook)
    assert torch.equal(a.codes, b.codes)
    assert_same_bits(a.scales, b.scales, "scales")
    assert_same_bits(a.dequantize(), b.dequantize(), "dequantized")


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_round_trip_is_bit_identical(tmp_path: Path, scale_dtype: str) -> None:
    tensors = sample_tensors(scale_dtype)
    path = tmp_path / "model.safetensors"
    metadata = {"model": "tiny", "note": "ünïcode", "empty": ""}
    bofrs.save_file(tensors, path, metadata=metadata)
    loaded = bofrs.load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, original in tensors.items():
        restored = loaded[name]
        if isinstance(original, bofrs.PackedTensor):
            assert isinstance(restored, bofrs.PackedTensor)
            assert_same_packed(restored, original)
        else:
            assert isinstance(restored, torch.Tensor) and restored.dtype == original.dtype
            assert torch.equal(restored, original)
    assert bofrs.read_metadata(path) == metadata


def test_file_is_an_ordinary_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    packed = bofrs.pack(weights(100), "nf4", 64)
    bofrs.save_file({"w": packed, "b": torch.ones(3)}, str(path))
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == {"w.codes", "w.scales", "b"}
    assert torch.equal(plain["w.codes"], packed.codes)
    assert torch.equal(plain["w.scales"], packed.scales)


def test_non_contiguous_plain_tensors_are_saved(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    view = weights((20, 30)).t()[::2]
    bofrs.save_file({"view": view}, path)
    assert torch.equal(bofrs.load_file(path)["view"], view)


def test_unmodified_header_rewrite_still_loads(tmp_path: Path) -> None:
    """Control for the tampering tests: the layout helpers alone do not break a file."""
    path = tmp_path / "model.safetensors"
    bofrs.save_file(sample_tensors("bfloat16"), path)
    edit_manifest(path, lambda manifest: None)
    rewrite_entry(path, "odd.codes", lambda piece: None, fix_crc=True)
    assert bofrs.load_file(path).keys() == sample_tensors("bfloat16").keys()


# --- broken files ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    bofrs.save_file(sample_tensors("bfloat16"), path, metadata={"k": "v"})
    return path


@pytest.mark.parametrize("cut", ["0", "4", "8", "mid_header", "header_end", "mid_data", "last_byte"])
def test_truncated_file(saved: Path, cut: str) -> None:
    raw = saved.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    at = {
        "0": 0, "4": 4, "8": 8, "mid_header": 8 + length // 2, "header_end": 8 + length,
        "mid_data": (8 + length + len(raw)) // 2, "last_byte": len(raw) - 1,
    }[cut]  # fmt: skip
    saved.write_bytes(raw[:at])
    assert_rejected(saved)


@pytest.mark.parametrize("key", ["layer.weight.codes", "layer.weight.scales", "odd.codes", "bias", "ids"])
@pytest.mark.parametrize("where", [0, -1])
def test_flipped_data_byte_fails_the_checksum(saved: Path, key: str, where: int) -> None:
    def flip(piece: bytearray) -> None:
        piece[where] ^= 0x10

    rewrite_entry(saved, key, flip, fix_crc=False)
    assert_rejected(saved, "checksum")


def _locate(manifest: Manifest, path: str) -> tuple[Any, Any]:
    """The container of ``entry/field/...`` (list indices as numbers) and the last key."""
    node: Any = manifest
    *parents, last = path.split("/")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(last) if isinstance(node, list) else last


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """A manifest edit that sets ``entry/field/...`` to ``value``."""
    def edit(manifest: Manifest) -> None:
        node, key = _locate(manifest, path)
        node[key] = value
    return edit


def _delete(path: str) -> Callable[[Manifest], None]:
    """A manifest edit that removes ``entry/field/...``."""
    def edit(manifest: Manifest) -> None:
        node, key = _locate(manifest, path)
        del node[key]
    return edit


def _unsorted_levels(manifest: Manifest) -> None:
    levels = manifest["layer.weight"]["codebook"]["levels"]
    levels[3], levels[4] = levels[4], levels[3]


def _extra_entry(manifest: Manifest) -> None:
    manifest["ghost"] = {"kind": "tensor", "crc32": {"ghost": 0}}


TAMPERING = {
    "wrong_shape": _set("layer.weight/shape", [33, 66]),
    "negative_shape": _set("layer.weight/shape", [-33, -65]),
    "float_shape": _set("layer.weight/shape", [33.0, 65]),
    "shape_not_a_list": _set("layer.weight/shape", "33x65"),
    "block_size_not_power_of_two": _set("layer.weight/block_size", 48),
    "block_size_zero": _set("layer.weight/block_size", 0),
    "block_size_str": _set("layer.weight/block_size", "64"),
    "block_size_mismatch": _set("layer.weight/block_size", 32),
    "unknown_kind": _set("layer.weight/kind", "quantized"),
    "unknown_dtype": _set("layer.weight/dtype", "int32"),
    "unknown_scale_dtype": _set("layer.weight/scale_dtype", "int8"),
    "scale_dtype_mismatch": _set("layer.weight/scale_dtype", "float16"),
    "levels_unsorted": _unsorted_levels,
    "levels_out_of_range": _set("layer.weight/codebook/levels/15", 1.5),
    "fifteen_levels": _delete("layer.weight/codebook/levels/15"),
    "unknown_normalization": _set("layer.weight/codebook/normalization", "minmax"),
    "codebook_not_a_dict": _set("layer.weight/codebook", "nf4"),
    "missing_shape": _delete("layer.weight/shape"),
    "extra_tensor": _extra_entry,
    "missing_packed_tensor": _delete("layer.weight"),
    "missing_plain_tensor": _delete("bias"),
    "missing_checksums": _delete("layer.weight/crc32"),
    "missing_one_checksum": _delete("layer.weight/crc32/layer.weight.scales"),
    "missing_plain_checksum": _delete("bias/crc32"),
    "checksum_not_int": _set("odd/crc32/odd.codes", "123"),
    "wrong_checksum": _set("bias/crc32/bias", 12345),
    "entry_not_a_dict": _set("bias", ["tensor"]),
}


@pytest.mark.parametrize("tampering", TAMPERING)
def test_tampered_manifest(saved: Path, tampering: str) -> None:
    edit_manifest(saved, TAMPERING[tampering])
    assert_rejected(saved)


@pytest.mark.parametrize(
    "metadata",
    [
        {"bofrs.format_version": "3"},
        {"bofrs.format_version": "0"},
        {"bofrs.format_version": "one"},
        {"bofrs.format": "something.else"},
        {"bofrs.manifest": "{not json"},
        {"bofrs.manifest": "[1, 2]"},
    ],
    ids=["version_3", "version_0", "version_text", "foreign_format", "manifest_not_json", "manifest_list"],
)
def test_tampered_reserved_metadata(saved: Path, metadata: dict[str, str]) -> None:
    edit_header(saved, lambda header: header["__metadata__"].update(metadata))
    assert_rejected(saved)
    with pytest.raises(bofrs.FormatError):
        bofrs.read_metadata(saved)


def test_newer_format_version_is_named_in_the_error(saved: Path) -> None:
    edit_header(saved, lambda header: header["__metadata__"].update({"bofrs.format_version": "3"}))
    assert_rejected(saved, "version 3")


def test_missing_manifest_keys(saved: Path) -> None:
    edit_header(saved, lambda header: header["__metadata__"].pop("bofrs.manifest"))
    assert_rejected(saved)


def test_nonzero_padding_nibble_is_rejected(saved: Path) -> None:
    def set_pad(piece: bytearray) -> None:
        piece[-1] |= 0x01

    rewrite_entry(saved, "odd.codes", set_pad, fix_crc=True)
    assert_rejected(saved, "padding")


def test_non_finite_stored_scale_is_rejected(saved: Path) -> None:
    def to_nan(piece: bytearray) -> None:
        piece[0:2] = np.array([np.nan], np.float32).view(np.uint16)[1:].tobytes()  # bf16 NaN

    rewrite_entry(saved, "layer.weight.scales", to_nan, fix_crc=True)
    assert_rejected(saved, "non-finite")


def test_extra_stored_tensor_not_in_manifest(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    bofrs.save_file({"w": bofrs.pack(weights(64)), "b": torch.ones(2)}, path)
    edit_manifest(path, _delete("b"))
    assert_rejected(path, "unexpected")


def test_plain_safetensors_file_is_not_a_bofrs_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(4)}, str(path), metadata={"format": "pt"})
    assert_rejected(path, "not a bofrs file")
    with pytest.raises(bofrs.FormatError):
        bofrs.read_metadata(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\xff" * 100)
    assert_rejected(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bofrs.load_file(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        bofrs.read_metadata(tmp_path / "missing.safetensors")


# --- arguments of save_file -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["bofrs.format", "bofrs.manifest", "bofrs.anything", "format"])
def test_reserved_metadata_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        bofrs.save_file({"b": torch.ones(2)}, tmp_path / "x.safetensors", metadata={key: "1"})


def test_metadata_must_map_str_to_str(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        bofrs.save_file({"b": torch.ones(2)}, tmp_path / "x.safetensors", metadata={"n": 1})  # type: ignore[dict-item]


def test_invalid_tensors_arguments(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    packed = bofrs.pack(weights(64))
    with pytest.raises(TypeError):
        bofrs.save_file([("w", packed)], path)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bofrs.save_file({"": packed}, path)
    with pytest.raises(TypeError):
        bofrs.save_file({"w": np.ones(3)}, path)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="twice"):
        bofrs.save_file({"w": packed, "w.codes": torch.ones(1)}, path)
    assert not path.exists()


def test_manifest_edit_without_its_checksum_raises(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    bofrs.save_file({"w": bofrs.pack(weights((33, 64), torch.float32), "nf4", 64)}, path)

    def transpose(manifest: Manifest) -> None:
        manifest["w"]["shape"] = [64, 33]  # same element count: only the manifest CRC sees it

    edit_manifest(path, transpose, fix_crc=False)
    assert_rejected(path, "manifest checksum")
