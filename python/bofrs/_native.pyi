"""Type stubs of the native extension (checked by ``python -m mypy.stubtest bofrs._native``)."""

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "pack",
    "pack_ext",
    "unpack",
    "decode_scales",
    "opq_threshold",
    "builtin_levels",
    "num_threads",
    "supported_isas",
    "crc32",
]

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
def pack_ext(
    data: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    element: str,
    levels: npt.NDArray[np.float32],
    block_size: int,
    normalization: str,
    scale_dtype: str,
    opq: float | None = None,
    outlier_dtype: str = "bfloat16",
    isa: str | None = None,
) -> tuple[
    npt.NDArray[np.uint8],
    npt.NDArray[np.float32],
    npt.NDArray[np.uint8] | None,
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint16],
]: ...
def unpack(
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    levels: npt.NDArray[np.float32],
    block_size: int,
    numel: int,
    out_dtype: str,
    isa: str | None = None,
    outlier_indices: npt.NDArray[np.uint64] | None = None,
    outlier_values: npt.NDArray[np.uint16] | None = None,
    outlier_dtype: str = "bfloat16",
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]: ...
def decode_scales(
    codes: npt.NDArray[np.uint8], params: npt.NDArray[np.float32], signed: bool
) -> npt.NDArray[np.float32]: ...
def opq_threshold(n: int, q: float) -> float: ...
def builtin_levels(name: str, block_size: int = 64) -> npt.NDArray[np.float32]: ...
def num_threads() -> int: ...
def supported_isas() -> list[str]: ...
def crc32(data: npt.NDArray[np.uint8]) -> int: ...
