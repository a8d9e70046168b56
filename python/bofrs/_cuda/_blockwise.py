"""Block-wise formats on CUDA: validated device operands, dequantize, fused matvec, and the
dequantize-into-a-workspace + cuBLAS product for large batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._dtypes import NATIVE_FLOATS
from . import _runtime as rt
from ._sources import (
    KINDS,
    MATVEC_CHUNK,
    SCALE_FORMATS,
    TOKEN_TILES,
    matvec_kernel,
    variant,
)

#: Largest token count of the fused kernel.
MAX_FUSED_TOKENS = TOKEN_TILES[-1]
_THREADS = 256
_MATVEC_ROWS_PER_BLOCK = 8
_levels_cache: dict[tuple[bytes, str], torch.Tensor] = {}


def kind(dtype: torch.dtype) -> str | None:
    """Kernel element name of a torch dtype (None if the kernels do not read / write it)."""
    return NATIVE_FLOATS.get(dtype)


def device_levels(levels: np.ndarray, device: torch.device) -> torch.Tensor:
    """The 16 float32 levels on ``device`` (cached per table and device)."""
    data = np.ascontiguousarray(levels, dtype=np.float32)
    if data.shape != (16,):
        raise ValueError(f"the CUDA kernels take 16-level codebooks, got {data.shape[0]} levels")
    key = (data.tobytes(), str(device))
    t = _levels_cache.get(key)
    if t is None:
        t = torch.from_numpy(data.copy()).to(device)
        _levels_cache[key] = t
    return t


def _check(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], numel: int,
           device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} values, got {t.numel()}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


@dataclass(frozen=True)
class BlockOperands:
    """A packed block-wise tensor as the kernels read it (validated once, all on one device).

    ``codes`` uint8 (16-byte aligned), ``scales`` in their storage dtype, ``params`` the dq8
    ``[lo, step]`` pairs (float32; a 2-value dummy otherwise), ``levels`` float32 (16),
    ``outlier_indices`` / ``outlier_values`` (None without OPQ).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    params: torch.Tensor
    scale_fmt: int
    levels: torch.Tensor
    numel: int
    block_size: int
    outlier_indices: torch.Tensor | None
    outlier_values: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.codes.device


def wide_indices(indices: torch.Tensor) -> torch.Tensor:
    """Outlier indices (uint16 / uint32 / uint64) as int64 on their device (through the CPU
    when this torch cannot convert unsigned types on the device)."""
    try:
        return indices.to(torch.int64)
    except (RuntimeError, TypeError, NotImplementedError):
        return indices.cpu().to(torch.int64).to(indices.device)


def fused_input(
    name: str, x: torch.Tensor, width: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Checks activations ``[1..MAX_FUSED_TOKENS, width]`` on ``device`` for a fused kernel;
    returns them aligned and the token tile (kernel variant) that covers them."""
    if x.dim() != 2 or x.shape[1] != width or not 1 <= x.shape[0] <= MAX_FUSED_TOKENS:
        raise ValueError(
            f"{name} must have shape [1..{MAX_FUSED_TOKENS}, {width}], got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    tokens = int(x.shape[0])
    return _aligned(x.detach()), next(t for t in TOKEN_TILES if t >= tokens)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def operands(
    codes: torch.Tensor,
    scales: torch.Tensor,
    scale_scales: torch.Tensor | None,
    signed: bool,
    levels: np.ndarray,
    numel: int,
    block_size: int,
    outlier_indices: torch.Tensor | None = None,
    outlier_values: torch.Tensor | None = None,
) -> BlockOperands:
    """Checks a packed tensor's parts (what the CPU decoder checks: shapes, finite scales,
    dq8 parameters finite and non-negative, outlier indices ascending and in range, finite
    outlier values) and returns its :class:`BlockOperands`. Synchronizes once (the checks)."""
    device = codes.device
    rt.require(device)
    if block_size & (block_size - 1) or not 16 <= block_size <= 4096:
        raise ValueError(f"block_size must be a power of two in 16..4096, got {block_size}")
    blocks = -(-numel // block_size)
    _check(codes, "codes", (torch.uint8,), (numel + 1) // 2, device)
    scales = scales.contiguous()
    _check(scales, "scales", (torch.float32, torch.bfloat16, torch.float16, torch.uint8), blocks, device)
    bad: list[torch.Tensor] = []
    messages: list[str] = []
    if scales.dtype == torch.uint8:
        if scale_scales is None:
            raise ValueError("double-quantized scales need scale_scales")
        params = scale_scales.contiguous()
        _check(params, "scale_scales", (torch.float32,), 2 * (-(-blocks // 256)), device)
        fmt = SCALE_FORMATS["dq8s" if signed else "dq8"]
        bad.append(~(torch.isfinite(params) & (params >= 0)).all())
        messages.append("scale_scales must be finite and non-negative")
        # Decoded magnitudes: lo + 127 or 254 steps at most must stay finite.
        top = params[:, 0] + params[:, 1] * (126.0 if signed else 254.0)
        bad.append(~torch.isfinite(top).all())
        messages.append("double-quantized scales are not finite")
    else:
        params = torch.zeros(2, dtype=torch.float32, device=device)
        fmt = SCALE_FORMATS[str(scales.dtype).removeprefix("torch.")]
        bad.append(~torch.isfinite(scales.float()).all())
        messages.append("scales must be finite")
    if (outlier_indices is None) != (outlier_values is None):
        raise ValueError("outlier indices and values come together")
    if outlier_indices is not None and outlier_values is not None:
        count = outlier_indices.numel()
        _check(outlier_indices, "outlier_indices", (torch.uint16, torch.uint32, torch.uint64), count, device)
        _check(outlier_values, "outlier_values", (torch.bfloat16, torch.float16), count, device)
        if count:
            wide = wide_indices(outlier_indices)
            ok = (wide[0] >= 0) & (wide[-1] < numel)
            if count > 1:
                ok = ok & (wide[1:] > wide[:-1]).all()
            bad.append(~ok)
            messages.append(f"outlier_indices must be strictly ascending and below {numel}")
            bad.append(~torch.isfinite(outlier_values.float()).all())
            messages.append("outlier_values must be finite")
    flags = torch.stack(bad).cpu().tolist() if bad else []
    for flag, message in zip(flags, messages):
        if flag:
            raise ValueError(message)
    return BlockOperands(
        _aligned(codes), scales, params, fmt, device_levels(levels, device), numel, block_size,
        outlier_indices, outlier_values,
    )  # fmt: skip


def dequantize_into(ops: BlockOperands, out: torch.Tensor) -> torch.Tensor:
    """Decodes into ``out`` (flat, ``numel`` values of float32 / bfloat16 / float16, on the
    operands' device, contiguous) and returns it."""
    k = kind(out.dtype)
    if k is None:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    _check(out, "out", (out.dtype,), ops.numel, ops.device)
    if out.data_ptr() % 16:
        raise ValueError("out must be 16-byte aligned")
    if ops.numel == 0:
        return out
    v = variant("dequant", out=KINDS[k])
    fn = rt.kernel(v, "bofrs_dequant", ops.device)
    chunks = -(-ops.numel // 32)
    blocks = min(-(-chunks // _THREADS), 65535 * 8)
    rt.launch(fn, ops.device, blocks, _THREADS, (
        rt.ptr(ops.codes), rt.ptr(ops.scales), rt.ptr(ops.params), rt.i32(ops.scale_fmt),
        rt.ptr(ops.levels), rt.i64(ops.numel), rt.i32(ops.block_size.bit_length() - 1),
        rt.ptr(out),
    ))  # fmt: skip
    if ops.outlier_indices is not None and ops.outlier_values is not None:
        count = ops.outlier_indices.numel()
        if count:
            scatter = rt.kernel(v, "bofrs_scatter_outliers", ops.device)
            rt.launch(scatter, ops.device, min(-(-count // _THREADS), 65535), _THREADS, (
                rt.ptr(ops.outlier_indices), rt.i32(ops.outlier_indices.element_size()),
                rt.ptr(ops.outlier_values), rt.i32(int(ops.outlier_values.dtype == torch.bfloat16)),
                rt.i64(count), rt.ptr(out),
            ))  # fmt: skip
    return out


def dequantize(ops: BlockOperands, dtype: torch.dtype) -> torch.Tensor:
    """The flat decoded tensor in ``dtype`` (float64 and others: decoded to float32, cast)."""
    k = kind(dtype)
    out = torch.empty(ops.numel, dtype=dtype if k else torch.float32, device=ops.device)
    dequantize_into(ops, out)
    return out if k else out.to(dtype)


def fusable(ops: BlockOperands, rows: int, cols: int) -> bool:
    """Whether the fused kernel runs a ``rows x cols`` weight: rows of whole blocks and whole
    32-value chunks (the kernel multiplies the codes as stored; OPQ outliers are the caller's
    sparse correction)."""
    return rows * cols == ops.numel and cols % ops.block_size == 0 and cols % (2 * MATVEC_CHUNK) == 0


def matvec(ops: BlockOperands, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x @ W.T`` for 2-D ``x`` ``[tokens <= 16, cols]`` (float32 / bfloat16 / float16, on the
    operands' device) with the fused kernel: float32 accumulation, result in ``x.dtype``.
    Ignores OPQ outliers (see :func:`fusable`)."""
    if not fusable(ops, rows, cols):
        raise ValueError(f"weight {rows}x{cols} with block_size={ops.block_size} is not fusable")
    k = kind(x.dtype) if isinstance(x, torch.Tensor) else None
    if k is None:
        raise TypeError("x must be a float32, bfloat16 or float16 tensor")
    x, tile = fused_input("x", x, cols, ops.device)
    tokens = int(x.shape[0])
    y = torch.empty(tokens, rows, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    fn = rt.kernel(variant("matvec", act=KINDS[k]), matvec_kernel(tile), ops.device)
    rt.launch(fn, ops.device, -(-rows // _MATVEC_ROWS_PER_BLOCK), 32 * _MATVEC_ROWS_PER_BLOCK, (
        rt.ptr(ops.codes), rt.ptr(ops.scales), rt.ptr(ops.params), rt.i32(ops.scale_fmt),
        rt.ptr(ops.levels), rt.ptr(x), rt.ptr(y), rt.i32(rows), rt.i32(cols),
        rt.i32(ops.block_size.bit_length() - 1), rt.i32(tokens),
    ))  # fmt: skip
    return y


_workspaces: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer of at least ``numel`` values for decoded weights, one per (device,
    current stream, dtype): grows to the largest weight and is reused by every layer (the
    stream orders its uses)."""
    index = rt.device_index(device)
    key = (index, torch.cuda.current_stream(index).cuda_stream, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=torch.device("cuda", index))
        _workspaces[key] = buf
    return buf[:numel]


def release_workspaces() -> None:
    """Frees the decode workspaces."""
    _workspaces.clear()


def decoded_linear(ops: BlockOperands, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x @ W.T`` for large batches: ``W`` decoded (outliers included) into the workspace in
    ``x.dtype``, then ``F.linear`` (cuBLAS)."""
    k = kind(x.dtype)
    compute = x.dtype if k else torch.float32
    w = dequantize_into(ops, workspace(ops.numel, compute, ops.device)).view(rows, cols)
    return torch.nn.functional.linear(x.to(compute), w).to(x.dtype)
