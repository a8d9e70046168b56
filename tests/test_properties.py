"""Property tests over random shapes, dtypes, block sizes, codebooks and scale dtypes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bofrs
import reference
from checks import BLOCK_SIZES, DTYPES, ISAS, SCALE_DTYPES, assert_codes_match, assert_decodes_match

F32 = np.float32
MAX_ELEMENTS = 3000
#: Largest magnitude each input dtype holds without rounding to infinity.
LIMITS = {
    torch.float32: float(np.finfo(F32).max),
    torch.float64: float(np.finfo(F32).max),
    torch.bfloat16: float(F32(3.38e38)),
    torch.float16: 65504.0,
}
SCALE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Case:
    tensor: torch.Tensor
    codebook: bofrs.Codebook
    block_size: int
    scale_dtype: str
    isa: str


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, ...]:
    ndim = draw(st.integers(0, 3))
    shape: list[int] = []
    budget = MAX_ELEMENTS
    for _ in range(ndim):
        side = draw(st.integers(0, budget))
        shape.append(side)
        budget = budget // max(side, 1)
    return tuple(shape)


@st.composite
def values(draw: st.DrawFn, n: int, dtype: torch.dtype) -> np.ndarray:
    """float32 (float64 for float64 tensors) values: Gaussian at a random magnitude, or
    arbitrary floats (zeros, subnormals, huge values, ties...)."""
    limit = LIMITS[dtype]
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**32 - 1))
        magnitude = 10.0 ** draw(st.integers(-40, 4 if dtype == torch.float16 else 37))
        rng = np.random.default_rng(seed)
        return np.clip(rng.standard_normal(n) * magnitude, -limit, limit)
    width = 64 if dtype == torch.float64 else 32
    limit = min(limit, 3.4e38) if width == 64 else limit
    elements = st.floats(-limit, limit, width=width, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float64 if width == 64 else F32, n, elements=elements))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    name = draw(st.sampled_from(bofrs.available_codebooks()))
    book = bofrs.codebook(name, block_size)
    if draw(st.booleans()):
        book = bofrs.Codebook(f"signed_{name}", book.levels, "signed_absmax")
    data = draw(values(int(np.prod(shape)), dtype))
    tensor = torch.from_numpy(np.asarray(data)).to(dtype).reshape(shape)
    return Case(tensor, book, block_size, draw(st.sampled_from(SCALE_DTYPES)), draw(st.sampled_from(ISAS)))


def pack_or_none(case: Case) -> tuple[bofrs.PackedTensor, reference.Encoded] | None:
    """The packed tensor and the reference encoding, or None after checking that both reject
    a block scale that overflows the scale dtype."""
    book = case.codebook
    try:
        expected = reference.encode(case.tensor, book.levels, case.block_size, book.normalization, case.scale_dtype)
    except ValueError:
        with pytest.raises(ValueError, match="scale"):
            bofrs.pack(case.tensor, book, case.block_size, scale_dtype=case.scale_dtype, isa=case.isa)
        return None
    packed = bofrs.pack(case.tensor, book, case.block_size, scale_dtype=case.scale_dtype, isa=case.isa)
    return packed, expected


def packed_or_rejected(case: Case) -> bofrs.PackedTensor:
    """The packed tensor, after :func:`pack_or_none`'s check; a case whose block scale overflows
    the scale dtype is rejected (``hypothesis.assume``) once that check has passed."""
    result = pack_or_none(case)
    assume(result is not None)
    assert result is not None
    return result[0]


def check_against_reference(case: Case) -> None:
    result = pack_or_none(case)
    if result is not None:
        packed, expected = result
        assert_codes_match(packed, expected)
        assert_decodes_match(packed, expected, (torch.float32,))


@settings(max_examples=80, deadline=None)
@given(cases())
def test_pack_and_dequantize_equal_reference(case: Case) -> None:
    check_against_reference(case)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(cases())
def test_pack_and_dequantize_equal_reference_many_examples(case: Case) -> None:
    check_against_reference(case)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_error_is_within_half_the_widest_gap(case: Case) -> None:
    packed = packed_or_rejected(case)
    levels = packed.codebook.levels.astype(np.float64)
    half_gap = float(np.max(np.diff(levels))) / 2
    x = case.tensor.reshape(-1).double().numpy().astype(F32).astype(np.float64)
    decoded = packed.dequantize(torch.float32).reshape(-1).double().numpy()
    scale = np.repeat(packed.scales.double().numpy(), case.block_size)[: x.size]
    zero = scale == 0
    # A block whose scale rounds to 0 decodes to 0; only values below half the smallest
    # positive scale can be in it.
    smallest = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}[case.scale_dtype]
    assert np.all(decoded[zero] == 0) and np.all(np.abs(x[zero]) <= smallest / 2)
    x, decoded, scale = x[~zero], decoded[~zero], scale[~zero]
    y = x / scale  # normalized values beyond the codebook's ends go to the end levels
    beyond = np.maximum(0.0, np.maximum(levels[0] - y, y - levels[-1]))
    # float32 rounding: y near a threshold may take the other level; the product is rounded
    slack = np.abs(scale) * 2.0**-22 + np.abs(decoded) * 2.0**-23 + 2.0**-148
    bound = np.abs(scale) * np.maximum(half_gap, beyond) + slack
    excess = np.abs(x - decoded) - bound
    assert np.all(excess <= 0), f"worst excess {excess.max()} at {int(np.argmax(excess))}"


@settings(max_examples=80, deadline=None)
@given(cases())
def test_packed_tensor_metadata(case: Case) -> None:
    packed = packed_or_rejected(case)
    n, bs = case.tensor.numel(), case.block_size
    blocks = math.ceil(n / bs)
    nbytes = math.ceil(n / 2) + blocks * SCALE_BYTES[case.scale_dtype]
    assert packed.shape == case.tensor.shape and packed.dtype == case.tensor.dtype
    assert packed.block_size == bs and packed.numel == n and packed.codebook == case.codebook
    assert packed.codes.shape == (math.ceil(n / 2),) and packed.scales.shape == (blocks,)
    assert packed.scale_dtype == getattr(torch, case.scale_dtype)
    assert packed.nbytes == nbytes
    if n:
        assert packed.bits_per_weight == 8 * nbytes / n
    else:
        assert packed.bits_per_weight == 4 + 8 * SCALE_BYTES[case.scale_dtype] / bs
    decoded = packed.dequantize()
    assert decoded.shape == case.tensor.shape and decoded.dtype == case.tensor.dtype
