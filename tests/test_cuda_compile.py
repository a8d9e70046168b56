"""Every CUDA kernel variant the glue compiles at run time builds with NVRTC for sm_80 and
sm_90, with no error and no warning (ptxas register spills included). No GPU, driver or CuPy
needed: libnvrtc comes from PyPI (nvidia-cuda-nvrtc). The sources and options are the ones
bofrs._cuda passes to CuPy."""

from __future__ import annotations

import platform
import re
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bofrs._cuda import _sources
from nvrtc import Nvrtc, find_nvrtc

ARCHS = ("sm_80", "sm_90")
#: Compile-test only options: warnings are errors, spills are warnings.
STRICT = ("-Werror=all-warnings", "--ptxas-options=--warn-on-spills")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nvrtc() -> Nvrtc:
    path = find_nvrtc()
    if path is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("libnvrtc not found: the dev extra installs nvidia-cuda-nvrtc")
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    return Nvrtc(path)


def test_every_variant_compiles_cleanly_for_sm80_and_sm90(nvrtc: Nvrtc) -> None:
    jobs = [(v, arch) for v in _sources.all_variants() for arch in ARCHS]

    def build(job: tuple[_sources.Variant, str]) -> str | None:
        v, arch = job
        ok, log, cubin = nvrtc.compile(
            _sources.source(v.module), f"{v.module}.cu",
            v.options + _sources.CUPY_ADDED_OPTIONS + (f"-arch={arch}", *STRICT),
        )
        name = f"{v.module} {' '.join(v.options)} {arch}"
        if not ok or log:
            return f"{name}:\n{log}"
        # Every kernel the glue takes from this module is in the binary (extern "C" names).
        missing = [k for k in v.kernels if k.encode() + b"\0" not in cubin]
        return f"{name}: kernels missing from the cubin: {missing}" if missing else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(build, jobs) if f]
    assert not failures, "\n\n".join(failures)
    assert len(jobs) == 2 * 17


def test_sources_are_the_shipped_files() -> None:
    assert _sources.KERNEL_DIR.is_dir()
    in_repo = {p.name for p in (ROOT / "cuda").iterdir() if p.suffix in (".cu", ".cuh")}
    assert in_repo == {p.name for p in _sources.KERNEL_DIR.iterdir()}, "python/bofrs/_kernels must link every cuda/ source"
    used = {f for files in _sources.MODULE_FILES.values() for f in files}
    assert used == in_repo
    for files in _sources.MODULE_FILES.values():
        for name in files:
            shipped = (_sources.KERNEL_DIR / name).read_bytes()
            assert shipped == (ROOT / "cuda" / name).read_bytes(), name


def test_a_broken_kernel_fails(nvrtc: Nvrtc) -> None:
    """The compile check can fail: an undefined name and an unused variable are both caught."""
    ok, log, _ = nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = y; }', "bad.cu", ("-arch=sm_90",))
    assert not ok and "undefined" in log
    ok, log, _ = nvrtc.compile(
        'extern "C" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }', "warn.cu",
        ("-arch=sm_90", *STRICT),
    )
    assert not ok and "unused" in log


def test_wheel_layout_keeps_kernels_inside_the_package() -> None:
    """If a wheel was built (target/wheels), its .cu files are under bofrs/_kernels, never at the
    root (``cuda`` is NVIDIA's package name)."""
    wheels = sorted((ROOT / "target" / "wheels").glob("bofrs-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        pytest.skip("no wheel built (maturin build --release)")
    sources = max(p.stat().st_mtime for p in (ROOT / "cuda").iterdir())
    if wheels[-1].stat().st_mtime < sources:
        pytest.skip("the newest wheel is older than the kernel sources (maturin build --release)")
    names = zipfile.ZipFile(wheels[-1]).namelist()
    kernels = [n for n in names if n.endswith((".cu", ".cuh"))]
    assert kernels and all(n.startswith("bofrs/_kernels/") for n in kernels), kernels
    assert not any(n.startswith("cuda/") for n in names)
    expected = {f"bofrs/_kernels/{f}" for files in _sources.MODULE_FILES.values() for f in files}
    assert expected <= set(kernels)


#: Flushing float32 instructions (CuPy's -ftz=true turns plain C++ float arithmetic into these).
FLUSHING = re.compile(r"\b(mul|add|sub|fma|neg)(\.rn)?\.ftz\.f32")


def _ptx(nvrtc: Nvrtc, module: str, **defines: int) -> str:
    v = _sources.variant(module, **defines)
    ok, log, ptx = nvrtc.compile(
        _sources.source(module), f"{module}.cu", v.options + _sources.CUPY_ADDED_OPTIONS + ("-arch=compute_90",)
    )
    assert ok, log
    text = ptx.decode()
    return text[text.index(".entry"):]


def test_exact_arithmetic_survives_cupys_flush_to_zero(nvrtc: Nvrtc) -> None:
    """CuPy compiles with -ftz=true; the decoder's products, the signed dq8 scale's sign and the
    Hadamard butterflies must still be IEEE (no .ftz, no fused multiply-add) so that they match
    the CPU bit for bit, subnormals included."""
    for module, defines in (("dequant", {"out": 1}), ("hadamard", {"act": 0}), ("higgs_dequant", {"out": 0})):
        body = _ptx(nvrtc, module, **defines)
        assert "mul.rn.f32" in body, module
        assert not FLUSHING.search(body), f"{module}: {FLUSHING.search(body)}"
        assert not re.search(r"\bfma\.rn\.f32", body), module


def test_fused_kernels_decode_scales_without_flushing(nvrtc: Nvrtc) -> None:
    """The fused products may accumulate with flushing FMAs, but the scale they multiply by is
    decoded exactly: no flushing negation (a signed dq8 scale's sign is a bit flip)."""
    for module, defines in (("matvec", {"act": 1}), ("higgs_matvec", {"p": 2, "bits": 8})):
        body = _ptx(nvrtc, module, **defines)
        assert not re.search(r"\bneg(\.rn)?\.ftz\.f32", body), module


def test_the_flush_check_sees_a_plain_negation(nvrtc: Nvrtc) -> None:
    """The check can fail: ``-x`` under -ftz=true is a flushing negation."""
    ok, log, ptx = nvrtc.compile(
        'extern "C" __global__ void k(float* x) { x[0] = -x[1]; }', "neg.cu",
        ("-ftz=true", "-arch=compute_90"),
    )
    assert ok, log
    assert FLUSHING.search(ptx.decode())
