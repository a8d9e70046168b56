"""The Walsh-Hadamard transform of CUDA tensors (bit-identical to the CPU transform)."""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime as rt
from ._blockwise import kind
from ._sources import KINDS, variant


def hadamard_scale(n: int) -> float:
    """``1 / sqrt(n)`` in float32 (as the CPU computes it)."""
    return float(np.float32(1.0) / np.sqrt(np.float32(n)))


def threads_for(n: int) -> int:
    """Threads per block for a group of ``n`` values."""
    return max(32, min(1024, n // 2))


def hadamard_groups(x: torch.Tensor, group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The orthonormal transform of every group of ``group_size`` consecutive values of a
    contiguous CUDA tensor (float32 / bfloat16 / float16; the numel a multiple of the group
    size), computed in float32, returned in ``x.dtype`` (into ``out`` when given). No finiteness
    check (NaN propagates): :func:`bofrs.hadamard` does that."""
    k = kind(x.dtype)
    if k is None:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if group_size & (group_size - 1) or not 16 <= group_size <= 1 << 15:
        raise ValueError(f"group_size must be a power of two in 16..32768, got {group_size}")
    x = x.contiguous()
    if x.numel() % group_size:
        raise ValueError(f"{x.numel()} values are not whole groups of {group_size}")
    rt.require(x.device)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor like x")
    groups = x.numel() // group_size
    if groups == 0:
        return out
    fn = rt.kernel(variant("hadamard", act=KINDS[k]), "bofrs_hadamard", x.device)
    shared = 4 * group_size
    rt.launch(fn, x.device, groups, threads_for(group_size), (
        rt.ptr(x), rt.ptr(out), rt.i32(group_size.bit_length() - 1),
        rt.f32(hadamard_scale(group_size)),
    ), shared_mem=shared)  # fmt: skip
    return out
