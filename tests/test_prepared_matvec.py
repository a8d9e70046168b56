"""The prepared per-call entry point (``_native.PreparedMatvec``): the same results as the numpy
route for every kernel variant and mode, its outputs rounded as torch rounds, DLPack inputs
validated, and QuantLinear's cached operands rebuilt when the weight changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

import bofrs
from bofrs import _native
from bofrs.formats.blockwise.matmul import operands
from bofrs.nn import QuantLinear
from test_matvec import assert_close, packed_weight

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def prepared(packed: bofrs.PackedTensor, isa: str | None = None) -> _native.PreparedMatvec:
    ops = operands(packed)
    return _native.PreparedMatvec(
        ops.codes, ops.scales, ops.levels, ops.out_features, ops.in_features, ops.block_size, isa
    )


def as_tensor(out: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    y = torch.from_numpy(out)
    return y if out.dtype == np.float32 else y.view(dtype)


@pytest.mark.parametrize("mode", ["float", "int16", "int8"])
@pytest.mark.parametrize(("out_features", "in_features", "block_size"), [(3, 48, 16), (7, 192, 64), (5, 576, 64), (4, 1152, 128)])
def test_equals_the_numpy_route_bit_for_bit(isa: str, mode: str, out_features: int, in_features: int, block_size: int) -> None:
    packed = packed_weight(out_features, in_features, block_size, seed=in_features)
    ops = operands(packed)
    prep = prepared(packed, isa)
    assert (prep.isa, prep.out_features, prep.in_features, prep.block_size) == (isa, out_features, in_features, block_size)
    gen = torch.Generator().manual_seed(out_features)
    for tokens in (1, 2, 5):
        x = torch.randn(tokens, in_features, generator=gen) * 4
        x[0, 1] = -0.0
        for dtype, element in DTYPES.items():
            xd = x.to(dtype)
            bits = xd.view(torch.int16).numpy().view(np.uint16) if dtype != torch.float32 else xd.numpy()
            want = _native.matvec(
                bits.reshape(-1), element, tokens, ops.codes, ops.scales, ops.levels,
                out_features, in_features, block_size, isa, mode,
            ).reshape(tokens, out_features)  # fmt: skip
            wide = prep.apply(to_dlpack(xd), mode, True)
            assert wide.dtype == np.float32 and wide.shape == (tokens, out_features)
            np.testing.assert_array_equal(wide.view(np.uint32), want.view(np.uint32))
            # The default output is the input dtype, rounded as torch rounds float32.
            y = as_tensor(prep.apply(to_dlpack(xd), mode), dtype)
            assert y.dtype == dtype and y.shape == (tokens, out_features)
            rounded = torch.from_numpy(want).to(dtype)
            assert torch.equal(y.view(torch.int16) if dtype != torch.float32 else y, rounded.view(torch.int16) if dtype != torch.float32 else rounded)
            if mode == "float":
                assert_close(y, xd, packed, dtype)


@pytest.mark.parametrize(
    ("dtype", "a", "b", "scale"),
    [
        (torch.bfloat16, 1.0, 2**-8, 1.0),  # halfway: to even (down)
        (torch.bfloat16, 1.0, 3 * 2**-8, 1.0),  # halfway: to even (up)
        (torch.bfloat16, 1.0, 2**-8, 1.25),  # inexact product
        (torch.bfloat16, 3.3895e38, 3.3895e38 / 256, 1.0),  # rounds past the largest: inf
        (torch.bfloat16, 1e-38, 1e-40, 0.5),  # subnormal bf16
        (torch.bfloat16, float("nan"), 1.0, 1.0),
        (torch.bfloat16, float("-inf"), 1.0, 1.0),
        (torch.float16, 1.0, 2**-11, 1.0),  # halfway: to even (down)
        (torch.float16, 1.0, 3 * 2**-11, 1.0),  # halfway: to even (up)
        (torch.float16, 65504.0, 16.0, 1.0),  # 65520: halfway to 65536, rounds to inf
        (torch.float16, 65504.0, 8.0, 1.0),  # stays finite
        (torch.float16, 3 * 2**-24, 0.0, 0.5),  # subnormal halfway: to even
        (torch.float16, 2**-24, 0.0, 0.5),  # half the smallest subnormal: to zero
        (torch.float16, -(2**-14), 2**-24, 1.0),
        (torch.float16, float("nan"), 1.0, 1.0),
    ],
)
def test_16_bit_outputs_round_as_torch(dtype: torch.dtype, a: float, b: float, scale: float) -> None:
    # One row of weight 1.0 (NF4's top level) times scale: y = scale * (a + b) in float32,
    # then rounded natively to the input's 16-bit dtype; torch's cast of the float32 output is
    # the reference.
    codebook = bofrs.codebook("nf4")
    top = int(np.argmax(codebook.levels))
    assert codebook.levels[top] == 1.0
    n = 64
    prep = _native.PreparedMatvec(
        np.full(n // 2, top * 17, np.uint8), np.array([scale], np.float32), codebook.levels, 1, n, n
    )
    x = torch.zeros(1, n, dtype=dtype)
    x[0, 0], x[0, 1] = a, b
    wide = torch.from_numpy(prep.apply(to_dlpack(x), "float", True))
    got = as_tensor(prep.apply(to_dlpack(x), "float"), dtype)
    want = wide.to(dtype)
    assert got.dtype == dtype
    if torch.isnan(want).all():
        assert torch.isnan(got).all()
    else:
        assert got.view(torch.int16).item() == want.view(torch.int16).item(), (float(wide), float(got), float(want))


def test_dlpack_inputs_are_validated() -> None:
    packed = packed_weight(4, 64, 32)
    prep = prepared(packed)
    x = torch.randn(3, 64)
    want = prep.apply(to_dlpack(x))
    # numpy's capsules work too, and zero tokens give an empty result.
    np.testing.assert_array_equal(prep.apply(x.numpy().__dlpack__()), want)
    assert prep.apply(to_dlpack(torch.zeros(0, 64))).shape == (0, 4)
    # Rows of a larger tensor: a contiguous slice is fine.
    big = torch.randn(5, 64)
    np.testing.assert_array_equal(prep.apply(to_dlpack(big[1:4])), prep.apply(to_dlpack(big[1:4].clone())))
    with pytest.raises(TypeError, match="x must be an unconsumed DLPack capsule"):
        prep.apply(x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must be an unconsumed DLPack capsule"):
        prep.apply(x.numpy())  # type: ignore[arg-type]
    consumed = to_dlpack(x)
    torch.utils.dlpack.from_dlpack(consumed)
    with pytest.raises(TypeError, match="unconsumed"):
        prep.apply(consumed)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        prep.apply(to_dlpack(x.double()))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        prep.apply(to_dlpack(torch.ones(3, 64, dtype=torch.int32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        prep.apply(to_dlpack(torch.randn(64, 3).t()))
    with pytest.raises(ValueError, match="C-contiguous"):
        prep.apply(to_dlpack(torch.randn(3, 128)[:, ::2]))
    with pytest.raises(ValueError, match="2-D"):
        prep.apply(to_dlpack(torch.randn(64)))
    with pytest.raises(ValueError, match="2-D"):
        prep.apply(to_dlpack(torch.randn(1, 3, 64)))
    with pytest.raises(ValueError, match=r"shape \[tokens, 64\]"):
        prep.apply(to_dlpack(torch.randn(3, 32)))
    with pytest.raises(ValueError, match="activations"):
        prep.apply(to_dlpack(x), "int4")


def test_construction_is_validated() -> None:
    levels = bofrs.codebook("nf4").levels
    codes = np.zeros(64, np.uint8)
    ok = _native.PreparedMatvec(codes, np.ones(2, np.float32), levels, 2, 64, 64)
    assert ok.out_features == 2
    with pytest.raises(ValueError, match="codes"):
        _native.PreparedMatvec(codes[:63], np.ones(2, np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="scales"):
        _native.PreparedMatvec(codes, np.ones(3, np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="scales: scale of block 1 is not finite"):
        _native.PreparedMatvec(codes, np.array([1, np.inf], np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="block_size"):
        _native.PreparedMatvec(codes, np.ones(2, np.float32), levels, 2, 64, 48)
    with pytest.raises(ValueError, match="isa"):
        _native.PreparedMatvec(codes, np.ones(2, np.float32), levels, 2, 64, 64, "sse9")
    for isa in {"portable", "avx2", "avx512"} - set(bofrs.supported_isas()):
        with pytest.raises(ValueError, match="not supported"):
            _native.PreparedMatvec(codes, np.ones(2, np.float32), levels, 2, 64, 64, isa)
    with pytest.raises(ValueError, match="contiguous"):
        _native.PreparedMatvec(np.zeros(128, np.uint8)[::2], np.ones(2, np.float32), levels, 2, 64, 64)


def test_quant_linear_rebuilds_its_operands_when_the_weight_changes() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 8, bias=False), "nf4", 64)
    x = torch.randn(1, 128)
    before = layer(x)
    assert torch.equal(layer(x), before)  # cached operands
    with torch.no_grad():
        layer.codes.bitwise_xor_(0x11)  # in place: a new version
    after = layer(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.scales.mul_(2)
    torch.testing.assert_close(layer(x), 2 * after, rtol=1e-6, atol=1e-6)
    layer.scales = layer.scales / 4  # replaced
    torch.testing.assert_close(layer(x), after / 2, rtol=1e-6, atol=1e-6)
    # Buffers made in inference mode have no version counter: invalidate_caches after an
    # in-place change.
    with torch.inference_mode():
        frozen = QuantLinear.from_linear(torch.nn.Linear(128, 8, bias=False), "nf4", 64)
        y0 = frozen(x)
        frozen.scales.mul_(2)
        frozen.invalidate_caches()
        torch.testing.assert_close(frozen(x), 2 * y0, rtol=1e-6, atol=1e-6)


def test_quant_linear_outputs_keep_dtype_shape_and_grad() -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(192, 24)
    layer = QuantLinear.from_linear(linear, "nf4", 64)
    for dtype in DTYPES:
        for shape in ((192,), (1, 192), (2, 3, 192)):
            x = torch.randn(shape).to(dtype)
            y = layer(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], 24)
            want = (x.float() @ layer.dequantize(torch.float32).T + layer.bias.float()).to(dtype)
            torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
    x = torch.randn(2, 192, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # A non-contiguous 2-D input takes the same path after a copy.
    base = torch.randn(192, 4)
    torch.testing.assert_close(layer(base.t()), layer(base.t().contiguous()))


def test_quant_matmul_caches_operands_per_tensor_until_a_part_changes() -> None:
    from bofrs.nn import quant_matmul

    packed = packed_weight(6, 128, 64, seed=5)
    assert operands(packed) is operands(packed)  # built once per tensor
    x = torch.randn(2, 128)
    before = quant_matmul(x, packed)
    packed.codes.bitwise_xor_(0x23)  # in place: rebuilt
    after = quant_matmul(x, packed)
    assert not torch.equal(before, after)
    assert_close(after, x, packed, torch.float32)
    packed.scales.mul_(-3)
    torch.testing.assert_close(quant_matmul(x, packed), -3 * after, rtol=1e-6, atol=1e-5)
