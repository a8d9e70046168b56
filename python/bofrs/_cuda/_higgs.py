"""HIGGS on CUDA: validated device operands, dequantize (rotated or back), fused matvec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _runtime as rt
from ._blockwise import MAX_FUSED_TOKENS, _aligned, _check, fused_input, kind, workspace
from ._hadamard import hadamard_scale, threads_for
from ._sources import (
    HIGGS_MATVEC_GRIDS,
    KINDS,
    SCALE_FORMATS,
    higgs_matvec_kernel,
    variant,
)

__all__ = [
    "MAX_FUSED_TOKENS", "HiggsOperands", "decoded_linear", "dequantize", "dequantize_into",
    "fusable", "matvec", "operands",
]

_ROWS_PER_BLOCK = 8
_points_cache: dict[tuple[bytes, str], torch.Tensor] = {}


@dataclass(frozen=True)
class HiggsOperands:
    """A HIGGS weight ``rows x cols`` as the kernels read it (validated, on one device)."""

    codes: torch.Tensor
    scales: torch.Tensor
    scale_fmt: int
    points: torch.Tensor
    rows: int
    cols: int
    group_size: int
    p: int
    #: Bits of one code (``log2`` of the grid's points), not bits per weight.
    bits: int

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def per_row(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def width(self) -> int:
        """Row length in the rotated basis (whole groups)."""
        return self.per_row * self.group_size

    @property
    def group_bytes(self) -> int:
        return self.group_size // self.p * self.bits // 8


def operands(
    codes: torch.Tensor, scales: torch.Tensor, rows: int, cols: int, group_size: int,
    p: int, points: np.ndarray,
) -> HiggsOperands:
    """Checks a HIGGS tensor's parts (sizes, finite scales; one synchronization) and returns
    its :class:`HiggsOperands`."""
    device = codes.device
    rt.require(device)
    pts = np.ascontiguousarray(points, dtype=np.float32).reshape(-1)
    n = pts.size // p
    bits = n.bit_length() - 1
    if p not in (1, 2) or n * p != pts.size or n != 1 << bits or not 1 <= bits <= 8:
        raise ValueError(f"grid must hold 2^k points of dimension 1 or 2, got {pts.size} values, p={p}")
    if group_size & (group_size - 1) or not 16 <= group_size <= 1 << 15:
        raise ValueError(f"group_size must be a power of two in 16..32768, got {group_size}")
    ops = HiggsOperands(_aligned(codes), scales.contiguous(), 0, torch.empty(0), rows, cols, group_size, p, bits)
    groups = rows * ops.per_row
    _check(ops.codes, "codes", (torch.uint8,), groups * ops.group_bytes, device)
    _check(ops.scales, "scales", (torch.float32, torch.bfloat16, torch.float16), groups, device)
    if groups and not bool(torch.isfinite(ops.scales.float()).all()):
        raise ValueError("scales must be finite")
    key = (pts.tobytes(), str(device))
    dev_points = _points_cache.get(key)
    if dev_points is None:
        dev_points = torch.from_numpy(pts.copy()).to(device)
        _points_cache[key] = dev_points
    fmt = SCALE_FORMATS[str(ops.scales.dtype).removeprefix("torch.")]
    return HiggsOperands(ops.codes, ops.scales, fmt, dev_points, rows, cols, group_size, p, bits)


def dequantize_into(ops: HiggsOperands, out: torch.Tensor, rotated: bool) -> torch.Tensor:
    """Decodes into ``out`` (``rows x width`` rotated, ``rows x cols`` otherwise; float32 /
    bfloat16 / float16, contiguous, on the device)."""
    k = kind(out.dtype)
    if k is None:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    width = ops.width if rotated else ops.cols
    _check(out, "out", (out.dtype,), ops.rows * width, ops.device)
    groups = ops.rows * ops.per_row
    if groups == 0 or width == 0:
        return out
    fn = rt.kernel(variant("higgs_dequant", out=KINDS[k]), "bofrs_higgs_dequant", ops.device)
    shared = 4 * ops.group_size
    rt.launch(fn, ops.device, groups, threads_for(ops.group_size), (
        rt.ptr(ops.codes), rt.ptr(ops.scales), rt.i32(ops.scale_fmt), rt.ptr(ops.points),
        rt.i32(ops.p), rt.i32(ops.bits), rt.i32(ops.group_size.bit_length() - 1),
        rt.i32(ops.per_row), rt.i32(width), rt.i32(int(not rotated)),
        rt.f32(hadamard_scale(ops.group_size)), rt.ptr(out),
    ), shared_mem=shared)  # fmt: skip
    return out


def dequantize(ops: HiggsOperands, dtype: torch.dtype, rotated: bool) -> torch.Tensor:
    """The decoded weight, 2-D (``rows x width`` rotated, ``rows x cols`` otherwise)."""
    k = kind(dtype)
    width = ops.width if rotated else ops.cols
    out = torch.empty(ops.rows, width, dtype=dtype if k else torch.float32, device=ops.device)
    dequantize_into(ops, out, rotated)
    return out if k else out.to(dtype)


def fusable(ops: HiggsOperands) -> bool:
    """Whether the fused HIGGS kernel runs this weight: a byte-aligned code width (``ops.bits``
    is the width of one code, :data:`HIGGS_MATVEC_GRIDS`) and groups of whole 16-byte chunks."""
    return (ops.p, ops.bits) in HIGGS_MATVEC_GRIDS and ops.group_bytes % 16 == 0


def matvec(ops: HiggsOperands, x_rot: torch.Tensor) -> torch.Tensor:
    """``x_rot @ W_rot.T`` for rotated float32 activations ``[tokens <= 16, width]``; float32."""
    if not fusable(ops):
        raise ValueError(f"HIGGS grid p={ops.p} with {ops.bits}-bit codes is not fusable")
    if not isinstance(x_rot, torch.Tensor) or x_rot.dtype != torch.float32:
        raise TypeError("x_rot must be a float32 tensor")
    x_rot, tile = fused_input("x_rot", x_rot, ops.width, ops.device)
    tokens = int(x_rot.shape[0])
    y = torch.empty(tokens, ops.rows, dtype=torch.float32, device=ops.device)
    if ops.rows == 0:
        return y
    fn = rt.kernel(variant("higgs_matvec", p=ops.p, bits=ops.bits), higgs_matvec_kernel(tile), ops.device)
    rt.launch(fn, ops.device, -(-ops.rows // _ROWS_PER_BLOCK), 32 * _ROWS_PER_BLOCK, (
        rt.ptr(ops.codes), rt.ptr(ops.scales), rt.i32(ops.scale_fmt), rt.ptr(ops.points),
        rt.ptr(x_rot), rt.ptr(y), rt.i32(ops.rows), rt.i32(ops.width),
        rt.i32(ops.group_size.bit_length() - 1), rt.i32(tokens),
    ))  # fmt: skip
    return y


def decoded_linear(ops: HiggsOperands, x_rot: torch.Tensor) -> torch.Tensor:
    """``x_rot @ W_rot.T`` (float32) with ``W_rot`` decoded into the reused workspace."""
    w = workspace(ops.rows * ops.width, torch.float32, ops.device).view(ops.rows, ops.width)
    dequantize_into(ops, w, rotated=True)
    return torch.nn.functional.linear(x_rot.float(), w)
