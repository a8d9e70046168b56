"""Comparisons of bofrs results with the reference model (shared by several test modules)."""

from __future__ import annotations

import numpy as np
import torch

import bofrs
import reference

NUMPY_TO_TORCH = {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ISAS = bofrs.supported_isas()
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SCALE_DTYPES = ("bfloat16", "float16", "float32")


def weights(shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian values whose magnitude changes every 37 values (so not at block boundaries),
    spanning 1e-3..1e3 and some exact zeros; within the float16 range for every dtype."""
    shape = (shape,) if isinstance(shape, int) else shape
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    magnitude = np.repeat(10.0 ** rng.uniform(-3, 3, size=n // 37 + 1), 37)[:n]
    values = rng.standard_normal(n) * magnitude
    values[rng.random(n) < 0.02] = 0.0
    return torch.from_numpy(values).to(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so that -0.0 and 0.0 differ)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    same = bits(actual) == bits(expected)
    if not bool(same.all()):
        i = int((~same).reshape(-1).nonzero()[0, 0])
        got, want = actual.reshape(-1)[i].item(), expected.reshape(-1)[i].item()
        raise AssertionError(f"{what}: first difference at flat index {i}: {got!r} != {want!r}")


def original_dtype(tensor: torch.Tensor | np.ndarray) -> torch.dtype:
    return tensor.dtype if isinstance(tensor, torch.Tensor) else NUMPY_TO_TORCH[tensor.dtype.type]


def resolve(codebook: str | bofrs.Codebook, block_size: int) -> bofrs.Codebook:
    return codebook if isinstance(codebook, bofrs.Codebook) else bofrs.codebook(codebook, block_size)


def expected_encoding(
    tensor: torch.Tensor | np.ndarray,
    codebook: str | bofrs.Codebook,
    block_size: int,
    scale_dtype: str,
) -> reference.Encoded:
    book = resolve(codebook, block_size)
    return reference.encode(tensor, book.levels, block_size, book.normalization, scale_dtype)


def assert_codes_match(packed: bofrs.PackedTensor, expected: reference.Encoded) -> None:
    assert packed.codes.dtype == torch.uint8 and packed.codes.dim() == 1
    codes = packed.codes.numpy()
    if not np.array_equal(codes, expected.codes):
        byte = int(np.flatnonzero(codes != expected.codes)[0])
        raise AssertionError(
            f"codes differ first at byte {byte} (values {2 * byte}, {2 * byte + 1}): "
            f"{codes[byte]:#04x} != {expected.codes[byte]:#04x}"
        )
    stored = torch.from_numpy(expected.scales)
    assert_same_bits(packed.scales.float(), stored, "scales")


def assert_decodes_match(
    packed: bofrs.PackedTensor, expected: reference.Encoded, dtypes: tuple[torch.dtype, ...]
) -> None:
    book = packed.codebook
    values = reference.decode(
        expected.codes, expected.scales, book.levels, packed.block_size, expected.numel
    )
    default = packed.dequantize()
    assert default.dtype == packed.dtype
    assert_same_bits(default, reference.decode_as(values, packed.dtype, packed.shape), "default")
    for dtype in dtypes:
        want = reference.decode_as(values, dtype, packed.shape)
        assert_same_bits(packed.dequantize(dtype), want, f"dequantize({dtype})")


def assert_matches_reference(
    tensor: torch.Tensor | np.ndarray,
    codebook: str | bofrs.Codebook = "nf4",
    block_size: int = 64,
    scale_dtype: str = "bfloat16",
    isa: str | None = None,
    dtypes: tuple[torch.dtype, ...] = OUTPUT_DTYPES,
) -> bofrs.PackedTensor:
    """Packs ``tensor`` and checks codes, scales, metadata and decoded values bit for bit."""
    expected = expected_encoding(tensor, codebook, block_size, scale_dtype)
    packed = bofrs.pack(tensor, codebook, block_size, scale_dtype=scale_dtype, isa=isa)
    assert packed.shape == tuple(tensor.shape)
    assert packed.dtype == original_dtype(tensor)
    assert packed.block_size == block_size
    assert packed.scale_dtype == getattr(torch, scale_dtype)
    assert_codes_match(packed, expected)
    assert_decodes_match(packed, expected, dtypes)
    return packed
