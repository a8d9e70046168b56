"""bofrs.pack / dequantize against the independent reference model, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bofrs
import reference
from checks import (
    BLOCK_SIZES,
    DTYPES,
    SCALE_DTYPES,
    assert_matches_reference,
    assert_same_bits,
    weights,
)

CODEBOOKS = bofrs.available_codebooks()
F32 = np.float32


def signed(name: str = "nf4") -> bofrs.Codebook:
    """A built-in table with signed-absmax normalization (no built-in uses it)."""
    return bofrs.Codebook(f"signed_{name}", bofrs.codebook(name).levels, "signed_absmax")


def book_named(name: str, block_size: int) -> bofrs.Codebook:
    """``"signed_<builtin>"`` or a built-in name."""
    if name.startswith("signed_"):
        return signed(name.removeprefix("signed_"))
    return bofrs.codebook(name, block_size)


# --- every codebook, block size, input dtype and scale dtype --------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_builtin_codebooks_match_reference(codebook: str, block_size: int, dtype: torch.dtype) -> None:
    x = weights(3 * block_size + 17, dtype, seed=block_size)
    assert_matches_reference(x, codebook, block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_every_scale_dtype_matches_reference(codebook: str, scale_dtype: str, dtype: torch.dtype) -> None:
    assert_matches_reference(weights((40, 50), dtype, seed=7), codebook, 64, scale_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_every_isa_matches_reference(isa: str, scale_dtype: str, dtype: torch.dtype) -> None:
    x = weights((33, 129), dtype, seed=3)
    assert_matches_reference(x, "af4", 128, scale_dtype, isa=isa)
    assert_matches_reference(x, signed("fp4"), 32, scale_dtype, isa=isa)


@pytest.mark.parametrize("block_size", [16, 32, 64, 4096])
@pytest.mark.parametrize("n", [1, 2, 17, 31, 33, 63, 65, 95, 4096 + 63, 1_000_003])
def test_sizes_and_partial_last_blocks(isa: str, n: int, block_size: int) -> None:
    assert_matches_reference(weights(n, seed=n), "nf4", block_size, isa=isa, dtypes=())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_signed_absmax_codebook_matches_reference(isa: str, dtype: torch.dtype) -> None:
    x = weights((7, 300), dtype, seed=11)
    for name in CODEBOOKS:
        assert_matches_reference(x, signed(name), 64, isa=isa)


# --- the native decoder of every ISA ---------------------------------------------------------


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 15, 17, 63, 64, 1000, 1_000_003])
def test_native_unpack_matches_reference(isa: str, out_dtype: str, n: int) -> None:
    block_size = 64
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8)
    if n % 2:
        codes[-1] &= 0xF0
    blocks = -(-n // block_size)
    # Scales of both signs over a huge range: subnormal products, float16 overflow, zeros.
    scales = (rng.standard_normal(blocks) * 10.0 ** rng.uniform(-40, 37, blocks)).astype(F32)
    scales[::5] = 0.0
    levels = bofrs.codebook("nf4").levels
    raw = bofrs._native.unpack(codes, scales, levels, block_size, n, out_dtype, isa=isa)
    dtype = getattr(torch, out_dtype)
    got = torch.from_numpy(raw).view(dtype)
    values = reference.decode(codes, scales, levels, block_size, n)
    assert_same_bits(got, reference.decode_as(values, dtype, (n,)), f"unpack {out_dtype}")


# --- input layouts ----------------------------------------------------------------------------

LAYOUTS = {
    "transposed": lambda dt: weights((96, 70), dt, seed=1).t(),
    "column_slice": lambda dt: weights((50, 200), dt, seed=2)[:, 3::3],
    "row_slice": lambda dt: weights((90, 33), dt, seed=3)[1::2],
    "expanded": lambda dt: weights((1, 70), dt, seed=4).expand(5, 70),
    "permuted_3d": lambda dt: weights((5, 6, 7), dt, seed=5).permute(2, 0, 1),
    "flipped": lambda dt: weights(301, dt, seed=6).flip(0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_tensors(layout: str, dtype: torch.dtype) -> None:
    x = LAYOUTS[layout](dtype)
    packed = assert_matches_reference(x, "nf4", 16)
    contiguous = bofrs.pack(x.contiguous(), "nf4", 16)
    assert torch.equal(packed.codes, contiguous.codes)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, np.float64])
def test_numpy_inputs(np_dtype: type) -> None:
    base = weights((60, 41), torch.float64, seed=8).numpy().astype(np_dtype)
    for array in (base, base.T, base[::-1, ::2], np.asfortranarray(base)):
        packed = assert_matches_reference(array, "af4", 32)
        assert isinstance(packed.dequantize(), torch.Tensor)


def test_float64_inputs_round_to_float32_first() -> None:
    # Values that differ only below float32 precision must pack like their float32 rounding.
    x = weights(4096, torch.float64, seed=9)
    wiggled = x + x.abs() * 1e-12
    a, b = bofrs.pack(wiggled, "nf4", 64), bofrs.pack(wiggled.float(), "nf4", 64)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert a.dequantize().dtype == torch.float64
    assert_matches_reference(wiggled, "nf4", 64)


# --- adversarial values -----------------------------------------------------------------------


def _threshold_block(book: bofrs.Codebook, scale: float, sign: float) -> np.ndarray:
    """A 64-value block with first value ``sign * scale`` (its largest magnitude, so the block
    scale), values 1..15 that normalize exactly to the thresholds t_0..t_14, and their float32
    neighbours above (16..30) and below (31..45)."""
    t = reference.thresholds(book.levels)
    block = np.zeros(64, dtype=F32)
    block[0] = sign * scale
    block[1:16] = sign * t * F32(scale)
    block[16:31] = np.nextafter(block[1:16], F32(np.inf))
    block[31:46] = np.nextafter(block[1:16], F32(-np.inf))
    assert np.array_equal(block[1:16] / block[0], t), "construction: y == t_k exactly"
    return block


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 2.0**-10, 256.0])
@pytest.mark.parametrize("codebook", [*CODEBOOKS, "signed_nf4", "signed_fp4"])
def test_values_on_thresholds_take_the_lower_level(
    isa: str, codebook: str, scale: float, scale_dtype: str
) -> None:
    book = book_named(codebook, 64)
    sign = -1.0 if book.normalization == "signed_absmax" else 1.0
    block = _threshold_block(book, scale, sign)
    x = torch.from_numpy(np.concatenate([block, -block]))
    packed = assert_matches_reference(x, book, 64, scale_dtype, isa=isa)
    codes = reference.unpack_codes(packed.codes.numpy(), x.numel())
    assert np.array_equal(codes[1:16], np.arange(15)), "y == t_k must give code k"


@pytest.mark.parametrize("codebook", [*CODEBOOKS, "signed_nf4"])
def test_signed_zeros_and_all_zero_blocks(isa: str, codebook: str) -> None:
    book = book_named(codebook, 16)
    blocks = [
        np.zeros(16, F32),
        np.full(16, -0.0, F32),
        np.array([-0.0, 0.0] * 8, F32),
        np.array([0.0, -0.0, 1.5, -0.0] * 4, F32),
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.from_numpy(np.concatenate(blocks)).to(dtype)
        packed = assert_matches_reference(x, book, 16, isa=isa)
        decoded = packed.dequantize(torch.float32)
        assert not bool(decoded.isnan().any())
        assert bool((decoded[:48] == 0).all()), "all-zero blocks decode to zeros"


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_subnormal_values(isa: str, scale_dtype: str) -> None:
    tiny = np.finfo(F32).smallest_subnormal
    normal = np.finfo(F32).tiny
    f32_blocks = np.concatenate([
        tiny * np.arange(-8, 8, dtype=F32),               # max is 8 subnormal steps
        normal * np.linspace(-1, 1, 16, dtype=F32),        # subnormals up to the smallest normal
        np.array([1.0] + [tiny] * 15, F32),                # a subnormal beside a normal maximum
    ])
    assert_matches_reference(torch.from_numpy(f32_blocks), "nf4", 16, scale_dtype, isa=isa)
    assert_matches_reference(torch.from_numpy(f32_blocks), signed("af4"), 16, scale_dtype, isa=isa)
    bf16 = torch.tensor(np.arange(1, 65, dtype=np.int16), dtype=torch.int16).view(torch.bfloat16)
    assert_matches_reference(bf16, "nf4", 16, scale_dtype, isa=isa)
    signs = np.where(np.arange(64) % 2, -1, 1).astype(np.float16)
    f16 = torch.from_numpy((np.arange(64, dtype=np.uint16) * 17).view(np.float16) * signs)
    assert_matches_reference(f16, "nf4", 16, scale_dtype, isa=isa)


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("big", [1e38, 3e38, float(np.finfo(F32).max)])
def test_huge_values(isa: str, big: float, scale_dtype: str) -> None:
    x = torch.from_numpy(np.float32(big) * np.linspace(-1, 1, 200, dtype=F32))
    try:
        reference.round_scales(np.array([big], F32), scale_dtype)
    except ValueError:
        with pytest.raises(ValueError, match="scale"):
            bofrs.pack(x, "nf4", 64, scale_dtype=scale_dtype, isa=isa)
    else:
        packed = assert_matches_reference(x, "nf4", 64, scale_dtype, isa=isa)
        assert bool(packed.dequantize().isfinite().all())


def test_bfloat16_scale_overflow_at_float32_max() -> None:
    x = torch.full((64,), float(np.finfo(F32).max))
    assert bofrs.pack(x, "nf4", 64, scale_dtype="float32").scales[0] == x[0]
    with pytest.raises(ValueError, match="scale"):
        bofrs.pack(x, "nf4", 64, scale_dtype="bfloat16")


@pytest.mark.parametrize(
    "block", [[0.5, -3.0, 1.0, 3.0], [3.0, -3.0, 0.0, 1.0], [-0.0, 0.0, -2.0, 2.0], [0.0, -0.0, 0.0, 0.0]]
)
def test_signed_absmax_takes_the_first_largest_magnitude(isa: str, block: list[float]) -> None:
    x = torch.tensor(block * 4 + [1.0] * 16)
    packed = assert_matches_reference(x, signed("nf4"), 16, "float32", isa=isa)
    first = int(np.argmax(np.abs(block)))
    assert_same_bits(packed.scales[:1], x[first:first + 1], "scale of the first block")
    if block[first] != 0:
        assert reference.unpack_codes(packed.codes.numpy(), 16)[first] == 15, "maps to +1"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_one_element(isa: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    for value in (-2.5, 0.0, 1e-3):
        x = torch.full(shape, value, dtype=dtype)
        packed = assert_matches_reference(x, "nf4", 64, isa=isa)
        assert packed.codes.numel() == 1 and packed.scales.numel() == 1
        assert int(packed.codes[0]) & 15 == 0, "padding nibble"
        stored = reference.round_scales(x.reshape(1).float().numpy(), "bfloat16")[0]
        lone = bofrs.pack(x, signed("int4"), 64).dequantize(torch.float32).item()
        assert lone == stored, "signed absmax maps a lone value to +1"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)])
def test_empty_tensors(isa: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.empty(shape, dtype=dtype)
    packed = bofrs.pack(x, "af4", 64, isa=isa)
    assert packed.shape == shape and packed.dtype == dtype and packed.numel == 0
    assert packed.codes.shape == (0,) and packed.scales.shape == (0,)
    for out in (None, torch.float32, torch.bfloat16):
        decoded = bofrs.unpack(packed, out)
        assert decoded.shape == shape and decoded.dtype == (out or dtype)
    empty_np = np.empty(shape, np.float32)
    assert bofrs.pack(empty_np).dequantize().shape == shape
    raw = bofrs._native.unpack(
        np.empty(0, np.uint8), np.empty(0, F32), bofrs.codebook("nf4").levels, 64, 0, "float16", isa=isa
    )
    assert raw.shape == (0,)


@pytest.mark.parametrize("normalization", ["absmax", "signed_absmax"])
def test_float16_extremes_never_decode_to_inf(normalization: str) -> None:
    """bf16 scales would round 65504 up to 65536 (inf in float16): the scale steps down."""
    x = torch.tensor([65504.0, -1.0, 3.0, 0.5] * 16, dtype=torch.float16)
    x[5] = -65504.0
    levels = bofrs.codebook("nf4").levels
    book = bofrs.Codebook("nf4s", levels, normalization)
    packed = bofrs.pack(x, book, 64)
    expected = reference.encode(x, levels, 64, normalization, "bfloat16")
    assert np.array_equal(packed.codes.numpy(), expected.codes)
    assert abs(float(packed.scales[0])) == 65280.0
    assert torch.isfinite(packed.dequantize()).all()
