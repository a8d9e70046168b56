"""Invalid inputs and arguments raise the documented exceptions with useful messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bofrs
from checks import weights

F32 = np.float32


def index_pattern(index: int) -> str:
    """Matches ``index`` as a whole number in a message."""
    return rf"(?<!\d){index}(?!\d)"


# --- non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_non_finite_value_is_reported_at_its_flat_index(isa: str, dtype: torch.dtype, bad: float) -> None:
    x = weights((10, 30), dtype)
    x[4, 7] = bad
    with pytest.raises(ValueError, match=index_pattern(4 * 30 + 7)):
        bofrs.pack(x, "nf4", 64, isa=isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_first_of_several_bad_values_in_a_big_tensor(isa: str, dtype: torch.dtype) -> None:
    x = torch.zeros(3_000_000, dtype=dtype)
    first, later, earlier_in_block = 2_345_679, 2_900_001, 2_345_620
    x[later] = float("nan")
    x[first] = float("inf")
    x[earlier_in_block] = 1.0  # a finite maximum earlier in the same block
    with pytest.raises(ValueError, match=index_pattern(first)) as info:
        bofrs.pack(x, "af4", 256, isa=isa)
    assert str(later) not in str(info.value)


def test_non_finite_value_in_transposed_tensor_uses_row_major_index() -> None:
    x = weights((50, 40)).t()  # shape (40, 50), not contiguous
    x[3, 11] = float("nan")
    with pytest.raises(ValueError, match=index_pattern(3 * 50 + 11)):
        bofrs.pack(x, "nf4", 16)


def test_float64_beyond_float32_range() -> None:
    x = torch.zeros(1000, dtype=torch.float64)
    x[777] = 1e39
    x[900] = float("nan")
    with pytest.raises(ValueError, match=index_pattern(777)):
        bofrs.pack(x)


def test_numpy_non_finite_value() -> None:
    x = np.zeros((3, 100), F32)
    x[2, 5] = np.inf
    with pytest.raises(ValueError, match=index_pattern(205)):
        bofrs.pack(x)


# --- input types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(64, dtype=torch.int32),
        torch.arange(64, dtype=torch.int64),
        torch.arange(64, dtype=torch.uint8),
        torch.ones(64, dtype=torch.bool),
        torch.ones(64, dtype=torch.complex64),
        torch.ones(64, dtype=torch.float8_e4m3fn),
        np.arange(64, dtype=np.int16),
        np.ones(64, dtype=bool),
        np.ones(64, dtype=np.complex128),
        np.array([1.0, "a"], dtype=object),
        [1.0, 2.0, 3.0],
        (1.0, 2.0),
        None,
        1.5,
        "tensor",
    ],
    ids=lambda t: type(t).__name__ + ("" if not hasattr(t, "dtype") else f"-{t.dtype}"),
)
def test_unsupported_inputs_raise_type_error(tensor: object) -> None:
    with pytest.raises(TypeError):
        bofrs.pack(tensor)


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [0, 1, 8, 15, 24, 63, 65, 100, 8192, -64])
def test_invalid_block_size_values(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        bofrs.pack(weights(64), "nf4", block_size)
    with pytest.raises(ValueError, match="block_size"):
        bofrs.codebook("af4", block_size)


@pytest.mark.parametrize("block_size", [True, 64.0, "64", None], ids=repr)
def test_invalid_block_size_types(block_size: object) -> None:
    with pytest.raises(TypeError, match="block_size"):
        bofrs.pack(weights(64), "nf4", block_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["nf3", "NF4", "", "bof5"])
def test_unknown_codebook_name(name: str) -> None:
    with pytest.raises(ValueError, match="codebook"):
        bofrs.pack(weights(64), name)
    with pytest.raises(ValueError, match="codebook"):
        bofrs.codebook(name)


def test_codebook_of_wrong_type() -> None:
    with pytest.raises(TypeError):
        bofrs.pack(weights(64), 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bofrs.pack(weights(64), bofrs.codebook("nf4").levels)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale_dtype", ["bf16", "float64", "int8", "", "Float16"])
def test_unknown_scale_dtype(scale_dtype: str) -> None:
    with pytest.raises(ValueError, match="scale_dtype"):
        bofrs.pack(weights(64), scale_dtype=scale_dtype)


def test_scale_dtype_must_be_a_name() -> None:
    with pytest.raises(TypeError, match="scale_dtype"):
        bofrs.pack(weights(64), scale_dtype=torch.bfloat16)  # type: ignore[arg-type]


def test_unknown_keyword_and_positional_scale_dtype() -> None:
    with pytest.raises(TypeError):
        bofrs.pack(weights(64), blocksize=64)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        bofrs.pack(weights(64), "nf4", 64, "float32")  # type: ignore[misc]


def test_unknown_or_unsupported_isa() -> None:
    with pytest.raises(ValueError, match="isa"):
        bofrs.pack(weights(64), isa="sse9")
    for isa in {"portable", "avx2", "avx512"} - set(bofrs.supported_isas()):
        with pytest.raises(ValueError, match="isa"):
            bofrs.pack(weights(64), isa=isa)


def test_float16_scale_overflow_names_the_block() -> None:
    x = torch.ones(256)
    x[64 + 3] = 70000.0
    with pytest.raises(ValueError, match=r"block 1\b"):
        bofrs.pack(x, "nf4", 64, scale_dtype="float16")
    x[64 + 3] = 65504.0  # the largest float16 value still fits
    assert float(bofrs.pack(x, "nf4", 64, scale_dtype="float16").scales[1]) == 65504.0


# --- Codebook ---------------------------------------------------------------------------------------

NF4 = bofrs.codebook("nf4").levels


@pytest.mark.parametrize(
    "levels",
    [
        NF4[:15],
        np.append(NF4, 1.0),
        NF4.reshape(4, 4),
        NF4[::-1],
        np.where(np.arange(16) == 3, NF4[5], NF4),
        np.append(NF4[:15], 1.5),
        np.append(-1.0001, NF4[1:]),
        np.where(np.arange(16) == 8, np.nan, NF4),
        np.where(np.arange(16) == 15, np.inf, NF4),
    ],
    ids=["15_levels", "17_levels", "2d", "descending", "unsorted", "above_1", "below_minus_1", "nan", "inf"],
)
def test_invalid_codebook_levels(levels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="levels"):
        bofrs.Codebook("bad", levels)


def test_invalid_codebook_arguments() -> None:
    with pytest.raises(ValueError, match="normalization"):
        bofrs.Codebook("x", NF4, "minmax")
    with pytest.raises(TypeError):
        bofrs.Codebook("", NF4)
    with pytest.raises(ValueError, match="block_size"):
        bofrs.Codebook("x", NF4, block_size=48)


# --- other entry points ----------------------------------------------------------------------------


def test_quantization_error_arguments() -> None:
    x = weights((8, 16))
    packed = bofrs.pack(x)
    with pytest.raises(ValueError, match="shape"):
        bofrs.quantization_error(x.t(), packed)
    with pytest.raises(ValueError, match="shape"):
        bofrs.quantization_error(x.reshape(-1), packed)
    with pytest.raises(TypeError):
        bofrs.quantization_error(x, x)  # type: ignore[arg-type]
    bad = x.clone()
    bad[5, 9] = float("nan")
    with pytest.raises(ValueError, match=index_pattern(5 * 16 + 9)):
        bofrs.quantization_error(bad, packed)


def test_dequantize_and_unpack_arguments() -> None:
    packed = bofrs.pack(weights(64))
    for dtype in (torch.int32, torch.bool, "float32", np.float32):
        with pytest.raises(TypeError):
            packed.dequantize(dtype)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bofrs.unpack(weights(64))  # type: ignore[arg-type]


def test_packed_tensor_rejects_inconsistent_parts() -> None:
    packed = bofrs.pack(weights(100), "nf4", 64)
    parts = dict(shape=packed.shape, dtype=packed.dtype, block_size=64, codebook=packed.codebook)
    with pytest.raises(ValueError, match="codes"):
        bofrs.PackedTensor(packed.codes[:-1], packed.scales, **parts)
    with pytest.raises(ValueError, match="scales"):
        bofrs.PackedTensor(packed.codes, packed.scales[:1], **parts)
    with pytest.raises(ValueError, match="scales"):
        bofrs.PackedTensor(packed.codes, packed.scales.double(), **parts)
    with pytest.raises(TypeError, match="codebook"):
        bofrs.PackedTensor(packed.codes, packed.scales, packed.shape, packed.dtype, 64, "nf4")  # type: ignore[arg-type]


def test_native_layer_rejects_bad_buffers() -> None:
    levels = NF4
    data = np.zeros(128, F32)
    with pytest.raises(ValueError, match="contiguous"):
        bofrs._native.pack_ext(data[::2], "float32", levels, 64, "absmax", "float32")
    with pytest.raises(TypeError, match="element"):
        bofrs._native.pack_ext(data, "float64", levels, 64, "absmax", "float32")
    with pytest.raises(ValueError, match="normalization"):
        bofrs._native.pack_ext(data, "float32", levels, 64, "minmax", "float32")
    with pytest.raises(ValueError, match="codebook"):
        bofrs._native.pack_ext(data, "float32", levels[::-1].copy(), 64, "absmax", "float32")
    codes, scales = np.zeros(64, np.uint8), np.ones(2, F32)
    with pytest.raises(ValueError, match="codes"):
        bofrs._native.unpack(codes[:-1], scales, levels, 64, 128, "float32")
    with pytest.raises(ValueError, match="scales"):
        bofrs._native.unpack(codes, scales[:1], levels, 64, 128, "float32")
    with pytest.raises(ValueError, match="scale"):
        bofrs._native.unpack(codes, np.array([1.0, np.nan], F32), levels, 64, 128, "float32")
    with pytest.raises(TypeError, match="out_dtype"):
        bofrs._native.unpack(codes, scales, levels, 64, 128, "float64")
    with pytest.raises(ValueError, match="block_size"):
        bofrs._native.unpack(codes, scales, levels, 48, 128, "float32")
