"""Type stubs of the native extension (checked by ``python -m mypy.stubtest bofrs._native``)."""

import numpy as np
import numpy.typing as npt

__all__ = ["__version__", "pack", "unpack", "builtin_levels", "num_threads", "supported_isas", "crc32", "matvec"]

__version__: str

def pack(
    data: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    element: str,
    levels: npt.NDArray[np.float32],
    block_size: int,
    normalization: str,
    scale_dtype: str,
    isa: str | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def unpack(
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    levels: npt.NDArray[np.float32],
    block_size: int,
    numel: int,
    out_dtype: str,
    isa: str | None = None,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]: ...
def builtin_levels(name: str, block_size: int = 64) -> npt.NDArray[np.float32]: ...
def num_threads() -> int: ...
def supported_isas() -> list[str]: ...
def crc32(data: npt.NDArray[np.uint8]) -> int: ...
def matvec(
    x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    element: str,
    batch: int,
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    levels: npt.NDArray[np.float32],
    out_features: int,
    in_features: int,
    block_size: int,
    isa: str | None = None,
) -> npt.NDArray[np.float32]: ...
