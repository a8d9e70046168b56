"""The one table of element types: their names, torch and numpy dtypes, and how each crosses the
native boundary (float32 as is, 16-bit floats as their ``uint16`` bits, without copies)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

#: Float types the native kernels (and the CUDA kernels) read and write, with their names.
NATIVE_FLOATS: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: numpy float types accepted as input, and the torch dtype each becomes.
NUMPY_FLOATS: dict[np.dtype, torch.dtype] = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, np.dtype(np.float64): torch.float64,
}  # fmt: skip
#: Storage of float block scales (and HIGGS scales), by name.
SCALE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: 16-bit float storage (OPQ outlier values), by name.
HALF_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Unsigned index types, smallest first, with their numpy twins.
INDEX_DTYPES: dict[torch.dtype, type[np.unsignedinteger]] = {
    torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64,
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` for float dtypes; raises ValueError otherwise."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a float dtype: {name!r}")
    return dtype


def to_native(flat: torch.Tensor) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]:
    """A contiguous CPU tensor of a :data:`NATIVE_FLOATS` type as the array the native layer
    reads: float32 as is, bfloat16 / float16 as their bits (a view, no copy)."""
    if flat.dtype == torch.float32:
        return flat.numpy()
    return flat.view(torch.int16).numpy().view(np.uint16)


def from_native(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_native`: a native float32 or ``uint16``-bits array as a tensor of
    ``dtype`` (a view, no copy)."""
    if array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16)).view(dtype)
    return torch.from_numpy(array)
