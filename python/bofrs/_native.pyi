"""Type stubs of the native extension (checked by ``python -m mypy.stubtest bofrs._native``)."""

from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "pack_ext",
    "unpack",
    "decode_scales",
    "opq_threshold",
    "builtin_levels",
    "num_threads",
    "supported_isas",
    "crc32",
    "optimize_gaussian",
    "expected_error",
    "WeightHistogramBuilder",
    "hadamard",
    "generate_grid",
    "pack_higgs",
    "unpack_higgs",
    "allocate",
    "matvec",
    "matvec_higgs",
]

__version__: str

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
    npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    npt.NDArray[np.uint8] | None,
    npt.NDArray[np.float32] | None,
    npt.NDArray[np.uint16] | npt.NDArray[np.uint32] | npt.NDArray[np.uint64],
    npt.NDArray[np.uint16],
]: ...
def unpack(
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32] | npt.NDArray[np.uint16] | npt.NDArray[np.uint8],
    levels: npt.NDArray[np.float32],
    block_size: int,
    numel: int,
    out_dtype: str,
    isa: str | None = None,
    outlier_indices: npt.NDArray[np.uint16] | npt.NDArray[np.uint32] | npt.NDArray[np.uint64] | None = None,
    outlier_values: npt.NDArray[np.uint16] | None = None,
    outlier_dtype: str = "bfloat16",
    scale_dtype: str = "float32",
    scale_params: npt.NDArray[np.float32] | None = None,
    signed: bool = False,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]: ...
def decode_scales(
    codes: npt.NDArray[np.uint8], params: npt.NDArray[np.float32], signed: bool
) -> npt.NDArray[np.float32]: ...
def opq_threshold(n: int, q: float) -> float: ...
def builtin_levels(name: str, block_size: int = 64) -> npt.NDArray[np.float32]: ...
def num_threads() -> int: ...
def supported_isas() -> list[str]: ...
def crc32(data: npt.NDArray[np.uint8]) -> int: ...

_Solution = tuple[npt.NDArray[np.float64], int, bool, float]

def optimize_gaussian(
    block_size: int,
    metric: str,
    normalization: str,
    bits: int,
    pinned: list[float],
    init: list[float] | None,
    tolerance: float,
    max_iterations: int,
) -> _Solution: ...
def expected_error(levels: list[float], block_size: int, metric: str, normalization: str) -> float: ...

@final
class WeightHistogramBuilder:
    def __new__(
        cls, block_size: int, metric: str, normalization: str, sample: float = 1.0, seed: int = 0
    ) -> WeightHistogramBuilder: ...
    def add(self, data: npt.NDArray[np.float32] | npt.NDArray[np.uint16], element: str) -> None: ...
    def optimize(
        self,
        bits: int,
        pinned: list[float],
        init: list[float] | None,
        tolerance: float,
        max_iterations: int,
    ) -> _Solution: ...

def hadamard(data: npt.NDArray[np.float32], size: int, isa: str | None = None) -> npt.NDArray[np.float32]: ...
def generate_grid(p: int, n: int, seed: int = 0) -> tuple[npt.NDArray[np.float64], float]: ...
def pack_higgs(
    data: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    element: str,
    rows: int,
    cols: int,
    group_size: int,
    p: int,
    points: npt.NDArray[np.float32],
    scale_dtype: str,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def unpack_higgs(
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    rows: int,
    cols: int,
    group_size: int,
    p: int,
    points: npt.NDArray[np.float32],
    rotated: bool,
) -> npt.NDArray[np.float32]: ...
def allocate(costs: list[int], losses: list[float], options: int, capacity: int) -> tuple[list[int], float, int]: ...

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
    activations: str | None = None,
) -> npt.NDArray[np.float32]: ...
def matvec_higgs(
    x_rot: npt.NDArray[np.float32],
    tokens: int,
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    rows: int,
    cols: int,
    group_size: int,
    p: int,
    points: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...
