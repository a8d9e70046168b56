"""Built-in codebook tables against published values, the Codebook class, quantization_error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bofrs
import reference
from checks import BLOCK_SIZES, weights

F32 = np.float32

#: bitsandbytes' NF4 table (``bitsandbytes.functional.get_4bit_type("nf4")``).
NF4_BITSANDBYTES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
#: bitsandbytes' FP4 table (``get_4bit_type("fp4")`` before normalization by its maximum, 12).
FP4_BITSANDBYTES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
#: AF4 at block size 64 as published by Yoshida (2023), "NF4 isn't information theoretically optimal".
AF4_64_PUBLISHED = [
    -1.0, -0.69441008, -0.51243739, -0.3736951, -0.25607552, -0.14982478, -0.04934812, 0.0,
    0.04273164, 0.12934483, 0.21961274, 0.31675666, 0.42563882, 0.55496234, 0.72424863, 1.0,
]  # fmt: skip
#: MSE of NF4 at block size 64 (float32 scales) on standard normal data.
NF4_GAUSSIAN_MSE_BLOCK_64 = 8.46e-3


def test_available_codebooks() -> None:
    assert set(bofrs.available_codebooks()) == {
        "nf4", "af4", "fp4", "int4", "bof4", "bof4-mae", "bof4s", "bof4s-mae"
    }
    for name in bofrs.available_codebooks():
        book = bofrs.codebook(name)
        signed = name.startswith("bof4s")
        assert book.name == name
        assert book.normalization == ("signed_absmax" if signed else "absmax")


def test_nf4_levels_equal_bitsandbytes_table() -> None:
    np.testing.assert_array_equal(bofrs.codebook("nf4").levels, np.array(NF4_BITSANDBYTES, F32))


def test_fp4_levels_are_bitsandbytes_fp4_normalized() -> None:
    expected = np.sort(np.array(FP4_BITSANDBYTES, F32) / F32(12.0))
    np.testing.assert_array_equal(bofrs.codebook("fp4").levels, expected)


def test_int4_levels_are_evenly_spaced() -> None:
    expected = np.arange(-15, 16, 2, dtype=F32) / F32(15)
    np.testing.assert_array_equal(bofrs.codebook("int4").levels, expected)


def test_af4_block_64_equals_published_levels() -> None:
    levels = bofrs.codebook("af4", 64).levels
    np.testing.assert_allclose(levels, AF4_64_PUBLISHED, rtol=0, atol=1e-7)


def test_af4_levels_move_toward_zero_as_block_size_grows() -> None:
    tables = np.array([bofrs.codebook("af4", b).levels for b in BLOCK_SIZES], dtype=np.float64)
    for levels in tables:
        assert np.all(np.diff(levels) > 0), "strictly ascending"
        assert (levels[0], levels[7], levels[15]) == (-1.0, 0.0, 1.0), "-1, 0 and 1 pinned"
    free = np.abs(np.delete(tables, [0, 7, 15], axis=1))
    assert np.all(np.diff(free, axis=0) < 0), "every free level shrinks as the block grows"


def test_block_size_dependence() -> None:
    for name in ("nf4", "fp4", "int4"):
        small, large = bofrs.codebook(name, 16), bofrs.codebook(name, 4096)
        assert small == large and small.block_size is None
    af4 = bofrs.codebook("af4", 256)
    assert af4.block_size == 256 and af4 != bofrs.codebook("af4", 512)


def test_builtin_levels_are_read_only() -> None:
    levels = bofrs.codebook("nf4").levels
    assert levels.dtype == F32 and levels.shape == (16,)
    with pytest.raises(ValueError):
        levels[0] = 0.5
    assert bofrs.codebook("nf4").levels[0] == -1.0


@pytest.mark.parametrize("name", ["nf4", "af4", "fp4", "int4"])
def test_thresholds_are_float32_midpoints(name: str) -> None:
    book = bofrs.codebook(name, 64)
    assert book.thresholds.dtype == F32
    np.testing.assert_array_equal(book.thresholds, reference.thresholds(book.levels))


def test_custom_codebook_round_trips_through_dict() -> None:
    levels = np.linspace(-1, 1, 16) ** 3
    book = bofrs.Codebook("cubic", levels, "signed_absmax", block_size=128)
    again = bofrs.Codebook.from_dict(book.to_dict())
    assert again == book and hash(again) == hash(book)
    np.testing.assert_array_equal(again.levels, levels.astype(F32))
    assert "cubic" in repr(book) and "signed_absmax" in repr(book)
    assert book != bofrs.Codebook("cubic", levels, "absmax", block_size=128)
    assert book != bofrs.Codebook("cubic", levels, "signed_absmax")


def test_codebook_built_for_a_block_size_packs_only_that_size() -> None:
    x = weights(512)
    book = bofrs.codebook("af4", 128)
    assert bofrs.pack(x, book, 128).codebook == book
    with pytest.raises(ValueError, match="block_size"):
        bofrs.pack(x, book, 64)


# --- quantization error -----------------------------------------------------------------------


def _reference_mse(x: torch.Tensor, packed: bofrs.PackedTensor) -> float:
    enc = reference.encode(x, packed.codebook.levels, packed.block_size, "absmax", "float32")
    decoded = reference.decode(enc.codes, enc.scales, packed.codebook.levels, packed.block_size, enc.numel)
    diff = x.reshape(-1).double().numpy() - decoded.astype(np.float64)
    return float(np.mean(diff * diff))


def test_nf4_gaussian_mse_matches_published_figure() -> None:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(1 << 22, generator=gen)
    packed = bofrs.pack(x, "nf4", 64, scale_dtype="float32")
    mse = _reference_mse(x, packed)
    assert mse == pytest.approx(NF4_GAUSSIAN_MSE_BLOCK_64, rel=0.01)
    err = bofrs.quantization_error(x, packed)
    assert err["mse"] == pytest.approx(mse, rel=1e-9)
    mean_square = float(np.mean(x.double().numpy() ** 2))
    assert err["relative_mse"] == pytest.approx(mse / mean_square, rel=1e-9)


def test_quantization_error_statistics() -> None:
    x = weights((37, 91), torch.bfloat16, seed=5)
    packed = bofrs.pack(x, "af4", 32)
    decoded = packed.dequantize(torch.float32).double().numpy().reshape(-1)
    diff = x.double().numpy().reshape(-1) - decoded
    err = bofrs.quantization_error(x, packed)
    relative = float(np.sum(diff**2) / np.sum(x.double().numpy() ** 2))
    assert err["mse"] == pytest.approx(float(np.mean(diff**2)), rel=1e-12)
    assert err["mae"] == pytest.approx(float(np.mean(np.abs(diff))), rel=1e-12)
    assert err["max_abs_error"] == float(np.max(np.abs(diff)))
    assert err["relative_mse"] == pytest.approx(relative, rel=1e-12)
    assert err["sqnr_db"] == pytest.approx(-10 * math.log10(relative), rel=1e-12)
    assert err["bits_per_weight"] == packed.bits_per_weight


def test_quantization_error_is_zero_for_exactly_representable_tensors() -> None:
    levels = bofrs.codebook("nf4").levels
    x = torch.from_numpy(np.tile(levels, 8) * F32(0.25))  # every block holds -1 and 1: scale 0.25
    err = bofrs.quantization_error(x, bofrs.pack(x, "nf4", 16))
    assert err["mse"] == 0.0 and err["relative_mse"] == 0.0 and err["sqnr_db"] == math.inf
    zeros = torch.zeros(100)
    assert bofrs.quantization_error(zeros, bofrs.pack(zeros))["relative_mse"] == 0.0
