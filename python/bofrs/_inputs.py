"""Turning user tensors (torch or numpy) into flat arrays the native core reads without copies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from bofrs._dtypes import NATIVE_FLOATS, NUMPY_FLOATS, to_native


@dataclass(frozen=True)
class FlatInput:
    """A tensor flattened row-major for the native encoder."""

    data: npt.NDArray[np.float32] | npt.NDArray[np.uint16]
    element: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def as_tensor(value: object, name: str) -> torch.Tensor:
    """A torch view of a float torch tensor or numpy array; anything else raises TypeError."""
    if isinstance(value, np.ndarray):
        if value.dtype.newbyteorder("=") not in NUMPY_FLOATS:
            raise TypeError(
                f"{name} must have a float dtype (float32, float16, float64), got {value.dtype}"
            )
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{name} must have a float dtype (float32, bfloat16, float16), got {value.dtype}"
            )
        return value.detach()
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def flatten_for_native(value: object, name: str = "tensor") -> FlatInput:
    """Flattens a float tensor for :func:`bofrs._native.pack`.

    float64 is narrowed to float32 (the encoder works in float32); values beyond the float32
    range are rejected. Other float types (float8, ...) raise TypeError.
    """
    tensor = as_tensor(value, name)
    shape, dtype, device = tensor.shape, tensor.dtype, tensor.device
    flat = tensor.reshape(-1).cpu()
    if dtype == torch.float64:
        bad = (~torch.isfinite(flat.float())).nonzero()
        if bad.numel():
            index = int(bad[0, 0])
            raise ValueError(
                f"{name} holds a non-finite value or one beyond the float32 range at flat "
                f"index {index} ({float(flat[index])!r})"
            )
        flat = flat.float()
    elif dtype not in NATIVE_FLOATS:
        raise TypeError(f"{name} has unsupported dtype {dtype}; use float32, bfloat16 or float16")
    flat = flat.contiguous()
    return FlatInput(to_native(flat), NATIVE_FLOATS[flat.dtype], shape, dtype, device)
