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
