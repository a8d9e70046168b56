"""The BOF4 optimizer: published tables, Monte-Carlo agreement, the two modes, options, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bofrs
from published_codebooks import TABLE6  # paper Table 6 (block size 64), ascending levels

BUILTIN = {
    ("mse", "absmax"): "bof4",
    ("mae", "absmax"): "bof4-mae",
    ("mse", "signed_absmax"): "bof4s",
    ("mae", "signed_absmax"): "bof4s-mae",
}


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(1 << 24, generator=torch.Generator().manual_seed(1234))


@pytest.mark.parametrize(("metric", "normalization"), list(TABLE6))
def test_theoretical_mode_reproduces_table_6(metric: str, normalization: str) -> None:
    book = bofrs.optimize_codebook(64, metric=metric, normalization=normalization)
    diff = np.abs(book.levels.astype(np.float64) - TABLE6[metric, normalization]).max()
    assert diff < 1e-3, diff
    assert book.normalization == normalization and book.block_size == 64
    # The built-in named codebook is this very optimization.
    named = bofrs.codebook(BUILTIN[metric, normalization], 64)
    assert np.array_equal(named.levels, book.levels)
    assert named.normalization == normalization


@pytest.mark.parametrize(("metric", "normalization"), list(TABLE6))
def test_data_driven_mode_agrees_with_theory(
    gaussian: torch.Tensor, metric: str, normalization: str
) -> None:
    half = gaussian[: 1 << 23]
    # The sample and its negation: antithetic pairs cancel the odd part of the sampling noise.
    data = bofrs.optimize_codebook(64, metric=metric, normalization=normalization, data=[half, -half])
    theory = bofrs.codebook(BUILTIN[metric, normalization], 64)
    assert data.name.endswith("-data")
    assert np.abs(data.levels - theory.levels).max() < 2.5e-3


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_mse_ordering_and_monte_carlo(gaussian: torch.Tensor, block_size: int) -> None:
    theory = {
        name: bofrs.expected_error(name, block_size, metric="mse")
        for name in ("nf4", "bof4", "bof4s")
    }
    assert theory["bof4s"] < theory["bof4"] < theory["nf4"]
    for name, expected in theory.items():
        packed = bofrs.pack(gaussian, name, block_size, scale_dtype="float32")
        measured = float(((packed.dequantize().double() - gaussian.double()) ** 2).mean())
        assert abs(measured - expected) < 0.01 * expected, (name, measured, expected)


def test_mae_monte_carlo(gaussian: torch.Tensor) -> None:
    for name in ("nf4", "bof4-mae", "bof4s-mae"):
        expected = bofrs.expected_error(name, 64, metric="mae")
        packed = bofrs.pack(gaussian, name, 64, scale_dtype="float32")
        measured = float((packed.dequantize().double() - gaussian.double()).abs().mean())
        assert abs(measured - expected) < 0.01 * expected, (name, measured, expected)
    assert bofrs.expected_error("bof4s-mae", metric="mae") < bofrs.expected_error(
        "bof4-mae", metric="mae"
    ) < bofrs.expected_error("nf4", 64, metric="mae")


def test_each_metric_is_optimal_for_itself() -> None:
    for metric, other in (("mse", "mae"), ("mae", "mse")):
        best = BUILTIN[metric, "absmax"]
        worse = BUILTIN[other, "absmax"]
        assert bofrs.expected_error(best, metric=metric) < bofrs.expected_error(worse, metric=metric)


@pytest.mark.parametrize("block_size", [16, 4096])
def test_builtins_exist_for_extreme_block_sizes(block_size: int) -> None:
    for name in BUILTIN.values():
        book = bofrs.codebook(name, block_size)
        assert book.levels.shape == (16,) and np.all(np.diff(book.levels) > 0)
        assert book.levels[-1] == 1.0 and 0.0 in book.levels
    # Larger blocks spread the normalized values less: inner levels move toward zero.
    assert bofrs.codebook("bof4", 4096).levels[8] < bofrs.codebook("bof4", 16).levels[8]


def test_signed_builtins_pack_with_signed_scales() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    packed = bofrs.pack(w, "bof4s", 64, scale_dtype="float32")
    block = w.reshape(-1, 64)
    signed_max = block.gather(1, block.abs().argmax(1, keepdim=True)).squeeze(1)
    assert torch.equal(packed.scales.float(), signed_max)
    # The block maximum is reconstructed exactly (it maps to the pinned level +1).
    restored = packed.dequantize().reshape(-1, 64)
    assert torch.equal(restored.gather(1, block.abs().argmax(1, keepdim=True)).squeeze(1), signed_max)


def test_pinned_levels_stay_and_unpinned_is_symmetric() -> None:
    book = bofrs.optimize_codebook(128, pinned=(-1.0, 0.0, 0.5, 1.0))
    for p in (-1.0, 0.0, 0.5, 1.0):
        assert p in book.levels
    free = bofrs.optimize_codebook(128, pinned=())
    assert free.levels[0] > -1.0 and 0.0 not in free.levels
    assert np.abs(free.levels + free.levels[::-1]).max() < 1e-6
    # Fewer pins, lower error: pins are constraints.
    assert bofrs.expected_error(free) < bofrs.expected_error("bof4", 128)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_other_bit_widths(bits: int) -> None:
    book = bofrs.optimize_codebook(64, bits=bits)
    assert book.bits == bits and book.levels.shape == (1 << bits,)
    assert np.all(np.diff(book.levels) >= 0)
    with pytest.raises(ValueError, match="codebook"):
        bofrs.pack(torch.randn(64), book, 64)


def test_more_bits_less_error() -> None:
    errors = [bofrs.expected_error(bofrs.optimize_codebook(64, bits=b)) for b in (2, 3, 4, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_init_and_custom_name() -> None:
    start = bofrs.codebook("nf4")
    book = bofrs.optimize_codebook(64, init=start, name="mine")
    assert book.name == "mine"
    assert np.abs(book.levels - bofrs.codebook("bof4", 64).levels).max() < 1e-6


def test_data_sources_and_dtypes() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 512, generator=g)
    ref = bofrs.optimize_codebook(64, data=w)
    for variant in (w.bfloat16(), w.half(), w.numpy(), w.double(), w.t().contiguous().t()):
        book = bofrs.optimize_codebook(64, data=variant)
        assert np.abs(book.levels - ref.levels).max() < 5e-3
    # A state dict: only float tensors of 2+ dimensions count.
    state = {"a.weight": w, "a.bias": torch.full((512,), 1e6), "step": torch.tensor(3)}
    assert np.array_equal(bofrs.optimize_codebook(64, data=state).levels, ref.levels)
    # A generator of tensors streams.
    halves = (w[:256], w[256:])
    assert np.abs(bofrs.optimize_codebook(64, data=iter(halves)).levels - ref.levels).max() < 1e-6


def test_sampling_is_deterministic_per_seed() -> None:
    w = torch.randn(1 << 20, generator=torch.Generator().manual_seed(9))
    a = bofrs.optimize_codebook(64, data=w, sample=0.25, seed=1)
    b = bofrs.optimize_codebook(64, data=w, sample=0.25, seed=1)
    c = bofrs.optimize_codebook(64, data=w, sample=0.25, seed=2)
    assert np.array_equal(a.levels, b.levels)
    assert not np.array_equal(a.levels, c.levels)
    assert np.abs(a.levels - c.levels).max() < 0.02


def test_heavy_tailed_data_moves_levels_inward() -> None:
    # Student-t(4) blocks: the maximum is further out, so the normalized values crowd near 0.
    t4 = torch.distributions.StudentT(4.0).sample((1 << 20,))
    heavy = bofrs.optimize_codebook(64, data=t4)
    theory = bofrs.codebook("bof4", 64)
    assert heavy.levels[9] < theory.levels[9]
    packed_heavy = bofrs.pack(t4, heavy, 64)
    packed_theory = bofrs.pack(t4, theory, 64)
    err = lambda p: float(((p.dequantize() - t4) ** 2).mean())  # noqa: E731
    assert err(packed_heavy) < err(packed_theory)


def test_expected_error_scales_and_accepts_levels() -> None:
    levels = bofrs.codebook("nf4").levels.tolist()
    assert bofrs.expected_error(levels, 64) == bofrs.expected_error("nf4", 64)
    assert math.isclose(bofrs.expected_error("nf4"), 8.46e-3, rel_tol=0.01)
    # NF4 holds both -1 and +1: the block maxima cost nothing under either normalization.
    signed = bofrs.expected_error(levels, 64, normalization="signed_absmax")
    assert math.isclose(signed, bofrs.expected_error(levels, 64), rel_tol=1e-12)
    # BOF4-S has no -1: used with plain absmax, half of the maxima land on -0.857.
    bof4s = bofrs.codebook("bof4s", 64)
    assert bofrs.expected_error(bof4s, normalization="absmax") > bofrs.expected_error(bof4s)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metric": "l3"}, ValueError, "metric"),
        ({"metric": 2}, TypeError, "metric"),
        ({"normalization": "rms"}, ValueError, "normalization"),
        ({"bits": 1}, ValueError, "bits"),
        ({"bits": 9}, ValueError, "bits"),
        ({"bits": 4.0}, TypeError, "bits"),
        ({"pinned": (1.5,)}, ValueError, "pinned"),
        ({"pinned": (0.0, 0.0)}, ValueError, "pinned"),
        ({"pinned": (math.nan,)}, ValueError, "pinned"),
        ({"pinned": "0"}, TypeError, "pinned"),
        ({"init": [0.0] * 3}, ValueError, "init"),
        ({"init": [0.5] * 15 + [0.0]}, ValueError, "init"),
        ({"tolerance": 0.0}, ValueError, "tolerance"),
        ({"tolerance": math.inf}, ValueError, "tolerance"),
        ({"max_iterations": 0}, ValueError, "max_iterations"),
        ({"sample": 0.0}, ValueError, "sample"),
        ({"sample": 1.5}, ValueError, "sample"),
        ({"seed": -1}, ValueError, "seed"),
        ({"block_size": 48}, ValueError, "block_size"),
        ({"data": "weights"}, TypeError, "data"),
        ({"data": [torch.ones(4, dtype=torch.int32)]}, TypeError, "data"),
        ({"data": torch.zeros(0)}, ValueError, "data"),
        ({"data": torch.zeros(128)}, ValueError, "data"),
    ],
)
def test_bad_options_raise_naming_them(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        bofrs.optimize_codebook(**kwargs)  # type: ignore[arg-type]


def test_non_finite_data_raises_naming_the_tensor_and_index() -> None:
    w = torch.randn(1000)
    w[777] = math.inf
    with pytest.raises(ValueError, match=r"data\[1\].*777"):
        bofrs.optimize_codebook(64, data=[torch.randn(10), w])
    with pytest.raises(ValueError, match="777"):
        bofrs.optimize_codebook(64, data=w.numpy())


def test_not_converged_warns() -> None:
    with pytest.warns(RuntimeWarning, match="not converged"):
        bofrs.optimize_codebook(64, data=torch.randn(4096), max_iterations=1)


def test_expected_error_bad_input() -> None:
    with pytest.raises(ValueError, match="codebook"):
        bofrs.expected_error([0.5, -0.5])
    with pytest.raises(ValueError, match="codebook"):
        bofrs.expected_error([2.0, 3.0])
    with pytest.raises(ValueError, match="metric"):
        bofrs.expected_error("nf4", metric="l1")
    with pytest.raises(ValueError, match="codebook"):
        bofrs.expected_error("nf5")
