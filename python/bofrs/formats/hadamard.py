"""The orthonormal Walsh-Hadamard transform of tensors, per group of the last dimension."""

from __future__ import annotations

import numbers

import torch

from bofrs import _cuda, _native
from bofrs._cuda import _hadamard as _cuda_hadamard
from bofrs._inputs import as_tensor

MIN_GROUP, MAX_GROUP = 16, 1 << 15


def check_group_size(group_size: object) -> int:
    """``group_size`` as an int if it is a power of two in 16..32768."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    g = int(group_size)
    if not (MIN_GROUP <= g <= MAX_GROUP) or g & (g - 1):
        raise ValueError(f"group_size must be a power of two in {MIN_GROUP}..{MAX_GROUP}, got {g}")
    return g


def natural_group_size(cols: int) -> int:
    """The largest power of two dividing ``cols``, at most 1024 (ValueError below 16)."""
    lowest = int(cols) & -int(cols)
    if lowest < MIN_GROUP:
        raise ValueError(
            f"rotation needs a last dimension divisible by 16 or more (a power of two), got {cols}"
        )
    return min(1024, lowest)


def hadamard(tensor: object, group_size: int | None = None) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform along the last dimension, per group of
    ``group_size`` values (default: the whole last dimension, which must then be a power of two
    in 16..32768). It is its own inverse. Computed in float32, returned in the input's dtype.
    NaN or infinity raises ValueError naming the flat index; an empty tensor (no rows) comes
    back empty."""
    x = as_tensor(tensor, "tensor")
    if x.dim() == 0:
        raise ValueError("tensor must have at least one dimension")
    cols = int(x.shape[-1])
    g = check_group_size(cols if group_size is None else group_size)
    if cols % g:
        raise ValueError(f"the last dimension ({cols}) must be a multiple of group_size ({g})")
    if _cuda.enabled(x.device) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        data = x.detach().contiguous()
        bad = (~torch.isfinite(data)).reshape(-1).nonzero()
        if bad.numel():
            raise ValueError(
                f"tensor holds a non-finite value (NaN or inf) at flat index {int(bad[0, 0])}"
            )
        return _cuda_hadamard.hadamard_groups(data, g)
    flat = x.detach().reshape(-1).cpu().float().contiguous()
    out = torch.from_numpy(_native.hadamard(flat.numpy(), g))
    return out.reshape(x.shape).to(dtype=x.dtype, device=x.device)
