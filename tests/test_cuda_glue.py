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


# --- a CuPy that imports but cannot run, streams, validation once (fakes: no GPU needed) --------


class _FakeCuda:
    """The parts of ``cupy.cuda`` the runtime touches."""

    def __init__(self, stream_cls: type) -> None:
        self.Stream = stream_cls
        self.created: list[tuple[str, object]] = []

        outer = self

        class ExternalStream:
            def __init__(self, ptr: int, device_id: int = -1) -> None:
                import warnings

                warnings.warn("cupy.cuda.ExternalStream is deprecated", DeprecationWarning, stacklevel=2)
                outer.created.append(("external", ptr))

        self.ExternalStream = ExternalStream

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            return None

        def __exit__(self, *args: object) -> None:
            return None


def _fake_cupy(*, compile_error: Exception | None = None, launch_error: Exception | None = None,
               writes: int | None = None) -> object:
    import types

    import numpy as np

    class Stream:
        pass

    cuda = _FakeCuda(Stream)

    class Array:
        def __init__(self) -> None:
            self.value = np.zeros(1, dtype=np.int32)

        def get(self) -> np.ndarray:
            if launch_error is not None:
                raise launch_error
            return self.value

    class Function:
        def __call__(self, grid: tuple[int], block: tuple[int], args: tuple[Array, np.int32]) -> None:
            out, value = args
            out.value[0] = value if writes is None else writes

    class RawModule:
        def __init__(self, code: str, options: tuple[str, ...]) -> None:
            if compile_error is not None:
                raise compile_error
            assert "bofrs_probe" in code and options == _sources.BASE_OPTIONS

        def get_function(self, name: str) -> Function:
            return Function()

    return types.SimpleNamespace(cuda=cuda, RawModule=RawModule, zeros=lambda n, dtype: Array())


@pytest.fixture
def fresh_runtime(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(_runtime.ENV_SWITCH, raising=False)
    monkeypatch.setattr(_runtime, "_probes", {})
    monkeypatch.setattr(_runtime, "_streams", {})
    return monkeypatch


@pytest.mark.parametrize("failure", ["compile", "launch", "wrong value"])
def test_a_cupy_that_cannot_run_falls_back_with_one_warning(fresh_runtime: pytest.MonkeyPatch, failure: str) -> None:
    kwargs: dict[str, object] = {
        "compile": {"compile_error": RuntimeError("nvrtc: libnvrtc.so.13 not found")},
        "launch": {"launch_error": RuntimeError("cudaErrorInsufficientDriver")},
        "wrong value": {"writes": 7},
    }[failure]
    fresh_runtime.setattr(_runtime, "_cupy", _fake_cupy(**kwargs))  # type: ignore[arg-type]
    device = torch.device("cuda", 0)
    with pytest.warns(_cuda.CudaKernelsWarning, match="cuda:0.*torch fallbacks") as record:
        assert not _cuda.enabled(device)
    assert len(record) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second look is silent (the probe runs once)
        assert not _cuda.enabled(device)
        with pytest.raises(_cuda.CudaKernelsUnavailable, match="cannot run on cuda:0"):
            _cuda.require(device)


def test_a_working_cupy_passes_the_probe_once(fresh_runtime: pytest.MonkeyPatch) -> None:
    fresh_runtime.setattr(_runtime, "_cupy", _fake_cupy())
    probes = []
    real = _runtime._probe

    def counted(cp: object, index: int) -> BaseException | None:
        probes.append(index)
        return real(cp, index)

    fresh_runtime.setattr(_runtime, "_probe", counted)
    for _ in range(3):
        assert _cuda.enabled(torch.device("cuda", 1))
        _cuda.require(torch.device("cuda", 1))
    assert probes == [1] * 6 and set(_runtime._probes) == {1}  # looked up each time, run once
    assert _runtime._probes[1] is None


def test_launches_use_torchs_stream_without_the_deprecated_wrapper(fresh_runtime: pytest.MonkeyPatch) -> None:
    """CuPy 14 deprecates ExternalStream (the fake warns, and warnings are errors here): the
    stream goes through ``Stream.from_external`` and the CUDA stream protocol."""
    import types

    seen: list[tuple[int, int]] = []
    cp = _fake_cupy()
    cp.cuda.Stream.from_external = staticmethod(  # type: ignore[attr-defined]
        lambda obj: seen.append(obj.__cuda_stream__()) or f"stream {obj.__cuda_stream__()[1]}"
    )
    fresh_runtime.setattr(_runtime, "_cupy", cp)
    fresh_runtime.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=0xABC))
    assert _runtime._stream(0) == "stream 2748"
    assert _runtime._stream(0) == "stream 2748"  # cached per (device, pointer)
    assert seen == [(0, 0xABC)]
    assert cp.cuda.created == []  # type: ignore[attr-defined]


def test_cupy_13_streams_use_external_stream(fresh_runtime: pytest.MonkeyPatch) -> None:
    import types
    import warnings

    cp = _fake_cupy()  # no Stream.from_external: CuPy 13, where ExternalStream is the API
    fresh_runtime.setattr(_runtime, "_cupy", cp)
    fresh_runtime.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=77))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the fake warns; CuPy 13 does not
        _runtime._stream(3)
    assert cp.cuda.created == [("external", 77)]  # type: ignore[attr-defined]


def _count_validations(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    monkeypatch.setattr(_runtime, "require", lambda device: None)
    return calls


def test_packed_tensors_validate_their_cuda_operands_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation synchronizes with the device: a PackedTensor (and every QuantLinear backward
    step that decodes it) does it once, again only after a part is modified in place."""
    from bofrs._cuda import _blockwise
    from bofrs.nn import QuantLinear

    calls = _count_validations(monkeypatch, _blockwise, "operands")
    q = QuantLinear.from_linear(torch.nn.Linear(128, 48), "bof4s", 32, opq=0.98)
    assert q.packed is q.packed  # the module hands out one PackedTensor while unchanged
    first = q.packed.cuda_operands()
    for _ in range(3):
        assert q.packed.cuda_operands() is first
    assert len(calls) == 1
    with torch.no_grad():
        q.scales[0] = q.scales[1]  # in place: a new version
    assert q.packed.cuda_operands() is not first and len(calls) == 2
    p = bofrs.pack(torch.randn(40, 64), "nf4", 32, opq=0.98)
    p.cuda_operands()
    p.cuda_operands()
    assert len(calls) == 3
    assert p.outliers is not None
    p.outliers.values.mul_(1)  # in place on an outlier part
    p.cuda_operands()
    assert len(calls) == 4


def test_higgs_tensors_validate_their_cuda_operands_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from bofrs._cuda import _higgs
    from bofrs.nn import HiggsLinear

    calls = _count_validations(monkeypatch, _higgs, "operands")
    h = HiggsLinear.from_linear(torch.nn.Linear(64, 24), 4, 2, 64)
    for _ in range(3):
        h.packed.cuda_operands()
        h._cuda_operands()
    assert len(calls) == 1
    h.to(torch.float32)  # module.to drops the derived values
    h.packed.cuda_operands()
    assert len(calls) == 2
