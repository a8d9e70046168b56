"""The CUDA glue without a GPU: CuPy stays optional and lazy, and its absence is explained."""

from __future__ import annotations

import subprocess
import sys

import bofrs
import pytest
import torch
from bofrs import _cuda
from bofrs._cuda import _runtime, _sources


def test_import_bofrs_does_not_import_cupy() -> None:
    code = "import sys, bofrs, bofrs.nn; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_tensors_never_use_the_kernels() -> None:
    assert not _cuda.enabled(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA device"):
        _cuda.require(torch.device("cpu"))


def test_missing_cupy_raises_an_import_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "_cupy", None)
    monkeypatch.setattr(_runtime, "_import_error", None)
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(_cuda.CudaKernelsUnavailable, match=r"pip install 'bofrs\[cuda12\]'") as info:
        _runtime.cupy()
    assert isinstance(info.value, ImportError)
    assert not _cuda.enabled(torch.device("cuda"))  # falls back to the torch path


def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_runtime.ENV_SWITCH, "0")
    assert not _cuda.enabled(torch.device("cuda"))


def test_options_and_sources_are_deterministic() -> None:
    v = _sources.variant("matvec", act=1)
    assert v.options == (*_sources.BASE_OPTIONS, "-DBOFRS_ACT=1")
    assert v.kernels == tuple(f"bofrs_matvec_t{t}_v16" for t in (1, 2, 4, 8, 16))
    assert _sources.options(p=2, bits=8)[-2:] == ("-DBOFRS_BITS=8", "-DBOFRS_P=2")
    src = _sources.source("hadamard")
    assert src.index("bofrs_common.cuh") < src.index("fwht.cuh") < src.index("hadamard.cu")
    with pytest.raises(ValueError, match="unknown CUDA module"):
        _sources.source("nope")
    assert len({(v.module, v.options) for v in _sources.all_variants()}) == 17


def test_cpu_path_is_unchanged_by_the_glue() -> None:
    w = torch.randn(32, 64)
    p = bofrs.pack(w, "nf4", 16)
    assert p.to("cpu") is p
    assert p.dequantize().device.type == "cpu"


def _signatures() -> dict[str, list[str]]:
    """Kernel name pattern (regex) -> parameter kinds ("ptr", "i32", "i64", "f32"), parsed from
    the shipped sources (macro-generated names included)."""
    import re

    out: dict[str, list[str]] = {}
    for module in _sources.MODULE_FILES:
        text = _sources.source(module).replace("\\\n", " ")
        pattern = r'extern "C" __global__ void(?:\s+__launch_bounds__\([^)]*\))?\s+([\w#]+)\s*\(([^)]*)\)'
        for name, params in re.findall(pattern, text):
            kinds = []
            for param in params.split(","):
                decl = param.strip()
                if "*" in decl:
                    kinds.append("ptr")
                elif decl.startswith("i64"):
                    kinds.append("i64")
                elif decl.startswith("int"):
                    kinds.append("i32")
                elif decl.startswith("float"):
                    kinds.append("f32")
                else:
                    raise AssertionError(f"unknown parameter type: {decl!r}")
            out["^" + name.replace("##T##", r"\d+").replace("##VB", r"\d+") + "$"] = kinds
    return out


def test_launch_arguments_match_kernel_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dry run of every launch site on CPU tensors (no GPU): each kernel comes from a variant
    the compile test builds, and its argument list matches the kernel's parameters in number
    and type (pointers as uint64, int as int32, long long as int64, float as float32)."""
    import re

    import numpy as np
    from bofrs._cuda import _blockwise, _hadamard, _higgs

    signatures = _signatures()
    variants = {(v.module, v.options) for v in _sources.all_variants()}
    launched: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

    def kernel(variant: _sources.Variant, name: str, device: torch.device) -> Fake:
        assert (variant.module, variant.options) in variants, variant
        assert name in variant.kernels
        return Fake(name)

    kinds = {np.uint64: "ptr", np.int32: "i32", np.int64: "i64", np.float32: "f32"}

    def launch(fn: Fake, device: torch.device, grid: int, block: int, args: tuple[object, ...],
               shared_mem: int = 0) -> None:
        want = next(k for pat, k in signatures.items() if re.match(pat, fn.name))
        got = [kinds[type(a)] for a in args]  # type: ignore[index]
        assert got == want, f"{fn.name}: {got} != {want}"
        assert 0 < block <= 1024 and grid > 0
        launched.append(fn.name)

    monkeypatch.setattr(_runtime, "require", lambda device: None)
    monkeypatch.setattr(_runtime, "kernel", kernel)
    monkeypatch.setattr(_runtime, "launch", launch)

    w = torch.randn(40, 128)
    for scale in ("bfloat16", "dq8"):
        for book in ("nf4", "bof4s"):
            p = bofrs.pack(w, book, 32, scale_dtype=scale, opq=0.98)
            assert p.outliers is not None
            ops = _blockwise.operands(
                p.codes, p.scales, p.scale_scales, book == "bof4s", p.codebook.levels, p.numel, 32,
                p.outliers.indices, p.outliers.values,
            )  # fmt: skip
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                _blockwise.dequantize_into(ops, torch.empty(p.numel, dtype=dtype))
                for tokens in (1, 3, 16):
                    _blockwise.matvec(ops, torch.zeros(tokens, 128, dtype=dtype), 40, 128)
                _hadamard.hadamard_groups(torch.zeros(4, 128, dtype=dtype), 64)
    for bits, pdim in ((4, 1), (4, 2), (3, 2), (2, 1), (8, 1)):
        h = bofrs.pack_higgs(w, bits, pdim, 64)
        hops = h.cuda_operands()
        _higgs.dequantize_into(hops, torch.empty(40, 128), rotated=True)
        _higgs.dequantize_into(hops, torch.empty(40, 128, dtype=torch.bfloat16), rotated=False)
        if _higgs.fusable(hops):
            _higgs.matvec(hops, torch.zeros(5, 128))
    assert {"bofrs_dequant", "bofrs_scatter_outliers", "bofrs_hadamard", "bofrs_higgs_dequant",
            "bofrs_matvec_t1_v16", "bofrs_matvec_t4_v16", "bofrs_matvec_t16_v16",
            "bofrs_higgs_matvec_t8_v16"} <= set(launched)
