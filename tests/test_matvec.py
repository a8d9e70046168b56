"""The fused 4-bit matvec against a float64 numpy reference, for every kernel variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bofrs
from bofrs import _native
from bofrs.nn import quant_matmul
from reference import unpack_codes
from test_threads import iterations_while_inside, no_forced_switches  # noqa: F401

EPS32 = float(np.finfo(np.float32).eps)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def packed_weight(
    out_features: int,
    in_features: int,
    block_size: int,
    codebook: str = "nf4",
    *,
    seed: int = 0,
    scales: np.ndarray | None = None,
) -> bofrs.PackedTensor:
    """Random codes and float32 scales (or the given ones), built directly."""
    rng = np.random.default_rng(seed)
    n = out_features * in_features
    codes = rng.integers(0, 256, size=n // 2, dtype=np.uint8)
    if scales is None:
        scales = (rng.standard_normal(n // block_size) * 10.0 ** rng.uniform(-3, 1, n // block_size))
    return bofrs.PackedTensor(
        torch.from_numpy(codes),
        torch.from_numpy(np.asarray(scales, dtype=np.float32)),
        (out_features, in_features),
        torch.float32,
        block_size,
        bofrs.codebook(codebook, block_size),
    )


def reference(x: torch.Tensor, packed: bofrs.PackedTensor) -> tuple[np.ndarray, np.ndarray]:
    """``x @ W.T`` in float64 from the exact weight values, and ``|x| @ |W|.T`` (error scale)."""
    levels = packed.codebook.levels.astype(np.float64)
    codes = unpack_codes(packed.codes.numpy(), packed.numel)
    scales = np.repeat(packed.scales.double().numpy(), packed.block_size)[: packed.numel]
    w = (levels[codes] * scales).reshape(tuple(packed.shape))
    xs = x.double().reshape(-1, w.shape[1]).numpy()
    return xs @ w.T, np.abs(xs) @ np.abs(w).T


def assert_close(y: torch.Tensor, x: torch.Tensor, packed: bofrs.PackedTensor, out_dtype: torch.dtype) -> None:
    want, magnitude = reference(x, packed)
    got = y.double().reshape(want.shape).numpy()
    blocks = packed.shape[1] // packed.block_size
    bound = (packed.block_size + blocks + 8) * EPS32 * magnitude
    if out_dtype != torch.float32:  # the float32 result is rounded once to the output dtype
        bound = bound + np.abs(want) * float(torch.finfo(out_dtype).eps) + float(torch.finfo(out_dtype).tiny)
    excess = np.abs(got - want) - bound
    assert np.all(excess <= 0), f"max excess {excess.max():.3e} at {np.unravel_index(excess.argmax(), excess.shape)}"


@pytest.mark.parametrize("codebook", bofrs.available_codebooks())
@pytest.mark.parametrize(
    ("out_features", "in_features", "block_size"),
    [(1, 16, 16), (3, 48, 16), (7, 96, 32), (5, 64, 64), (33, 640, 128), (9, 4096, 4096), (130, 1024, 64)],
)
def test_every_isa_and_codebook_matches_float64(
    isa: str, codebook: str, out_features: int, in_features: int, block_size: int
) -> None:
    packed = packed_weight(out_features, in_features, block_size, codebook, seed=out_features)
    gen = torch.Generator().manual_seed(in_features)
    for batch in (1, 2, 3, 4, 5, 9):
        x = torch.randn(batch, in_features, generator=gen) * 3
        for dtype in ACTIVATION_DTYPES:
            xd = x.to(dtype)
            y = quant_matmul(xd, packed, isa=isa)
            assert y.dtype == dtype and y.shape == (batch, out_features)
            assert_close(y, xd, packed, dtype)


@pytest.mark.parametrize("case", ["zero_blocks", "huge_scales", "tiny_scales", "extreme_codes"])
def test_adversarial_values(isa: str, case: str) -> None:
    out_features, in_features, block_size = 6, 256, 32
    blocks = out_features * in_features // block_size
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.5, 2.0, blocks)
    if case == "zero_blocks":
        scales[::2] = 0.0
    elif case == "huge_scales":
        scales *= 1e30
    elif case == "tiny_scales":
        scales *= 1e-30
    packed = packed_weight(out_features, in_features, block_size, scales=scales)
    if case == "extreme_codes":
        codes = packed.codes.clone()
        codes[: codes.numel() // 2] = 0xFF  # every weight at the top level
        codes[codes.numel() // 2 :] = 0x00  # ... and at the bottom one
        packed = bofrs.PackedTensor(codes, packed.scales, packed.shape, packed.dtype, block_size, packed.codebook)
    x = torch.from_numpy(rng.standard_normal((3, in_features)).astype(np.float32))
    y = quant_matmul(x, packed, isa=isa)
    assert torch.isfinite(y).all()
    assert_close(y, x, packed, torch.float32)
    if case == "zero_blocks":
        zero_rows = packed.scales.reshape(out_features, -1).abs().sum(1) == 0
        assert torch.all(y[:, zero_rows] == 0)


def test_variants_agree_to_float_tolerance() -> None:
    packed = packed_weight(64, 512, 64, seed=3)
    x = torch.randn(4, 512)
    results = [quant_matmul(x, packed, isa=isa) for isa in bofrs.supported_isas()]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


def test_any_batch_shape() -> None:
    packed = packed_weight(10, 64, 32)
    x = torch.randn(2, 3, 64)
    y = quant_matmul(x, packed)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, quant_matmul(x.reshape(6, 64), packed).reshape(2, 3, 10))
    assert quant_matmul(torch.randn(64), packed).shape == (10,)
    assert quant_matmul(torch.randn(0, 64), packed).shape == (0, 10)


def test_bad_arguments_raise_named_errors() -> None:
    packed = packed_weight(4, 64, 32)
    with pytest.raises(ValueError, match="x must end in 64"):
        quant_matmul(torch.randn(3, 63), packed)
    with pytest.raises(TypeError, match="packed"):
        quant_matmul(torch.randn(3, 64), torch.randn(4, 64))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="input dtype"):
        quant_matmul(torch.randn(3, 64, dtype=torch.float64), packed)
    odd = bofrs.pack(torch.randn(4, 48), "nf4", 32)  # rows do not hold whole blocks
    with pytest.raises(ValueError, match="whole blocks"):
        quant_matmul(torch.randn(1, 48), odd)
    with pytest.raises(ValueError, match="isa"):
        quant_matmul(torch.randn(1, 64), packed, isa="sse9")


def test_native_checks_lengths_and_scales() -> None:
    codes = np.zeros(64, np.uint8)
    levels = bofrs.codebook("nf4").levels
    x = np.ones(64, np.float32)
    ok = _native.matvec(x, "float32", 1, codes, np.ones(2, np.float32), levels, 2, 64, 64)
    assert ok.shape == (2,)
    with pytest.raises(ValueError, match="codes"):
        _native.matvec(x, "float32", 1, codes[:63], np.ones(2, np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="scales"):
        _native.matvec(x, "float32", 1, codes, np.ones(3, np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="x has length"):
        _native.matvec(x, "float32", 2, codes, np.ones(2, np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="not finite"):
        _native.matvec(x, "float32", 1, codes, np.array([1, np.nan], np.float32), levels, 2, 64, 64)
    with pytest.raises(ValueError, match="in_features"):
        _native.matvec(x[:48], "float32", 1, codes[:48], np.ones(2, np.float32), levels, 2, 48, 32)
    with pytest.raises(ValueError, match="block_size"):
        _native.matvec(x, "float32", 1, codes, np.ones(2, np.float32), levels, 2, 64, 48)
    for batch in (2**40, 2**62):  # refused before anything is allocated
        with pytest.raises(ValueError):
            _native.matvec(x, "float32", batch, codes, np.ones(2, np.float32), levels, 2, 64, 64)
    with pytest.raises(TypeError, match="element"):
        _native.matvec(x, "int8", 1, codes, np.ones(2, np.float32), levels, 2, 64, 64)


@pytest.mark.usefixtures("no_forced_switches")
def test_releases_the_interpreter() -> None:
    packed = packed_weight(4096, 4096, 64)
    x = torch.randn(8, 4096)
    count = iterations_while_inside(lambda: quant_matmul(x, packed))
    assert count >= 1000, f"main thread ran only {count} iterations during the fused matvec"


#: (group, QMAX) of the opt-in integer modes, as documented in bofrs.formats.blockwise.matmul.ACTIVATION_MODES.
INTEGER_MODES = {"int16": (64, 16383.0), "int8": (32, 127.0)}


def integer_bound(x: torch.Tensor, packed: bofrs.PackedTensor, mode: str) -> np.ndarray:
    """Documented bound of an integer path: per product ``|level| d / 2 + (|x| + d / 2) dl / 2``
    times ``|scale|`` (``d = max|x| / QMAX`` per group, ``dl = max|level| / QMAX``), plus float32
    rounding of the sums."""
    group, qmax = INTEGER_MODES[mode]
    levels = packed.codebook.levels.astype(np.float64)
    dl = np.abs(levels).max() / qmax
    codes = unpack_codes(packed.codes.numpy(), packed.numel)
    scales = np.abs(np.repeat(packed.scales.double().numpy(), packed.block_size))[: packed.numel]
    lev = np.abs(levels[codes]).reshape(tuple(packed.shape))
    s = scales.reshape(tuple(packed.shape))
    xs = np.abs(x.double().reshape(-1, packed.shape[1]).numpy())
    n_in = xs.shape[1]
    groups = -(-n_in // group)
    pad = np.zeros((xs.shape[0], groups * group))
    pad[:, :n_in] = xs
    d = np.repeat(pad.reshape(xs.shape[0], groups, group).max(2) / qmax, group, axis=1)[:, :n_in]
    quant = d @ (s * lev).T / 2 + (xs + d / 2) @ s.T * dl / 2
    magnitude = (xs + d) @ (s * (lev + dl)).T
    return quant * 1.001 + (n_in + 8) * EPS32 * magnitude


@pytest.mark.parametrize("mode", sorted(INTEGER_MODES))
@pytest.mark.parametrize("codebook", ["nf4", "af4", "fp4"])
@pytest.mark.parametrize(
    ("out_features", "in_features", "block_size"),
    [(1, 16, 16), (3, 48, 16), (7, 96, 32), (5, 64, 64), (6, 192, 64), (33, 640, 128), (9, 4096, 4096)],
)
def test_integer_activations_stay_within_their_documented_bound(
    isa: str, mode: str, codebook: str, out_features: int, in_features: int, block_size: int
) -> None:
    packed = packed_weight(out_features, in_features, block_size, codebook, seed=out_features + 1)
    gen = torch.Generator().manual_seed(in_features + 1)
    for batch in (1, 2, 3, 5, 9):
        x = torch.randn(batch, in_features, generator=gen) * 3
        x[:, ::13] *= 50  # a few large activations per group: the step follows them
        for dtype in ACTIVATION_DTYPES:
            xd = x.to(dtype)
            y = quant_matmul(xd, packed, isa=isa, activations=mode)
            assert y.dtype == dtype and y.shape == (batch, out_features)
            want, _ = reference(xd, packed)
            bound = integer_bound(xd, packed, mode)
            if dtype != torch.float32:
                bound = bound + np.abs(want) * float(torch.finfo(dtype).eps) + float(torch.finfo(dtype).tiny)
            excess = np.abs(y.double().numpy() - want) - bound
            assert np.all(excess <= 0), f"max excess {excess.max():.3e}"


@pytest.mark.parametrize(("mode", "per_sum", "per_norm"), [("int16", 2e-4, 2e-4), ("int8", 4e-3, 1.2e-2)])
def test_integer_error_is_small_but_not_float_exact(mode: str, per_sum: float, per_norm: float) -> None:
    """The opt-in paths are approximate (so never the default): measured error on a 4096-wide
    random product, against the float path's, relative to ``sum |w x|`` per output and to the
    norm of the output (the documented figures: about 6e-5 and 7e-3 of ``|y|``)."""
    packed = packed_weight(256, 4096, 64, seed=5)
    x = torch.randn(1, 4096)
    want, magnitude = reference(x, packed)
    exact = np.abs(quant_matmul(x, packed).double().numpy() - want) / magnitude
    got = quant_matmul(x, packed, activations=mode).double().numpy()
    approx = np.abs(got - want) / magnitude
    assert approx.max() < per_sum
    assert approx.max() > 10 * exact.max()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < per_norm


@pytest.mark.parametrize("mode", sorted(INTEGER_MODES))
def test_integer_variants_agree_and_modes_are_checked(mode: str) -> None:
    packed = packed_weight(64, 512, 64, seed=3)
    x = torch.randn(4, 512)
    results = [quant_matmul(x, packed, isa=isa, activations=mode) for isa in bofrs.supported_isas()]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activations must be one of"):
        quant_matmul(x, packed, activations="int4")
    with pytest.raises(TypeError, match="activations must be a str"):
        quant_matmul(x, packed, activations=16)  # type: ignore[arg-type]
    codes, levels = np.zeros(256, np.uint8), bofrs.codebook("nf4").levels
    with pytest.raises(ValueError, match="activations must be one of 'float', 'int16', 'int8'"):
        _native.matvec(np.ones(512, np.float32), "float32", 1, codes, np.ones(8, np.float32), levels, 1, 512, 64,
                       None, "int4")  # fmt: skip
    y = quant_matmul(torch.full((1, 512), float("nan")), packed, activations=mode)
    assert not torch.isfinite(y).any()
