"""HIGGS: Hadamard transform, Gaussian grids, group-wise packing, and the knapsack allocation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

import bofrs
from bofrs.formats.higgs import grids as _grids

RNG = np.random.default_rng


def hadamard_reference(x: np.ndarray, g: int) -> np.ndarray:
    h = scipy.linalg.hadamard(g).astype(np.float64) / math.sqrt(g)
    return (x.astype(np.float64).reshape(-1, g) @ h.T).reshape(x.shape)


@pytest.mark.parametrize("g", [16, 64, 512, 4096])
def test_hadamard_matches_the_matrix_and_is_an_involution(g: int) -> None:
    x = RNG(g).standard_normal((3, 2 * g)).astype(np.float32)
    y = bofrs.hadamard(torch.from_numpy(x), g)
    np.testing.assert_allclose(y.numpy(), hadamard_reference(x, g), rtol=0, atol=2e-5)
    back = bofrs.hadamard(y, g)
    np.testing.assert_allclose(back.numpy(), x, rtol=0, atol=2e-5)
    norms = np.linalg.norm(x.reshape(-1, g), axis=1)
    np.testing.assert_allclose(np.linalg.norm(y.numpy().reshape(-1, g), axis=1), norms, rtol=1e-5)


def test_hadamard_dtypes_and_bad_input() -> None:
    x = torch.randn(4, 256)
    assert bofrs.hadamard(x.bfloat16()).dtype == torch.bfloat16
    np.testing.assert_allclose(bofrs.hadamard(x).numpy(), hadamard_reference(x.numpy(), 256), atol=2e-5)
    with pytest.raises(ValueError, match="group_size"):
        bofrs.hadamard(torch.randn(4, 100))
    with pytest.raises(ValueError, match="multiple"):
        bofrs.hadamard(torch.randn(4, 96), 64)
    bad = torch.zeros(2, 16)
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="non-finite.*19"):
        bofrs.hadamard(bad)
    with pytest.raises(TypeError):
        bofrs.hadamard(torch.ones(16, dtype=torch.int32))


@pytest.mark.parametrize(("p", "n"), [(1, 4), (1, 8), (1, 16), (1, 32), (1, 64), (1, 256), (2, 16), (2, 64)])
def test_shipped_grids_regenerate_exactly(p: int, n: int) -> None:
    shipped = _grids.grid(p, n)
    fresh = _grids.generate(p, n)
    np.testing.assert_array_equal(shipped.points, fresh.points)
    assert shipped.mse == fresh.mse


@pytest.mark.slow
def test_shipped_256_point_plane_grid_regenerates_exactly() -> None:
    np.testing.assert_array_equal(_grids.grid(2, 256).points, _grids.generate(2, 256).points)


def test_grid_mse_matches_published_values_and_monte_carlo() -> None:
    assert abs(_grids.grid(1, 16).mse - 0.009497) < 0.01 * 0.009497  # Max 1960
    assert abs(_grids.grid(1, 8).mse - 0.03454) < 0.01 * 0.03454
    assert abs(_grids.grid(1, 4).mse - 0.1175) < 0.01 * 0.1175
    assert abs(_grids.grid(1, 32).mse - 0.002499) < 0.01 * 0.002499
    # 64 levels: Lloyd-Max iterated to a fixed point in float64 with scipy gives 0.00064424.
    assert abs(_grids.grid(1, 64).mse - 0.0006442) < 0.01 * 0.0006442
    mses = [_grids.grid(1, n).mse for n in (4, 8, 16, 32, 64, 256)]
    assert all(a > b for a, b in itertools.pairwise(mses))
    assert abs(_grids.grid(2, 256).mse - 0.0078) < 0.02 * 0.0078
    # Monte-Carlo with a brute-force nearest point.
    for p, n in [(1, 16), (1, 32), (1, 64), (2, 64), (2, 256)]:
        g = _grids.grid(p, n)
        z = RNG(n).standard_normal((100_000, p))
        pts = g.points.astype(np.float64)
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2, minimized over c without a (samples, n, p) array.
        d = (z**2).sum(1) + ((pts**2).sum(1)[None, :] - 2 * z @ pts.T).min(1)
        assert abs(d.mean() / p - g.mse) < 0.02 * g.mse, (p, n)


def pack_reference(w: np.ndarray, g: int, grid: _grids.Grid) -> np.ndarray:
    """Rotated reconstruction (rows x padded) by the HIGGS rule, in numpy."""
    rows, cols = w.shape
    padded = -(-cols // g) * g
    x = np.zeros((rows, padded), dtype=np.float32)
    x[:, :cols] = w
    u = hadamard_reference(x, g).astype(np.float32).reshape(rows, -1, g)
    rms = np.sqrt((u.astype(np.float64) ** 2).mean(-1)).astype(np.float32)
    s = torch.from_numpy(rms).half().float().numpy()  # float16 storage, rounded first
    inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    z = (u * inv[..., None]).astype(np.float32)
    pts = grid.points
    if grid.p == 1:
        t = ((pts[1:, 0] + pts[:-1, 0]) * np.float32(0.5)).astype(np.float32)
        code = (z[..., None] > t).sum(-1)
        q = pts[code, 0]
    else:
        pairs = z.reshape(rows, -1, g // 2, 2).astype(np.float64)
        d = ((pairs[..., None, :] - pts.astype(np.float64)) ** 2).sum(-1)
        q = pts[d.argmin(-1)].reshape(z.shape)
    return (q * s[..., None]).reshape(rows, padded)


@pytest.mark.parametrize(("bits", "p"), [(4, 1), (4, 2), (2, 1), (3, 2), (2, 2), (5, 1), (6, 1), (8, 1)])
@pytest.mark.parametrize(("cols", "g"), [(256, 64), (100, 64), (130, 16)])
def test_pack_matches_numpy_reference(bits: int, p: int, cols: int, g: int) -> None:
    w = (RNG(cols + bits).standard_normal((7, cols)) * 0.02).astype(np.float32)
    w[3] = 0.0  # an all-zero row: zero scales, exact zeros back
    packed = bofrs.pack_higgs(torch.from_numpy(w), bits, p, g)
    ref = pack_reference(w, g, packed.grid)
    np.testing.assert_array_equal(packed.rotated(torch.float32).numpy(), ref)
    back = packed.dequantize(torch.float32).numpy()
    np.testing.assert_allclose(back, hadamard_reference(ref, g)[:, :cols], atol=1e-6)
    assert np.all(back[3] == 0)


def test_relative_error_equals_grid_mse_on_gaussian_and_heavy_tailed_weights() -> None:
    gaussian = torch.randn(256, 2048, generator=torch.Generator().manual_seed(0))
    heavy = torch.distributions.StudentT(3.0).sample((256, 2048))
    for w in (gaussian, heavy):
        for bits, p in [(4, 1), (4, 2), (3, 2), (5, 1), (6, 1)]:
            packed = bofrs.pack_higgs(w, bits, p, 1024)
            rel = float(((packed.dequantize() - w) ** 2).sum() / (w**2).sum())
            assert abs(rel - packed.grid.mse) < 0.05 * packed.grid.mse, (bits, p, rel)


def test_rotated_form_serves_rotated_activations() -> None:
    w = torch.randn(32, 200)
    packed = bofrs.pack_higgs(w, 4, 2, 64)
    x = torch.randn(5, 200)
    x_padded = torch.nn.functional.pad(x, (0, 256 - 200))
    rotated_x = bofrs.hadamard(x_padded, 64)
    torch.testing.assert_close(rotated_x @ packed.rotated().T, x @ packed.dequantize().T, atol=1e-4, rtol=1e-4)


def test_bits_per_weight_and_dtypes() -> None:
    w = torch.randn(64, 1024, dtype=torch.bfloat16)
    packed = bofrs.pack_higgs(w, 4, 2, 1024)
    assert packed.bits_per_weight == pytest.approx(4 + 16 / 1024)
    assert packed.dequantize().dtype == torch.bfloat16 and packed.dequantize().shape == w.shape
    assert bofrs.pack_higgs(w.half(), 4, 1, 512).dequantize(torch.float32).dtype == torch.float32
    three_d = bofrs.pack_higgs(torch.randn(2, 3, 64), 4, 1, 64)
    assert three_d.dequantize().shape == (2, 3, 64)


def test_pack_higgs_bad_input() -> None:
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="bits"):
        bofrs.pack_higgs(w, 7, 1)
    with pytest.raises(ValueError, match="bits=5 p=1"):  # the message lists the choices
        bofrs.pack_higgs(w, 5, 2)
    with pytest.raises(ValueError, match="p=3"):
        bofrs.pack_higgs(w, 4, 3)
    with pytest.raises(ValueError, match="group_size"):
        bofrs.pack_higgs(w, 4, 2, 100)
    with pytest.raises(TypeError, match="group_size"):
        bofrs.pack_higgs(w, 4, 2, 64.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale_dtype"):
        bofrs.pack_higgs(w, 4, 2, 64, scale_dtype="int8")
    bad = w.clone()
    bad[2, 17] = math.inf
    with pytest.raises(ValueError, match=str(2 * 64 + 17)):
        bofrs.pack_higgs(bad, 4, 2, 64)
    with pytest.raises(TypeError):
        bofrs.pack_higgs(torch.ones(4, 64, dtype=torch.int8))


def brute_force(alphas, sizes, menu, budget, resolution):  # type: ignore[no-untyped-def]
    names = list(menu)
    total = sum(sizes)
    unit = total * resolution
    capacity = math.floor(budget / resolution + 1e-9)
    best = math.inf
    for pick in itertools.product(range(len(names)), repeat=len(alphas)):
        cost = sum(math.ceil(sizes[l] * menu[names[q]][0] / unit - 1e-9) for l, q in enumerate(pick))
        if cost <= capacity:
            best = min(best, sum(alphas[l] * menu[names[q]][1][l] for l, q in enumerate(pick)))
    return best


def test_allocation_equals_brute_force() -> None:
    rng = RNG(0)
    for trial in range(40):
        layers, formats = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        alphas = rng.uniform(0, 10, layers).tolist()
        sizes = rng.integers(1000, 100_000, layers).tolist()
        menu = {
            f"f{k}": (float(rng.choice([2.0, 3.0, 4.125, 4.25, 4.5, 8.0, 16.0])), rng.uniform(0, 0.1, layers).tolist())
            for k in range(formats)
        }
        budget = float(rng.uniform(2.0, 10.0))
        expect = brute_force(alphas, sizes, menu, budget, 1e-3)
        if math.isinf(expect):
            with pytest.raises(ValueError, match="budget"):
                bofrs.allocate(alphas, sizes, menu, budget)
            continue
        got = bofrs.allocate(alphas, sizes, menu, budget)
        assert got.predicted_increase == pytest.approx(expect, rel=1e-12, abs=1e-15), trial
        assert got.average_bits <= budget + 1e-12
        assert len(got.choices) == layers


def test_allocation_prefers_cheap_errors_on_insensitive_layers() -> None:
    menu = {"4bit": (4.0, [0.01, 0.01]), "8bit": (8.0, [0.0001, 0.0001])}
    got = bofrs.allocate([100.0, 1.0], [1000, 1000], menu, 6.0)
    assert got.choices == ("8bit", "4bit") and got.average_bits == 6.0


def test_allocation_bad_input() -> None:
    menu = {"a": (4.0, [0.1, 0.1])}
    with pytest.raises(ValueError, match="layer_sizes"):
        bofrs.allocate([1.0, 1.0], [10], menu, 4.0)
    with pytest.raises(ValueError, match="errors"):
        bofrs.allocate([1.0, 1.0], [10, 10], {"a": (4.0, [0.1])}, 4.0)
    with pytest.raises(ValueError, match="budget"):
        bofrs.allocate([1.0, 1.0], [10, 10], menu, 3.0)
    with pytest.raises(ValueError, match="alphas"):
        bofrs.allocate([-1.0, 1.0], [10, 10], menu, 4.0)
    with pytest.raises(TypeError, match="menu"):
        bofrs.allocate([1.0, 1.0], [10, 10], {}, 4.0)


def test_pack_dispatches_higgs() -> None:
    w = torch.randn(16, 256)
    via_pack = bofrs.pack(w, "higgs", bits=4, p=2, group_size=128, scale_dtype="float16")
    direct = bofrs.pack_higgs(w, 4, 2, 128, scale_dtype="float16")
    assert isinstance(via_pack, bofrs.HiggsTensor)
    assert torch.equal(via_pack.codes, direct.codes) and torch.equal(via_pack.scales, direct.scales)
    with pytest.raises(ValueError, match="higgs"):
        bofrs.pack(w, "higgs", opq=0.95)


def test_higgs_tensors_round_trip_through_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file as raw_save

    w = torch.randn(24, 200, dtype=torch.bfloat16)
    tensors = {
        "a": bofrs.pack_higgs(w, 4, 2, 64),
        "b": bofrs.pack_higgs(w, 3, 1, 128, scale_dtype="float32"),
        "c": bofrs.pack_higgs(w, 5, 1, 16),
        "d": bofrs.pack_higgs(w, 6, 1, 32),
        "bias": torch.ones(3),
    }
    path = tmp_path / "h.safetensors"
    bofrs.save_file(tensors, path)
    loaded = bofrs.load_file(path)
    for key in ("a", "b", "c", "d"):
        got, want = loaded[key], tensors[key]
        assert isinstance(got, bofrs.HiggsTensor) and isinstance(want, bofrs.HiggsTensor)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.dequantize(), want.dequantize())
        assert got.group_size == want.group_size and got.shape == want.shape
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
        raw = {k: f.get_tensor(k) for k in f.keys()}
    assert header["bofrs.format_version"] == "2"

    def rewrite(mutate) -> None:  # type: ignore[no-untyped-def]
        manifest = json.loads(header["bofrs.manifest"])
        mutate(manifest)
        text = json.dumps(manifest, separators=(",", ":"))
        raw_save(raw, str(path), metadata={**header, "bofrs.manifest": text,
                                           "bofrs.manifest_crc32": str(zlib.crc32(text.encode()))})

    def bad_grid(m) -> None:  # type: ignore[no-untyped-def]
        m["a"]["grid"]["points"] = m["a"]["grid"]["points"][:-2]

    def bad_group(m) -> None:  # type: ignore[no-untyped-def]
        m["a"]["group_size"] = 48

    for mutate, match in ((bad_grid, "grid"), (bad_group, "group_size")):
        rewrite(mutate)
        with pytest.raises(bofrs.FormatError, match=match):
            bofrs.load_file(path)
    header["bofrs.format_version"] = "1"
    rewrite(lambda m: None)
    with pytest.raises(bofrs.FormatError, match="version 2"):
        bofrs.load_file(path)


def test_hadamard_scalar_and_empty() -> None:
    assert bofrs.hadamard(torch.zeros(0, 64)).shape == (0, 64)
    with pytest.raises(ValueError, match="dimension"):
        bofrs.hadamard(torch.tensor(1.0))
