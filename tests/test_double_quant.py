"""Double-quantized ("dq8") scales: reference, zero blocks, signed scales, error cost, files."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import bofrs
import reference
import reference_opq
from checks import DTYPES, assert_same_bits
from test_io import assert_rejected, edit_header, edit_manifest, read_layout, write_layout
from test_opq import BOF4S, SIGNED_INT4, assert_matches, expected, heavy

CODEBOOKS = ("nf4", "fp4", BOF4S, SIGNED_INT4)


@pytest.mark.parametrize("codebook", CODEBOOKS, ids=lambda c: c if isinstance(c, str) else c.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64, 1024])
def test_matches_reference(codebook: str | bofrs.Codebook, dtype: torch.dtype, block_size: int, isa: str) -> None:
    # More than one group of 256 scales, a partial last group and a partial last block.
    w = heavy(block_size * 300 + 5, dtype, seed=block_size)
    want = expected(w, codebook, block_size, "dq8", None)
    packed = bofrs.pack(w, codebook, block_size, scale_dtype="dq8", isa=isa)
    assert packed.scale_format == "dq8" and packed.scale_dtype == torch.uint8
    assert packed.outliers is None
    want = want._replace(outlier_indices=np.zeros(0, np.int64), outlier_values=np.zeros(0, np.float32))
    packed_with_empty = bofrs.PackedTensor(
        packed.codes, packed.scales, packed.shape, packed.dtype, packed.block_size, packed.codebook,
        scale_scales=packed.scale_scales,
        outliers=bofrs.Outliers(torch.zeros(0, dtype=torch.uint16), torch.zeros(0, dtype=torch.bfloat16), 0.5),
    )  # fmt: skip
    out_dtype = dtype if dtype != torch.float64 else torch.float32
    assert_matches(packed_with_empty, want, (out_dtype,))
    assert_same_bits(packed.dequantize(), packed_with_empty.dequantize(), "no outliers")


def test_zero_blocks_stay_exactly_zero_and_signs_survive() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(64 * 600)
    values[64 * 3 : 64 * 4] = 0.0
    values[64 * 400 : 64 * 401] = 0.0
    values[64 * 5] = -40.0  # a negative block extreme: negative signed scale
    w = torch.from_numpy(values).float()
    for codebook in ("nf4", BOF4S):
        packed = bofrs.pack(w, codebook, 64, scale_dtype="dq8")
        scales = packed.decoded_scales()
        assert scales[3] == 0 and scales[400] == 0 and int(packed.scales[3]) & 0x7F == 0
        assert torch.equal(packed.dequantize()[64 * 3 : 64 * 4], torch.zeros(64))
        nonzero = torch.ones(600, dtype=torch.bool)
        nonzero[[3, 400]] = False
        assert (scales[nonzero] != 0).all(), "nonzero blocks never get a zero scale"
        if codebook == "nf4":
            assert (scales >= 0).all()
        else:
            assert scales[5] < 0 and int(packed.scales[5]) & 0x80
            raw = torch.from_numpy(reference.raw_scales(values.astype(np.float32), 64, "signed_absmax"))
            assert torch.equal(torch.sign(scales[nonzero]), torch.sign(raw[nonzero]))


@pytest.mark.parametrize("codebook", ["nf4", BOF4S], ids=["nf4", "bof4s"])
def test_error_cost_versus_bfloat16_scales_is_small(codebook: str | bofrs.Codebook) -> None:
    """dq8 costs < 1% MSE (absmax) / < 2% (signed: 7-bit magnitudes) over bf16 scales on
    Gaussian weights, for 0.121 fewer bits per weight."""
    w = torch.randn(1 << 20, generator=torch.Generator().manual_seed(3))
    bf16 = bofrs.quantization_error(w, bofrs.pack(w, codebook, 64))
    dq8 = bofrs.quantization_error(w, bofrs.pack(w, codebook, 64, scale_dtype="dq8"))
    limit = 1.01 if codebook == "nf4" else 1.02
    assert dq8["mse"] < limit * bf16["mse"], (dq8["mse"], bf16["mse"])
    assert dq8["bits_per_weight"] == 4 + 8 / 64 + 64 / (256 * 64)
    assert bf16["bits_per_weight"] - dq8["bits_per_weight"] == pytest.approx(0.12109375)


def test_float16_extremes_decode_finite() -> None:
    h = torch.randn(64 * 256, dtype=torch.float16)
    h[0], h[64], h[130] = 65504.0, -65504.0, 60000.0
    for codebook in ("nf4", BOF4S):
        packed = bofrs.pack(h, codebook, 64, scale_dtype="dq8")
        assert packed.decoded_scales().abs().max() <= 65504.0
        assert torch.isfinite(packed.dequantize()).all()


def test_empty_and_tiny() -> None:
    empty = bofrs.pack(torch.empty(0), "nf4", 64, scale_dtype="dq8")
    assert empty.numel == 0 and empty.bits_per_weight == 4 + 8 / 64 + 64 / (256 * 64)
    assert empty.dequantize().numel() == 0
    one = bofrs.pack(torch.tensor([3.0]), "nf4", 64, scale_dtype="dq8")
    assert float(one.dequantize()[0]) == 3.0 and one.scale_scales is not None
    assert one.scale_scales.shape == (1, 2)


def test_packed_tensor_validates_dq8_parts() -> None:
    p = bofrs.pack(torch.randn(1000), "nf4", 64, scale_dtype="dq8")
    args = (p.codes, p.scales, p.shape, p.dtype, p.block_size, p.codebook)
    with pytest.raises(ValueError, match="scale_scales"):
        bofrs.PackedTensor(*args)
    with pytest.raises(ValueError, match="scale_scales"):
        bofrs.PackedTensor(*args, scale_scales=torch.zeros(2, 2))
    q = bofrs.pack(torch.randn(1000), "nf4", 64)
    with pytest.raises(ValueError, match="scale_scales"):
        bofrs.PackedTensor(q.codes, q.scales, q.shape, q.dtype, 64, q.codebook, scale_scales=p.scale_scales)


def test_bad_scale_dtype() -> None:
    with pytest.raises(ValueError, match="scale_dtype"):
        bofrs.pack(torch.randn(64), scale_dtype="dq4")
    with pytest.raises(TypeError, match="scale_dtype"):
        bofrs.pack(torch.randn(64), scale_dtype=8)  # type: ignore[arg-type]


# --- files ----------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "dq.safetensors"
    tensors = {
        "w": bofrs.pack(heavy(64 * 600, torch.bfloat16), BOF4S, 64, scale_dtype="dq8", opq=0.95),
        "plain": bofrs.pack(heavy(100), "nf4", 64),
    }
    bofrs.save_file(tensors, path)
    return path


def test_file_layout_and_version(saved: Path, tmp_path: Path) -> None:
    header, _ = read_layout(saved)
    assert header["__metadata__"]["bofrs.format_version"] == "2"
    plain = safetensors.torch.load_file(str(saved))
    assert set(plain) == {"w.codes", "w.scales", "w.scale_scales", "w.outlier_indices", "w.outlier_values", "plain.codes", "plain.scales"}
    assert plain["w.scales"].dtype == torch.uint8 and plain["w.outlier_indices"].dtype == torch.uint16
    # A file without the new features is still written as version 1 (readable by older bofrs).
    old = tmp_path / "v1.safetensors"
    bofrs.save_file({"p": bofrs.pack(torch.randn(100), "nf4", 64)}, old)
    assert read_layout(old)[0]["__metadata__"]["bofrs.format_version"] == "1"
    assert bofrs.load_file(old)["p"].outliers is None  # type: ignore[union-attr]


def _rewrite(path: Path, key: str, data: bytes, fix_crc: bool = True) -> None:
    """Replaces the stored bytes of ``key`` (same length), optionally fixing its checksum."""
    header, blob = read_layout(path)
    start, end = header[key]["data_offsets"]
    assert len(data) == end - start
    blob = blob[:start] + data + blob[end:]
    if fix_crc:
        manifest = json.loads(header["__metadata__"]["bofrs.manifest"])
        name = key.split(".")[0]
        manifest[name]["crc32"][key] = zlib.crc32(data)
        text = json.dumps(manifest)
        header["__metadata__"]["bofrs.manifest"] = text
        header["__metadata__"]["bofrs.manifest_crc32"] = str(zlib.crc32(text.encode()))
    write_layout(path, header, blob)


def _stored(path: Path, key: str) -> bytes:
    header, blob = read_layout(path)
    start, end = header[key]["data_offsets"]
    return blob[start:end]


@pytest.mark.parametrize("key", ["w.scales", "w.scale_scales", "w.outlier_indices", "w.outlier_values"])
def test_flipped_byte_fails_the_checksum(saved: Path, key: str) -> None:
    data = bytearray(_stored(saved, key))
    data[-1] ^= 0x04
    _rewrite(saved, key, bytes(data), fix_crc=False)
    assert_rejected(saved, "checksum")


def test_careful_tampering_is_still_caught(saved: Path) -> None:
    indices = np.frombuffer(_stored(saved, "w.outlier_indices"), dtype=np.uint16).copy()
    assert indices.size >= 2
    swapped = indices.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    _rewrite(saved, "w.outlier_indices", swapped.tobytes())
    assert_rejected(saved, "ascending")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["w"]["outliers"].update(count=1),
        lambda m: m["w"]["outliers"].update(q=1.5),
        lambda m: m["w"]["outliers"].update(dtype="float16"),
        lambda m: m["w"]["outliers"].update(index_dtype="uint32"),
        lambda m: m["w"].pop("outliers"),
        lambda m: m["w"].update(scale_dtype="bfloat16"),
        lambda m: m["plain"].update(scale_dtype="dq8"),
    ],
    ids=["count", "q", "value_dtype", "index_dtype", "no_outliers_entry", "not_dq8", "dq8_without_parts"],
)
def test_inconsistent_manifest(saved: Path, edit: Any) -> None:
    edit_manifest(saved, edit)
    assert_rejected(saved)


def test_bad_scale_params_are_rejected(saved: Path) -> None:
    params = np.frombuffer(_stored(saved, "w.scale_scales"), dtype=np.float32).copy()
    params[1] = -params[1] - 1.0
    _rewrite(saved, "w.scale_scales", params.tobytes())
    assert_rejected(saved, "scale_scales")


def test_version_1_files_cannot_carry_the_new_parts(saved: Path) -> None:
    edit_header(saved, lambda header: header["__metadata__"].update({"bofrs.format_version": "1"}))
    assert_rejected(saved, "version 2")


def test_truncated(saved: Path) -> None:
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) - 3])
    assert_rejected(saved)


# --- the decoder reads every part in its stored dtype ------------------------------------------


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32", "dq8"])
@pytest.mark.parametrize("book", ["nf4", "bof4s"])
def test_dequantize_feeds_stored_parts_to_the_native_decoder(
    monkeypatch: pytest.MonkeyPatch, scale_dtype: str, book: str
) -> None:
    """No float32 copy of the scales and no uint64 copy of the outlier indices per dequantize:
    the stored parts go to the decoder, which gives what decoding the float32 scales gives."""
    g = np.random.default_rng(int(np.random.SeedSequence().generate_state(1)[0]))
    for shape in ((37, 200), (3, 70000)):  # uint16 and uint32 outlier indices
        w = torch.from_numpy(g.standard_t(3, size=shape).astype(np.float32))
        packed = bofrs.pack(w, book, 64, scale_dtype=scale_dtype, opq=0.99)
        assert packed.outliers is not None and packed.outliers.count > 0
        decoded_scales = packed.decoded_scales().numpy()
        indices = packed.outliers.indices.numpy().astype(np.uint64)
        values = packed.outliers.values.view(torch.int16).numpy().view(np.uint16)
        reference = bofrs._native.unpack(
            packed.codes.numpy(), decoded_scales, packed.codebook.levels, 64, packed.numel, "float32",
            outlier_indices=indices, outlier_values=values,
        )  # fmt: skip
        monkeypatch.setattr(bofrs.PackedTensor, "decoded_scales", lambda self: pytest.fail("converted the scales"))
        got = packed.dequantize(torch.float32).reshape(-1).numpy()
        monkeypatch.undo()
        np.testing.assert_array_equal(got, reference)
        assert packed.outliers.indices.dtype == (torch.uint16 if w.numel() <= 1 << 16 else torch.uint32)


def test_stored_scales_must_match_their_dtype() -> None:
    codes, levels = np.zeros(64, np.uint8), bofrs.codebook("nf4").levels
    with pytest.raises(TypeError, match="scales must be a uint16"):
        bofrs._native.unpack(codes, np.ones(2, np.float32), levels, 64, 128, "float32", scale_dtype="bfloat16")
    with pytest.raises(TypeError, match="scales must be a float32"):
        bofrs._native.unpack(codes, np.ones(2, np.uint16), levels, 64, 128, "float32")
    with pytest.raises(ValueError, match="scale_params"):
        bofrs._native.unpack(codes, np.ones(2, np.uint8), levels, 64, 128, "float32", scale_dtype="dq8")
    with pytest.raises(ValueError, match="scale_scales"):
        bofrs._native.unpack(codes, np.ones(2, np.uint8), levels, 64, 128, "float32", scale_dtype="dq8",
                             scale_params=np.array([1.0, np.inf], np.float32))  # fmt: skip
    bits = np.array([0x3F80, 0x7F80], np.uint16)  # 1.0 and +inf in bfloat16
    with pytest.raises(ValueError, match="block 1"):
        bofrs._native.unpack(codes, bits, levels, 64, 128, "float32", scale_dtype="bfloat16")
    with pytest.raises(ValueError, match="ascending"):
        bofrs._native.unpack(codes, np.ones(2, np.float32), levels, 64, 128, "float32",
                             outlier_indices=np.array([5, 5], np.uint16), outlier_values=np.zeros(2, np.uint16))  # fmt: skip
