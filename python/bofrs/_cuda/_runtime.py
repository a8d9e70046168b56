"""CuPy runtime: lazy import, the compiled-kernel cache, and launches on torch's current stream.

Nothing here imports CuPy at module import time: ``import bofrs`` and the CPU path never need
it. Kernel arguments are passed as numpy scalars; device pointers as ``numpy.uint64`` (a
pointer parameter is 8 bytes), so no DLPack or CuPy array is built per launch.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np
import torch

from ._sources import BASE_OPTIONS, Variant, source

#: Set to ``0`` to make bofrs use its torch fallbacks on CUDA tensors even with CuPy installed.
ENV_SWITCH = "BOFRS_CUDA_KERNELS"

INSTALL_HINT = (
    "bofrs's CUDA kernels need CuPy: pip install 'bofrs[cuda12]' (CUDA 12 drivers/toolkits) "
    "or 'bofrs[cuda13]' (CUDA 13); 'bofrs[cuda]' is an alias of cuda12"
)


class CudaKernelsUnavailable(ImportError):
    """CuPy (or a CUDA device) is missing: the message says what to install."""


class CudaKernelsWarning(RuntimeWarning):
    """CuPy imports but cannot compile or launch a kernel on a device (no NVRTC, a driver
    older than CuPy's CUDA, ...): bofrs uses its torch fallbacks there."""


_lock = threading.Lock()
_cupy: Any = None
_import_error: BaseException | None = None
_modules: dict[tuple[str, tuple[str, ...], int], Any] = {}
_kernels: dict[tuple[str, tuple[str, ...], int, str], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_shared_limits: dict[tuple[int, int], int] = {}
#: Per device index: None once a probe kernel ran there, else why it could not.
_probes: dict[int, BaseException | None] = {}
#: The probe: compiled with the kernels' options, launched, and its result read back.
PROBE_SOURCE = 'extern "C" __global__ void bofrs_probe(int* out, int value) { out[0] = value; }'
PROBE_VALUE = 0x5EED
#: Dynamic shared memory a thread block gets without opting in.
DEFAULT_SHARED = 48 * 1024


def cupy() -> Any:
    """The ``cupy`` module, imported on first use; :class:`CudaKernelsUnavailable` otherwise."""
    global _cupy, _import_error
    if _cupy is not None:
        return _cupy
    if _import_error is None:
        try:
            import cupy as cp

            _cupy = cp
            return cp
        except Exception as e:  # noqa: BLE001  (ImportError, or CuPy failing to load CUDA libs)
            _import_error = e
    raise CudaKernelsUnavailable(f"{INSTALL_HINT} ({_import_error})") from _import_error


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device when it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def enabled(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the kernels: a CUDA device, CuPy importable,
    ``BOFRS_CUDA_KERNELS`` not set to ``0``, and a probe kernel compiled and ran there (checked
    once per device; if it fails, one :class:`CudaKernelsWarning` says why and the torch
    fallbacks take over)."""
    if device.type != "cuda" or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        cp = cupy()
    except CudaKernelsUnavailable:
        return False
    return _probe(cp, device_index(device)) is None


def _probe(cp: Any, index: int) -> BaseException | None:
    """None if a trivial kernel compiles and runs on device ``index`` (cached), else the error."""
    if index in _probes:
        return _probes[index]
    with _lock:
        if index in _probes:
            return _probes[index]
        error: BaseException | None = None
        try:
            with cp.cuda.Device(index):
                fn = cp.RawModule(code=PROBE_SOURCE, options=BASE_OPTIONS).get_function("bofrs_probe")
                out = cp.zeros(1, dtype=np.int32)
                fn((1,), (1,), (out, np.int32(PROBE_VALUE)))
                got = int(out.get()[0])  # synchronizes: a failed launch raises here
            if got != PROBE_VALUE:
                raise RuntimeError(f"the probe kernel wrote {got:#x}, not {PROBE_VALUE:#x}")
        except Exception as e:  # noqa: BLE001  (CuPy's compile, driver and runtime errors)
            error = e
            warnings.warn(
                CudaKernelsWarning(
                    f"bofrs's CUDA kernels cannot run on cuda:{index} ({type(e).__name__}: {e}); "
                    "using the torch fallbacks there"
                ),
                stacklevel=3,
            )
        _probes[index] = error
    return error


def require(device: torch.device) -> None:
    """Raises unless the kernels can run on ``device`` (the error says why)."""
    if device.type != "cuda":
        raise ValueError(f"the CUDA kernels need tensors on a CUDA device, got {device}")
    error = _probe(cupy(), device_index(device))
    if error is not None:
        raise CudaKernelsUnavailable(
            f"bofrs's CUDA kernels cannot run on {device} ({type(error).__name__}: {error})"
        ) from error


def kernel(variant: Variant, name: str, device: torch.device) -> Any:
    """The compiled kernel ``name`` of ``variant`` on ``device``: compiled once per
    (source, options, device) and cached (CuPy also keeps its on-disk cache)."""
    if name not in variant.kernels:
        raise ValueError(f"kernel {name!r} is not in module {variant.module!r}")
    index = device_index(device)
    key = (variant.module, variant.options, index, name)
    fn = _kernels.get(key)
    if fn is not None:
        return fn
    cp = cupy()
    with _lock:
        mkey = (variant.module, variant.options, index)
        with cp.cuda.Device(index):
            module = _modules.get(mkey)
            if module is None:
                module = cp.RawModule(code=source(variant.module), options=variant.options)
                _modules[mkey] = module
            fn = module.get_function(name)
        _kernels[key] = fn
    return fn


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol (``__cuda_stream__``: version 0 and
    the pointer), which ``cupy.cuda.Stream.from_external`` takes."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _stream(index: int) -> Any:
    """A CuPy stream object for torch's current stream on device ``index`` (cached per
    pointer): ``Stream.from_external`` where CuPy has it (14+, whose ``ExternalStream`` is
    deprecated), ``ExternalStream`` on CuPy 13."""
    ptr = torch.cuda.current_stream(index).cuda_stream
    key = (index, ptr)
    s = _streams.get(key)
    if s is None:
        cuda = cupy().cuda
        from_external = getattr(cuda.Stream, "from_external", None)
        if from_external is not None:
            s = from_external(_StreamHandle(ptr))
        else:
            s = cuda.ExternalStream(ptr, index)
        _streams[key] = s
    return s


def launch(
    fn: Any,
    device: torch.device,
    grid: int,
    block: int,
    args: tuple[Any, ...],
    shared_mem: int = 0,
) -> None:
    """Launches ``fn`` on torch's current stream of ``device`` (raising the kernel's dynamic
    shared-memory limit first when ``shared_mem`` is above the default 48 KiB)."""
    if grid <= 0:
        return
    cp = cupy()
    index = device_index(device)
    with cp.cuda.Device(index), _stream(index):
        if shared_mem > DEFAULT_SHARED:
            key = (id(fn), index)
            if _shared_limits.get(key, 0) < shared_mem:
                fn.max_dynamic_shared_size_bytes = int(shared_mem)
                _shared_limits[key] = int(shared_mem)
        fn((int(grid),), (int(block),), args, shared_mem=int(shared_mem))


def ptr(t: torch.Tensor) -> np.uint64:
    """Device pointer argument of a tensor."""
    return np.uint64(t.data_ptr())  # type: ignore[no-any-return]


def i32(v: int) -> np.int32:
    """An ``int`` argument (range-checked)."""
    if not -(2**31) <= v < 2**31:
        raise ValueError(f"kernel argument {v} does not fit in 32 bits")
    return np.int32(v)  # type: ignore[no-any-return]


def i64(v: int) -> np.int64:
    """A ``long long`` argument."""
    return np.int64(v)  # type: ignore[no-any-return]


def f32(v: float) -> np.float32:
    """A ``float`` argument."""
    return np.float32(v)  # type: ignore[no-any-return]
