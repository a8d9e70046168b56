"""bofrs's CUDA kernels (``cuda/*.cu``, shipped as ``bofrs/_kernels``), compiled with NVRTC
through CuPy and launched on torch's current stream.

CuPy is imported lazily, on the first CUDA tensor: ``import bofrs`` and the CPU path never need
it. Without CuPy (or with ``BOFRS_CUDA_KERNELS=0``) CUDA tensors use the torch fallbacks;
:func:`require` raises :class:`CudaKernelsUnavailable` (an ``ImportError``) saying what to
install. A CuPy that imports but cannot compile or launch on a device (checked once per device
with a probe kernel) gives one :class:`CudaKernelsWarning` and the torch fallbacks.
"""

from __future__ import annotations

from ._runtime import CudaKernelsUnavailable, CudaKernelsWarning, cupy, enabled, require

__all__ = ["CudaKernelsUnavailable", "CudaKernelsWarning", "cupy", "enabled", "require"]
