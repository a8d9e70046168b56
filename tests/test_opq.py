"""OPQ outliers: bofrs against the numpy reference, edge blocks, rates, errors, files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bofrs
import reference
import reference_opq
from checks import assert_same_bits, resolve
from published_codebooks import TABLE6

#: BOF4-S (MSE), I = 64: the published levels (formats.md, Table 6).
BOF4S = bofrs.Codebook("bof4s", TABLE6["mse", "signed_absmax"], "signed_absmax")
SIGNED_INT4 = bofrs.Codebook("signed_int4", bofrs.codebook("int4").levels, "signed_absmax")
CODEBOOKS = ("nf4", "af4", "fp4", "int4", BOF4S, SIGNED_INT4)
NUMPY_INDEX = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}


def heavy(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, df: float = 4.0) -> torch.Tensor:
    """Student-t weights with a magnitude that changes every 37 values (within float16 range)."""
    rng = np.random.default_rng(seed)
    magnitude = np.repeat(10.0 ** rng.uniform(-2, 2, size=n // 37 + 1), 37)[:n]
    return torch.from_numpy(rng.standard_t(df, size=n) * magnitude).to(dtype)


def expected(tensor: torch.Tensor, codebook: str | bofrs.Codebook, block_size: int, scale_dtype: str,
             q: float | None, outlier_dtype: str = "bfloat16") -> reference_opq.OpqEncoded:
    book = resolve(codebook, block_size)
    return reference_opq.encode(tensor, book.levels, block_size, book.normalization, scale_dtype, q, outlier_dtype)


def assert_matches(packed: bofrs.PackedTensor, want: reference_opq.OpqEncoded,
                   dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """Same outliers, codes, scales and reconstruction (bit for bit)."""
    out = packed.outliers
    assert out is not None
    assert np.array_equal(out.indices.numpy().astype(np.int64), want.outlier_indices), "outlier indices"
    assert_same_bits(out.values.float(), torch.from_numpy(want.outlier_values), "outlier values")
    assert np.array_equal(packed.codes.numpy(), want.codes), "codes"
    assert_same_bits(packed.decoded_scales(), torch.from_numpy(want.scales), "scales")
    if want.scale_codes is not None:
        assert packed.scale_scales is not None
        assert np.array_equal(packed.scales.numpy(), want.scale_codes), "dq8 codes"
        assert_same_bits(packed.scale_scales, torch.from_numpy(want.scale_params), "dq8 params")
    values = reference_opq.decode(want, packed.codebook.levels, packed.block_size)
    for dtype in dtypes:
        assert_same_bits(packed.dequantize(dtype), reference.decode_as(values, dtype, packed.shape), str(dtype))


@pytest.mark.parametrize("codebook", CODEBOOKS, ids=lambda c: c if isinstance(c, str) else c.name)
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "dq8"])
def test_matches_reference_every_codebook(codebook: str | bofrs.Codebook, scale_dtype: str, isa: str) -> None:
    w = heavy(64 * 300 + 45, seed=1)
    want = expected(w, codebook, 64, scale_dtype, 0.95)
    assert want.outlier_indices.size > 100
    packed = bofrs.pack(w, codebook, 64, scale_dtype=scale_dtype, opq=0.95, isa=isa)
    assert_matches(packed, want, (torch.float32, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("block_size", [16, 32, 128, 4096])
@pytest.mark.parametrize("q", [0.5, 0.95, 0.999])
def test_matches_reference_dtypes_block_sizes(dtype: torch.dtype, block_size: int, q: float, isa: str) -> None:
    n = 3 * block_size + 17 if block_size < 4096 else 9000
    w = heavy(n, dtype, seed=block_size)
    for codebook in ("nf4", BOF4S):
        want = expected(w, codebook, block_size, "bfloat16", q)
        packed = bofrs.pack(w, codebook, block_size, opq=q, isa=isa)
        assert_matches(packed, want, (dtype,) if dtype != torch.float64 else (torch.float32,))


@pytest.mark.parametrize("outlier_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32", "dq8"])
def test_outlier_and_scale_storage_options(outlier_dtype: str, scale_dtype: str) -> None:
    w = heavy(5000, torch.float32, seed=3) * 0.01  # outliers within float16 range
    want = expected(w, "nf4", 64, scale_dtype, 0.9, outlier_dtype)
    packed = bofrs.pack(w, "nf4", 64, scale_dtype=scale_dtype, opq=0.9, outlier_dtype=outlier_dtype)
    assert packed.outliers is not None and packed.outliers.dtype == getattr(torch, outlier_dtype)
    assert_matches(packed, want)


def test_edge_blocks(isa: str) -> None:
    """All outliers, all zero, constant, a lone value in the tail; every block of 16."""
    rng = np.random.default_rng(5)
    blocks = [
        100.0 + rng.standard_normal(16) * 1e-3,  # tiny spread far from 0: every value an outlier
        np.zeros(16),  # no spread: none
        np.full(16, -2.5),  # constant: none
        np.r_[rng.standard_normal(15), 1e3],  # one clear outlier at the end
        np.r_[-1e3, rng.standard_normal(15)],  # ...and at the start (the shift value)
        np.r_[1e3, -1e3, rng.standard_normal(14)],  # two equal magnitudes mask each other
        rng.standard_normal(16),
    ]
    values = np.concatenate([*blocks, [7.0]])  # partial tail of one value: no outlier
    w = torch.from_numpy(values).float()
    for codebook in ("nf4", BOF4S):
        want = expected(w, codebook, 16, "bfloat16", 0.95)
        packed = bofrs.pack(w, codebook, 16, opq=0.95, isa=isa)
        assert_matches(packed, want)
        idx = set(want.outlier_indices.tolist())
        assert set(range(16)) <= idx, "all-outlier block"
        assert not idx & set(range(16, 48)), "zero and constant blocks have none"
        assert {63, 64} <= idx and values.size - 1 not in idx
        # sigma of the masking block is ~365, t(16, 0.95) ~ 3.0: 1e3 is within the limit.
        assert not idx & {80, 81}
        assert float(packed.decoded_scales()[0]) == 0.0, "a block of outliers has scale 0"
        restored = packed.dequantize(torch.float32)
        assert torch.equal(restored[:16], packed.outliers.values[:16].float()), "written back exactly"
    # Two-value tail: sigma > 0 but |w| <= sigma * t(2, q) always holds for two values.
    two = bofrs.pack(torch.tensor([0.0, 1.0, 3.0] * 6 + [5.0, -5.0]), "nf4", 16, opq=0.5)
    assert two.outliers is not None and not (two.outliers.indices.long() >= 16).any()


def test_one_block_tensors(isa: str) -> None:
    for n in (2, 3, 16, 64):
        w = torch.tensor(np.r_[np.linspace(-1, 1, n - 1), 50.0]).float()
        want = expected(w, "nf4", 64, "bfloat16", 0.9)
        packed = bofrs.pack(w, "nf4", 64, opq=0.9, isa=isa)
        assert_matches(packed, want)
        if n >= 16:
            assert want.outlier_indices.tolist() == [n - 1]


def test_values_one_ulp_around_the_threshold(isa: str) -> None:
    """A value one float32 step above the block's own threshold is an outlier, one step below
    is not (the threshold moves with the value; found by fixed-point iteration)."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal(64).astype(np.float32)
    base[5] = 0.0
    t = reference_opq.threshold(64, 0.95)

    def limit(v: np.float32) -> float:
        block = base.astype(np.float64)
        block[5] = v
        return float(block.std(ddof=1) * t)

    for direction in (np.inf, -np.inf):
        v = np.float32(3.0)
        for _ in range(200):
            nxt = np.nextafter(np.float32(limit(v)), np.float32(direction))
            if nxt == v:
                break
            v = nxt
        block = base.copy()
        block[5] = v
        w = torch.from_numpy(np.tile(block, 3))
        want = expected(w, "nf4", 64, "bfloat16", 0.95)
        is_outlier = abs(float(v)) > limit(v)
        assert is_outlier == (direction > 0), "the construction puts v just beyond / within"
        assert (5 in want.outlier_indices.tolist()) == is_outlier
        assert_matches(bofrs.pack(w, "nf4", 64, opq=0.95, isa=isa), want)


def test_gaussian_outlier_rate_matches_the_rule() -> None:
    """Expected outliers per block on N(0, 1): with the true sigma the rule flags a block's
    maximum with probability 1 - q, i.e. I (1 - q^(1/I)) = -ln q ~ 0.0513 values per block at
    q = 0.95. With the *sample* sigma the flagged value inflates sigma itself, so the rate is
    lower; it is estimated here by Monte Carlo of the reference rule on independent data, and
    bofrs must agree within Poisson noise (5 sigma)."""
    q, bs = 0.95, 64
    w = torch.randn(1 << 21, generator=torch.Generator().manual_seed(0))
    packed = bofrs.pack(w, "nf4", bs, opq=q)
    assert packed.outliers is not None
    blocks = w.numel() // bs
    got = packed.outliers.count / blocks
    sample = np.random.default_rng(1).standard_normal(1 << 22).astype(np.float32)
    mc_count = int(reference_opq.outlier_mask(sample, bs, q).sum())
    mc = mc_count / (sample.size // bs)
    noise = math.sqrt(mc_count) / (sample.size // bs) + math.sqrt(packed.outliers.count) / blocks
    assert abs(got - mc) < 5 * noise, (got, mc)
    known_sigma = bs * (1 - q ** (1 / bs))
    assert abs(known_sigma + math.log(q)) < 2e-3
    assert 0.4 * known_sigma < got < known_sigma, (got, known_sigma)
    assert bofrs.quantization_error(w, packed)["outlier_fraction"] == pytest.approx(got / bs)


def test_opq_clearly_lowers_the_error_on_heavy_tails() -> None:
    w = torch.from_numpy(np.random.default_rng(2).standard_t(4, size=1 << 20)).float()
    base = bofrs.quantization_error(w, bofrs.pack(w, BOF4S, 64))
    opq = bofrs.quantization_error(w, bofrs.pack(w, BOF4S, 64, opq=0.95))
    assert opq["mse"] < 0.7 * base["mse"], (opq["mse"], base["mse"])
    assert opq["bits_per_weight"] > base["bits_per_weight"]
    assert 0 < opq["outlier_fraction"] < 0.02


def test_exact_bits_per_weight_and_index_dtype() -> None:
    for n, index_dtype in ((1000, torch.uint16), (65536, torch.uint16), (65537, torch.uint32)):
        w = heavy(n, seed=n)
        packed = bofrs.pack(w, "nf4", 64, opq=0.95)
        out = packed.outliers
        assert out is not None and out.indices.dtype == index_dtype and out.count > 0
        blocks = -(-n // 64)
        nbytes = (n + 1) // 2 + 2 * blocks + out.count * (2 + out.indices.element_size())
        assert packed.nbytes == nbytes and packed.bits_per_weight == 8 * nbytes / n
        dq = bofrs.pack(w, "nf4", 64, opq=0.95, scale_dtype="dq8")
        groups = -(-blocks // 256)
        assert dq.nbytes == (n + 1) // 2 + blocks + 8 * groups + out.nbytes
    from bofrs.formats.blockwise.outliers import index_dtype as pick

    assert pick(1 << 16) == torch.uint16 and pick((1 << 16) + 1) == torch.uint32
    assert pick(1 << 32) == torch.uint32 and pick((1 << 32) + 1) == torch.uint64
    empty = bofrs.pack(torch.empty(0), "nf4", 64, opq=0.95)
    assert empty.outliers is not None and empty.outliers.count == 0 and empty.bits_per_weight == 4.25


def test_threshold_matches_scipy() -> None:
    for n in (1, 2, 16, 64, 100, 4096):
        for q in (1e-6, 0.05, 0.5, 0.95, 0.99, 0.999999):
            assert bofrs.opq_threshold(n, q) == pytest.approx(reference_opq.threshold(n, q), rel=1e-13)


@pytest.mark.parametrize("opq", [0.0, 1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_bad_quantile_is_a_value_error(opq: float) -> None:
    with pytest.raises(ValueError, match="opq"):
        bofrs.pack(torch.randn(64), "nf4", opq=opq)


@pytest.mark.parametrize("opq", ["0.9", True, [0.9], 1j])
def test_quantile_of_the_wrong_type_is_a_type_error(opq: object) -> None:
    with pytest.raises(TypeError, match="opq"):
        bofrs.pack(torch.randn(64), "nf4", opq=opq)  # type: ignore[arg-type]


def test_bad_outlier_dtype() -> None:
    with pytest.raises(ValueError, match="outlier_dtype"):
        bofrs.pack(torch.randn(64), opq=0.9, outlier_dtype="float32")
    with pytest.raises(TypeError, match="outlier_dtype"):
        bofrs.pack(torch.randn(64), opq=0.9, outlier_dtype=16)  # type: ignore[arg-type]


def test_float16_outliers_beyond_range_are_refused() -> None:
    w = torch.randn(256)
    w[70] = 1e6
    with pytest.raises(ValueError, match=r"outlier_dtype.*flat index 70"):
        bofrs.pack(w, "nf4", 64, opq=0.95, outlier_dtype="float16")
    packed = bofrs.pack(w, "nf4", 64, opq=0.95)  # bfloat16 holds it
    assert packed.outliers is not None and 70 in packed.outliers.indices.long().tolist()
    # float16 weights near the limit with bfloat16 outliers: never rounded up to infinity.
    h = torch.randn(256).half()
    h[3] = 65504.0
    restored = bofrs.pack(h, "nf4", 64, opq=0.95).dequantize()
    assert torch.isfinite(restored).all() and float(restored[3]) == 65280.0


def test_torch_fallback_decoder_matches_native() -> None:
    w = heavy(10_000, torch.bfloat16, seed=9)
    for scale_dtype in ("bfloat16", "dq8"):
        for codebook in ("nf4", BOF4S):
            packed = bofrs.pack(w, codebook, 64, scale_dtype=scale_dtype, opq=0.95)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                native = packed.dequantize(dtype).reshape(-1)
                assert_same_bits(packed._dequantize_torch(dtype), native, f"{scale_dtype} {dtype}")


def test_to_device_keeps_outliers() -> None:
    packed = bofrs.pack(heavy(1000), "nf4", 64, opq=0.95)
    moved = packed.to("meta")
    assert moved.outliers is not None and moved.outliers.indices.device.type == "meta"
    assert moved.outliers.count == packed.outliers.count  # type: ignore[union-attr]
    assert packed.to("cpu") is packed
    assert "outliers=" in repr(packed) and "Outliers(count=" in repr(packed.outliers)


def test_file_round_trip(tmp_path: Path) -> None:
    tensors = {
        "a": bofrs.pack(heavy(70_000, torch.bfloat16), BOF4S, 64, opq=0.95, scale_dtype="dq8"),
        "b": bofrs.pack(heavy(999, torch.float16, seed=2), "nf4", 32, opq=0.99, outlier_dtype="float16"),
        "c": bofrs.pack(torch.zeros(64), "nf4", 64, opq=0.95),
        "d": bofrs.pack(heavy(100), "af4", 64),
    }
    path = tmp_path / "opq.safetensors"
    bofrs.save_file(tensors, path)
    loaded = bofrs.load_file(path)
    for name, packed in tensors.items():
        back = loaded[name]
        assert isinstance(back, bofrs.PackedTensor)
        assert back.scale_format == packed.scale_format
        assert_same_bits(back.dequantize(), packed.dequantize(), name)
        assert back.nbytes == packed.nbytes
        if packed.outliers is None:
            assert back.outliers is None
        else:
            assert back.outliers is not None and back.outliers.q == packed.outliers.q
            assert torch.equal(back.outliers.indices, packed.outliers.indices)


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "dq8"])
def test_non_finite_input_is_refused_with_its_index(scale_dtype: str, isa: str) -> None:
    w = heavy(10_000, seed=4)
    w[7777] = float("nan")
    w[9000] = float("inf")
    with pytest.raises(ValueError, match="flat index 7777"):
        bofrs.pack(w, "nf4", 64, opq=0.95, scale_dtype=scale_dtype, isa=isa)


def test_numpy_inputs_and_quantile() -> None:
    values = heavy(3000, seed=6).numpy()
    packed = bofrs.pack(values, "nf4", 64, opq=np.float64(0.95))
    assert_matches(packed, expected(torch.from_numpy(values), "nf4", 64, "bfloat16", 0.95))
    assert packed.outliers is not None and packed.outliers.q == 0.95


def llm_mix(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Student-t(4) rows with a few large outlier channels (columns scaled by 20)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_t(4, (rows, cols))
    values[:, rng.choice(cols, max(1, cols // 64), replace=False)] *= 20.0
    return torch.from_numpy(values).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [64, 128, 256, 4096])
def test_fast_paths_match_reference_on_heavy_tails(dtype: torch.dtype, block_size: int, isa: str) -> None:
    """Block sizes that are multiples of 64 take the vector filter, the f32 bracket of the limit
    and the branch-free outlier collection: same outliers as the reference, odd sizes and tails."""
    for w in (heavy(block_size * 40 + 17, dtype, seed=block_size), llm_mix(37, 3 * block_size + 5, dtype, 9)):
        for codebook in ("nf4", BOF4S):
            for scale_dtype in ("bfloat16", "dq8"):
                want = expected(w, codebook, block_size, scale_dtype, 0.95)
                assert want.outlier_indices.size > 10
                packed = bofrs.pack(w, codebook, block_size, scale_dtype=scale_dtype, opq=0.95, isa=isa)
                assert_matches(packed, want, (dtype,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_edge_blocks_of_64(dtype: torch.dtype, isa: str) -> None:
    """All outliers, all zero, many outliers in one block, ties, signed ties, a one-block tensor."""
    rng = np.random.default_rng(12)
    many = rng.standard_normal(64) * 0.01
    many[::13] = [50.0, -50.0, 50.0, -50.0, 50.0]  # five outliers in one mask word (more than four)
    tie = rng.standard_normal(64)
    tie[[3, 40]] = [30.0, -30.0]  # two equal magnitudes: both outliers or neither
    signed_tie = rng.standard_normal(64) * 0.1
    signed_tie[[7, 20]] = [-1.5, 1.5]  # the kept maximum's sign: the first one wins
    signed_tie[50] = 40.0
    blocks = [
        100.0 + rng.standard_normal(64) * 1e-3,  # every value an outlier
        np.zeros(64),
        np.full(64, 3.0),
        many,
        tie,
        signed_tie,
        np.r_[1e3, rng.standard_normal(63)],  # outlier at the shift position
        rng.standard_normal(64),
    ]
    values = np.concatenate(blocks)
    for w in (torch.from_numpy(values).to(dtype), torch.from_numpy(values[-128:-64]).to(dtype)):
        for codebook in ("nf4", BOF4S):
            want = expected(w, codebook, 64, "bfloat16", 0.95)
            assert_matches(bofrs.pack(w, codebook, 64, opq=0.95, isa=isa), want, (dtype,))
    want = expected(torch.from_numpy(values).float(), BOF4S, 64, "bfloat16", 0.95)
    idx = set(want.outlier_indices.tolist())
    assert set(range(64)) <= idx and not idx & set(range(64, 192))
    assert {192 + i for i in range(0, 64, 13)} <= idx
    assert {259, 296} <= idx or not {259, 296} & idx
    assert 370 in idx and not {327, 340} & idx
    assert float(want.scales[5]) < 0, "signed scale of the first kept maximum"


def test_first_error_in_flat_order(isa: str) -> None:
    """An outlier beyond float16 in an earlier block wins over a NaN in a later one, and the other
    way round (the core finds them in different passes)."""
    w = torch.randn(64 * 20)
    w[64 * 3 + 5] = 1e6
    w[64 * 9 + 2] = float("nan")
    with pytest.raises(ValueError, match=r"outlier_dtype.*flat index 197"):
        bofrs.pack(w, "nf4", 64, opq=0.95, outlier_dtype="float16", isa=isa)
    w[64 * 9 + 2] = 0.0
    w[64 * 2 + 1] = float("inf")
    with pytest.raises(ValueError, match="flat index 129"):
        bofrs.pack(w, "nf4", 64, opq=0.95, outlier_dtype="float16", isa=isa)


def test_native_returns_the_index_dtype() -> None:
    """The native call emits indices in the final type (no conversion in Python)."""
    from bofrs import _native
    from bofrs._inputs import flatten_for_native

    for n, want in ((1 << 16, np.uint16), ((1 << 16) + 1, np.uint32)):
        flat = flatten_for_native(heavy(n, seed=13))
        book = resolve("nf4", 64)
        *_, indices, values = _native.pack_ext(
            flat.data, flat.element, book.levels, 64, book.normalization, "bfloat16", 0.95
        )
        assert indices.dtype == want and indices.size == values.size > 0
        assert (np.diff(indices.astype(np.int64)) > 0).all()
