"""CuPy runtime: lazy import, the compiled-kernel cache, and launches on torch's current stream.

Nothing here imports CuPy at module import time: ``import bofrs`` and the CPU path never need
it. Kernel arguments are passed as numpy scalars; device pointers as ``numpy.uint64`` (a
pointer parameter is 8 bytes), so no DLPack or CuPy array is built per launch.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from ._sources import Variant, source

#: Set to ``0`` to make bofrs use its torch fallbacks on CUDA tensors even with CuPy installed.
ENV_SWITCH = "BOFRS_CUDA_KERNELS"

INSTALL_HINT = (
    "bofrs's CUDA kernels need CuPy: pip install 'bofrs[cuda12]' (CUDA 12 drivers/toolkits) "
    "or 'bofrs[cuda13]' (CUDA 13); 'bofrs[cuda]' is an alias of cuda12"
)


class CudaKernelsUnavailable(ImportError):
    """CuPy (or a CUDA device) is missing: the message says what to install."""


_lock = threading.Lock()
_cupy: Any = None
_import_error: BaseException | None = None
_modules: dict[tuple[str, tuple[str, ...], int], Any] = {}
_kernels: dict[tuple[str, tuple[str, ...], int, str], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_shared_limits: dict[tuple[int, int], int] = {}
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


def enabled(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the kernels: a CUDA device, CuPy importable,
    and ``BOFRS_CUDA_KERNELS`` not set to ``0``."""
    if device.type != "cuda" or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        cupy()
    except CudaKernelsUnavailable:
        return False
    return True


def require(device: torch.device) -> None:
    """Raises unless :func:`enabled` (the error says why)."""
    if device.type != "cuda":
        raise ValueError(f"the CUDA kernels need tensors on a CUDA device, got {device}")
    cupy()


def kernel(variant: Variant, name: str, device: torch.device) -> Any:
    """The compiled kernel ``name`` of ``variant`` on ``device``: compiled once per
    (source, options, device) and cached (CuPy also keeps its on-disk cache)."""
    if name not in variant.kernels:
        raise ValueError(f"kernel {name!r} is not in module {variant.module!r}")
    index = device.index if device.index is not None else torch.cuda.current_device()
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


def _stream(index: int) -> Any:
    ptr = torch.cuda.current_stream(index).cuda_stream
    key = (index, ptr)
    s = _streams.get(key)
    if s is None:
        s = cupy().cuda.ExternalStream(ptr)
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
    index = device.index if device.index is not None else torch.cuda.current_device()
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
