"""GPU correctness of the CUDA kernels (marker ``gpu``: needs CuPy and a CUDA device).

Against the CPU path (bit for bit where the CPU semantics are exact: dequantize, Hadamard,
HIGGS dequantize) and a float64 numpy reference (products, with an fp32-accumulation bound),
on fresh random inputs, odd sizes, every format, outputs poisoned with NaN before each run.
Run with ``python -m pytest -m gpu tests/test_cuda.py``.
"""

from __future__ import annotations

import importlib.util
import os

import bofrs
import numpy as np
import pytest
import torch
from bofrs import _cuda
from bofrs._cuda import _blockwise, _hadamard, _higgs, _sources
from bofrs.nn import HiggsLinear, QuantLinear

HAS_CUDA = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
if os.environ.get("BOFRS_REQUIRE_GPU") == "1" and not HAS_CUDA:
    # benches/gpu_check.sh sets this: on the GPU machine a skip would read as a pass.
    raise RuntimeError("BOFRS_REQUIRE_GPU=1 but torch sees no CUDA device or CuPy is missing")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CuPy"),
]

DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODEBOOKS = ("nf4", "af4", "fp4", "int4", "bof4", "bof4s")
SCALES = ("bfloat16", "float16", "float32", "dq8")
#: Relative rounding of one output value per dtype.
ROUND = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh inputs each run, reproducible from the printed seed."""
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    print(f"{request.node.name}: seed {seed}")
    return np.random.default_rng(seed)


def weight(g: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Heavy-tailed weights with some exact zeros and one zero block (adversarial values)."""
    w = g.standard_t(5, size=shape).astype(np.float32) * 0.02
    flat = w.reshape(-1)
    flat[g.integers(0, flat.size, size=max(1, flat.size // 50))] = 0.0
    flat[: min(64, flat.size)] = 0.0
    return torch.from_numpy(w).to(dtype)


def poison_allocator(nbytes: int) -> None:
    """Fills the caching allocator's free blocks with NaN so that fresh outputs start as NaN."""
    junk = torch.full((max(nbytes // 4, 1) * 4,), float("nan"), device=DEV)
    del junk
    torch.cuda.synchronize()


def nan_like(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype, device=DEV)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
    assert not torch.isnan(a).any(), f"{what}: NaN left in the output"
    if a.dtype in (torch.bfloat16, torch.float16):
        a, e = a.view(torch.int16), e.view(torch.int16)
    elif a.dtype == torch.float32:
        a, e = a.view(torch.int32), e.view(torch.int32)
    diff = (a != e).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} values differ, first at {diff[0].tolist()}"


def assert_product_close(y: torch.Tensor, x: torch.Tensor, w64: np.ndarray, what: str,
                         *, cublas: bool = False) -> None:
    """``y ~ x @ W.T`` against float64: fp32 accumulation error (4e-5 of sum |x||w|) plus one
    output rounding; ``cublas`` (16-bit GEMMs, which may reduce in 16 bits) adds one 16-bit
    rounding of sum |x||w|. A wrong code, scale or order errs by the size of the result."""
    x64 = x.detach().cpu().double().numpy()
    want = x64 @ w64.T
    bound = np.abs(x64) @ np.abs(w64).T
    got = y.detach().cpu().double().numpy()
    assert not np.isnan(got).any(), f"{what}: NaN in the output"
    tol = (4e-5 + (ROUND[y.dtype] if cublas else 0.0)) * bound + ROUND[y.dtype] * np.abs(want) + 1e-30
    worst = np.max(np.abs(got - want) - tol)
    assert worst <= 0, f"{what}: max excess error {worst:.3e}"


def pack(w: torch.Tensor, codebook: str, block: int, scale: str) -> bofrs.PackedTensor:
    return bofrs.pack(w, codebook, block, scale_dtype=scale)


# --- dequantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shape,block", [((67, 96), 32), ((13, 37), 16), ((5, 1000), 64), ((3, 4096), 4096)])
def test_dequantize_is_bit_identical_to_cpu(request: pytest.FixtureRequest, codebook: str, scale: str,
                                           shape: tuple[int, int], block: int) -> None:
    g = rng(request)
    w = weight(g, shape, torch.bfloat16)
    cpu = pack(w, codebook, block, scale)
    gpu = cpu.to(DEV)
    assert gpu.codes.is_cuda and gpu.scales.is_cuda
    ops = gpu.cuda_operands()
    for dtype in DTYPES:
        out = _blockwise.dequantize_into(ops, nan_like(cpu.numel, dtype))
        assert_same_bits(out.view(shape), cpu.dequantize(dtype), f"{codebook}/{scale}/{dtype}")
        poison_allocator(cpu.numel * 4)
        assert_same_bits(gpu.dequantize(dtype), cpu.dequantize(dtype), f"dequantize {dtype}")
    # float64 reference: level * scale exactly, once rounded to float32.
    codes = np.stack([cpu.codes.numpy() >> 4, cpu.codes.numpy() & 15], axis=1).reshape(-1)[: cpu.numel]
    scales = cpu.decoded_scales().double().numpy().repeat(block)[: cpu.numel]
    ref = cpu.codebook.levels.astype(np.float64)[codes] * scales
    got = gpu.dequantize(torch.float32).cpu().double().numpy().reshape(-1)
    assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-24)


@pytest.mark.parametrize("outlier_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(61, 128), (300, 257), (700, 100)])
def test_opq_outliers_are_scattered_back(request: pytest.FixtureRequest, outlier_dtype: str,
                                         shape: tuple[int, int]) -> None:
    g = rng(request)
    w = weight(g, shape, torch.float32)
    cpu = bofrs.pack(w, "nf4", 64, opq=0.99, outlier_dtype=outlier_dtype)
    assert cpu.outliers is not None and cpu.outliers.count > 0
    gpu = cpu.to(DEV)
    for dtype in DTYPES:
        poison_allocator(cpu.numel * 4)
        assert_same_bits(gpu.dequantize(dtype), cpu.dequantize(dtype), f"opq {dtype}")
    for scale in ("dq8", "float16"):
        cpu2 = bofrs.pack(w, "bof4s", 64, scale_dtype=scale, opq=0.995)
        assert_same_bits(cpu2.to(DEV).dequantize(torch.bfloat16), cpu2.dequantize(torch.bfloat16), scale)


@pytest.mark.parametrize("rotation", [16, 64, 1024])
def test_rotated_dequantize_matches_cpu(request: pytest.FixtureRequest, rotation: int) -> None:
    g = rng(request)
    w = weight(g, (33, 2048), torch.bfloat16)
    cpu = bofrs.pack(w, "nf4", 64, rotation=rotation)
    gpu = cpu.to(DEV)
    for dtype in DTYPES:
        assert_same_bits(gpu.dequantize_rotated(dtype), cpu.dequantize_rotated(dtype), f"rot {dtype}")
        assert_same_bits(gpu.dequantize(dtype), cpu.dequantize(dtype), f"unrotated {dtype}")


def test_bad_parts_are_refused_before_launch() -> None:
    w = torch.randn(64, 64)
    gpu = bofrs.pack(w, "nf4", 64).to(DEV)
    bad = gpu.scales.clone()
    bad[3] = float("inf")
    with pytest.raises(ValueError, match="scales must be finite"):
        _blockwise.operands(gpu.codes, bad, None, False, gpu.codebook.levels, gpu.numel, 64)
    with pytest.raises(ValueError, match="codes"):
        _blockwise.operands(gpu.codes[1:], gpu.scales, None, False, gpu.codebook.levels, gpu.numel, 64)
    with pytest.raises(ValueError, match="on cuda"):
        _blockwise.operands(gpu.codes, gpu.scales.cpu(), None, False, gpu.codebook.levels, gpu.numel, 64)
    ops = gpu.cuda_operands()
    with pytest.raises(TypeError, match="x must be"):
        _blockwise.matvec(ops, torch.zeros(1, 64, dtype=torch.float64, device=DEV), 64, 64)
    with pytest.raises(ValueError, match="shape"):
        _blockwise.matvec(ops, torch.zeros(17, 64, device=DEV), 64, 64)
    with pytest.raises(ValueError, match="must be on"):
        _blockwise.matvec(ops, torch.zeros(1, 64), 64, 64)
    opq = bofrs.pack(w, "nf4", 64, opq=0.99).to(DEV)
    assert opq.outliers is not None
    idx = opq.outliers.indices.cpu().flip(0).to(DEV)
    with pytest.raises(ValueError, match="ascending"):
        _blockwise.operands(opq.codes, opq.scales, None, False, opq.codebook.levels, opq.numel, 64,
                            idx, opq.outliers.values)


# --- fused matvec and large batch --------------------------------------------------------------


@pytest.mark.parametrize("codebook,scale", [("nf4", "bfloat16"), ("af4", "float16"), ("fp4", "float32"),
                                            ("int4", "dq8"), ("bof4", "bfloat16"), ("bof4s", "dq8"),
                                            ("bof4s", "float16")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(203, 1152), (37, 6400)])
def test_fused_matvec_every_token_count(request: pytest.FixtureRequest, codebook: str, scale: str,
                                        dtype: torch.dtype, rows: int, cols: int) -> None:
    """Odd row counts; 36 chunks of 32 values per row (fewer than one per lane and load slot),
    and 200 (several loop iterations, a partial last one)."""
    g = rng(request)
    w = weight(g, (rows, cols), torch.float32)
    cpu = pack(w, codebook, 64, scale)
    w64 = cpu.dequantize(torch.float32).double().numpy()
    ops = cpu.to(DEV).cuda_operands()
    assert _blockwise.fusable(ops, rows, cols)
    for tokens in range(1, 17):
        x = torch.from_numpy(g.standard_normal((tokens, cols)).astype(np.float32)).to(dtype).to(DEV)
        poison_allocator(tokens * rows * 4)
        y = _blockwise.matvec(ops, x, rows, cols)
        assert y.dtype == dtype and y.shape == (tokens, rows)
        assert_product_close(y, x, w64, f"{codebook}/{scale}/{dtype}/{tokens} tokens")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("shape", [(96, 256), (130, 48), (7, 40)])
def test_quantlinear_on_cuda_matches_cpu(request: pytest.FixtureRequest, dtype: torch.dtype, tokens: int,
                                         shape: tuple[int, int]) -> None:
    """Fused (<= 16 tokens), large batch (workspace + cuBLAS), and weights the fused kernel
    does not take (cols % 32, cols % block): all against float64 and the CPU module."""
    g = rng(request)
    rows, cols = shape
    block = 16 if cols % 32 else 64
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight(g, shape, torch.float32))
    q = QuantLinear.from_linear(lin, "nf4", block)
    w64 = q.dequantize(torch.float32).double().numpy()
    x = torch.from_numpy(g.standard_normal((tokens, cols)).astype(np.float32)).to(dtype)
    cpu = q(x)
    qg = q.to(DEV)
    poison_allocator(tokens * rows * 4 + rows * cols * 4)
    with torch.no_grad():
        y = qg(x.to(DEV))
    assert y.dtype == dtype and y.shape == (tokens, rows)
    # Beyond the fused kernel (more tokens, or rows it does not take) the weight is decoded in
    # x.dtype for cuBLAS: one 16-bit rounding of each weight.
    fused = tokens <= _blockwise.MAX_FUSED_TOKENS and _blockwise.fusable(qg.packed.cuda_operands(), rows, cols)
    assert fused == (tokens <= 16 and shape == (96, 256))
    assert_product_close(y, x, w64, f"{shape}/{tokens}/{dtype}", cublas=not fused)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    scale = float(cpu.float().abs().max())
    torch.testing.assert_close(y.cpu().float(), cpu.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("feature", ["opq", "rotation", "opq+rotation", "dq8"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64])
def test_quantlinear_features_on_cuda(request: pytest.FixtureRequest, feature: str, tokens: int) -> None:
    g = rng(request)
    rows, cols = 77, 512
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight(g, (rows, cols), torch.float32))
    kw: dict[str, object] = {}
    if "opq" in feature:
        kw["opq"] = 0.99
    if "rotation" in feature:
        kw["rotation"] = 128
    if feature == "dq8":
        kw["scale_dtype"] = "dq8"
    q = QuantLinear.from_linear(lin, "bof4s", 64, **kw)  # type: ignore[arg-type]
    w64 = q.dequantize(torch.float32).double().numpy()
    x = torch.from_numpy(g.standard_normal((tokens, cols)).astype(np.float32))
    qg = q.to(DEV)
    for dtype in DTYPES:
        poison_allocator(tokens * rows * 4 + rows * cols * 4)
        with torch.no_grad():
            y = qg(x.to(dtype).to(DEV))
        assert y.dtype == dtype
        # Rotation and the OPQ correction run in float32; the bound covers the extra rounding.
        x64 = x.to(dtype).double().numpy()
        want = x64 @ w64.T
        bound = np.abs(x64) @ np.abs(w64).T
        err = np.abs(y.cpu().double().numpy() - want)
        extra = ROUND[dtype] if tokens > 16 else 0.0  # large batch: 16-bit cuBLAS on rotated x
        assert np.all(err <= (5e-4 + extra) * bound + ROUND[dtype] * np.abs(want) * 1.01 + 1e-30), feature


def test_backward_on_cuda_gives_the_input_gradient() -> None:
    q = QuantLinear.from_linear(torch.nn.Linear(128, 64), "nf4", 64).to(DEV)
    x = torch.randn(3, 128, device=DEV, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None
    w = q.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1), rtol=1e-4, atol=1e-5)


# --- Hadamard and HIGGS -------------------------------------------------------------------------


@pytest.mark.parametrize("log2n", list(range(4, 16)))
def test_hadamard_is_bit_identical_to_cpu(request: pytest.FixtureRequest, log2n: int) -> None:
    g = rng(request)
    n = 1 << log2n
    rows = max(1, 3 * 4096 // n)
    x = torch.from_numpy(g.standard_normal((rows, n)).astype(np.float32))
    cpu = bofrs.hadamard(x)
    for dtype in DTYPES:
        xd = x.to(dtype)
        out = nan_like(rows * n, dtype).view(rows, n)
        _hadamard.hadamard_groups(xd.to(DEV), n, out=out)
        assert_same_bits(out, bofrs.hadamard(xd), f"n={n} {dtype}")
    assert_same_bits(bofrs.hadamard(x.to(DEV)), cpu, "public")
    # float64 reference: H / sqrt(n), Sylvester order.
    if n <= 1024:
        h = np.array([[(-1) ** (i & j).bit_count() for j in range(n)] for i in range(n)], dtype=np.float64)
        ref = x.double().numpy() @ h / np.sqrt(n)
        assert np.allclose(cpu.double().numpy(), ref, rtol=0, atol=1e-5 * np.abs(x.numpy()).sum(1).max() / np.sqrt(n))


def test_hadamard_on_cuda_refuses_nan() -> None:
    x = torch.zeros(2, 64, device=DEV)
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match="flat index 69"):
        bofrs.hadamard(x)


HIGGS_GRIDS = [(4, 1), (4, 2), (2, 1), (3, 1), (3, 2), (2, 2), (5, 1), (6, 1), (8, 1)]


@pytest.mark.parametrize("bits,p", HIGGS_GRIDS)
@pytest.mark.parametrize("group,shape", [(64, (37, 200)), (1024, (9, 3000)), (16, (5, 48)), (4096, (3, 4096))])
def test_higgs_dequantize_is_bit_identical_to_cpu(request: pytest.FixtureRequest, bits: int, p: int,
                                                  group: int, shape: tuple[int, int]) -> None:
    g = rng(request)
    w = weight(g, shape, torch.float32)
    cpu = bofrs.pack_higgs(w, bits, p, group)
    gpu = cpu.to(DEV)
    for dtype in DTYPES:
        poison_allocator(shape[0] * shape[1] * 8)
        assert_same_bits(gpu.rotated(dtype), cpu.rotated(dtype), f"rotated {bits}b p{p} {dtype}")
        assert_same_bits(gpu.dequantize(dtype), cpu.dequantize(dtype), f"dequantize {bits}b p{p} {dtype}")


@pytest.mark.parametrize("bits,p", HIGGS_GRIDS)
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 40])
def test_higgs_linear_on_cuda(request: pytest.FixtureRequest, bits: int, p: int, tokens: int) -> None:
    g = rng(request)
    rows, cols, group = 45, 1000, 256
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight(g, (rows, cols), torch.float32))
    h = HiggsLinear.from_linear(lin, bits, p, group)
    ops = h.packed.to(DEV).cuda_operands()
    # One code holds p weights of `bits` bits each; the kernel takes byte-aligned code widths.
    expect_fused = bits * p in (2, 4, 8)
    assert (p, bits * p) in _sources.HIGGS_MATVEC_GRIDS or not expect_fused
    assert _higgs.fusable(ops) == expect_fused
    w_rot = h.packed.rotated(torch.float32).double().numpy()
    hg = h.to(DEV)
    for dtype in DTYPES:
        x = torch.from_numpy(g.standard_normal((tokens, cols)).astype(np.float32)).to(dtype)
        poison_allocator(tokens * rows * 4 + rows * 1024 * 4)
        with torch.no_grad():
            y = hg(x.to(DEV))
        x_rot = bofrs.hadamard(torch.nn.functional.pad(x.float(), (0, 1024 - cols)), group)
        assert_product_close(y, x_rot, w_rot, f"higgs {bits}b p{p} {tokens} {dtype}")
        assert y.dtype == dtype
        if 1 <= tokens <= 16 and expect_fused:
            fused = _higgs.matvec(ops, x_rot.to(DEV))
            assert_product_close(fused, x_rot, w_rot, "fused")


def test_missing_cupy_message_names_the_extra() -> None:
    assert issubclass(_cuda.CudaKernelsUnavailable, ImportError)
    assert "bofrs[cuda" in _cuda._runtime.INSTALL_HINT


def test_kernels_run_on_torchs_current_stream() -> None:
    """A product on a side stream is ordered after work already queued there."""
    q = QuantLinear.from_linear(torch.nn.Linear(4096, 4096, bias=False), "nf4", 64).to(DEV)
    side = torch.cuda.Stream()
    x = torch.zeros(1, 4096, device=DEV)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # type: ignore[no-untyped-call]  # keeps the side stream busy
        x.fill_(1.0)
        with torch.no_grad():
            y = q(x)
    side.synchronize()
    w = q.dequantize(torch.float32)
    torch.testing.assert_close(y, w.sum(1, keepdim=True).T, rtol=1e-4, atol=1e-4)
