"""bofrs's CUDA kernels (``cuda/*.cu``, shipped as ``bofrs/_kernels``), compiled with NVRTC
through CuPy and launched on torch's current stream.

CuPy is imported lazily, on the first CUDA tensor: ``import bofrs`` and the CPU path never need
it. Without CuPy (or with ``BOFRS_CUDA_KERNELS=0``) CUDA tensors use the torch fallbacks;
:func:`require` raises :class:`CudaKernelsUnavailable` (an ``ImportError``) saying what to
install.
"""

from __future__ import annotations

from ._runtime import CudaKernelsUnavailable, cupy, enabled, require

__all__ = ["CudaKernelsUnavailable", "cupy", "enabled", "require"]
