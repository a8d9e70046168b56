"""The fused 4-bit linear product: ``x @ W.T`` for a packed 2-D weight, without decoding ``W``.

:func:`operands` is the one place that turns a :class:`PackedTensor` into what the native kernel
reads (codes, float32 scales per block, 16 levels); formats with more parts extend it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from bofrs import _native
from bofrs._dtypes import NATIVE_FLOATS, to_native
from bofrs.formats.blockwise.packed import PackedTensor

#: Activation dtypes the fused kernel reads directly.
FUSED_DTYPES = tuple(NATIVE_FLOATS)


@dataclass(frozen=True)
class Operands:
    """What the fused kernel reads for a weight ``[out_features, in_features]``."""

    codes: npt.NDArray[np.uint8]
    scales: npt.NDArray[np.float32]
    levels: npt.NDArray[np.float32]
    out_features: int
    in_features: int
    block_size: int


def fusable(packed: PackedTensor) -> bool:
    """Whether the fused kernel can run this weight: 2-D, on CPU, whole blocks per row (the
    kernel multiplies by the codes as stored: rotated weights and OPQ outliers need the extra
    steps of :class:`bofrs.nn.QuantLinear`)."""
    return (
        len(packed.shape) == 2
        and packed.device.type == "cpu"
        and packed.shape[1] % packed.block_size == 0
    )


def operands(packed: PackedTensor) -> Operands:
    """The kernel's view of a packed 2-D CPU weight (no copy of the codes)."""
    if not fusable(packed):
        raise ValueError(
            "the fused kernel needs a 2-D CPU weight whose rows hold whole blocks, got "
            f"shape {tuple(packed.shape)} with block_size={packed.block_size} on {packed.device}"
        )
    out_features, in_features = packed.shape
    return Operands(
        packed.codes.contiguous().numpy(),
        packed.decoded_scales().float().contiguous().numpy(),
        packed.codebook.levels,
        int(out_features),
        int(in_features),
        packed.block_size,
    )


#: How activations enter the fused product: ``"float"`` (default) widens them exactly to float32
#: (results within float rounding of ``x @ W.T``). The opt-in integer modes quantize them per
#: group (``q = round(x / d)``, ``d = max|x| / QMAX``) and run exact integer dot products with
#: the levels rounded the same way (``dl = max|level| / QMAX``); the error is at most
#: ``|level| d / 2 + (|x| + d / 2) dl / 2`` per product, times the block scale:
#:
#: - ``"int16"``: groups of 64, ``QMAX = 16383``; about 6e-5 of ``sum |w x|``;
#: - ``"int8"``: groups of 32, ``QMAX = 127`` (the scheme of llama.cpp's 4-bit formats): the
#:   fastest at batch 1, about 7e-3 of ``|y|`` on random inputs, small beside the 4-bit
#:   weight error (about 0.1 of ``|y|``).
ACTIVATION_MODES = ("float", "int16", "int8")
#: (group size, QMAX) of each integer mode of :data:`ACTIVATION_MODES`.
INTEGER_MODES = {"int16": (64, 16383.0), "int8": (32, 127.0)}


def check_activations(activations: object) -> str:
    """``activations`` if it names a mode of :data:`ACTIVATION_MODES`, else a clear error."""
    if not isinstance(activations, str):
        raise TypeError(f"activations must be a str, got {type(activations).__name__}")
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    return activations




def fused_matmul(
    x: torch.Tensor, ops: Operands, isa: str | None = None, activations: str = "float"
) -> torch.Tensor:
    """``x @ W.T`` for 2-D CPU ``x`` ``[tokens, in_features]`` (float32 / bfloat16 / float16):
    float32 accumulation, result in ``x.dtype``; ``activations`` as :data:`ACTIVATION_MODES`."""
    if x.dim() != 2 or x.shape[1] != ops.in_features:
        raise ValueError(
            f"input must have shape [tokens, {ops.in_features}], got {tuple(x.shape)}"
        )
    element = NATIVE_FLOATS.get(x.dtype)
    if element is None:
        raise TypeError(f"input dtype must be float32, bfloat16 or float16, got {x.dtype}")
    return fused_rows(x, ops, element, isa, check_activations(activations))


def fused_rows(
    x: torch.Tensor, ops: Operands, element: str, isa: str | None = None, activations: str = "float"
) -> torch.Tensor:
    """:func:`fused_matmul` without argument checks (``x`` 2-D CPU, ``element`` its dtype name)."""
    flat = x.reshape(-1)  # contiguous (a view when x is, a copy otherwise)
    if flat.requires_grad:
        flat = flat.detach()
    data = to_native(flat)
    tokens = x.shape[0]
    out = _native.matvec(
        data, element, tokens, ops.codes, ops.scales, ops.levels,
        ops.out_features, ops.in_features, ops.block_size, isa, activations,
    )  # fmt: skip
    y = torch.from_numpy(out).view(tokens, ops.out_features)
    return y if element == "float32" else y.to(x.dtype)

def quant_matmul(
    x: torch.Tensor, packed: PackedTensor, *, isa: str | None = None, activations: str = "float"
) -> torch.Tensor:
    """``x @ packed.dequantize().T`` for any batch shape ``[..., in_features]``, with the fused
    kernel (CPU, float32 / bfloat16 / float16 input, 2-D weight with whole blocks per row).
    ``activations="int16"`` or ``"int8"`` opts in to a faster, approximate path
    (:data:`ACTIVATION_MODES`)."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"packed must be a bofrs.PackedTensor, got {type(packed).__name__}")
    if packed.rotation is not None or packed.outliers is not None:
        raise ValueError("quant_matmul takes plain packed weights; use bofrs.nn.QuantLinear for "
                         "rotated weights or OPQ outliers")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU for the fused kernel, got {x.device}")
    ops = operands(packed)
    if x.dim() == 0 or x.shape[-1] != ops.in_features:
        raise ValueError(f"x must end in {ops.in_features} features, got shape {tuple(x.shape)}")
    y = fused_matmul(x.reshape(-1, ops.in_features), ops, isa, activations)
    return y.reshape(*x.shape[:-1], ops.out_features)
