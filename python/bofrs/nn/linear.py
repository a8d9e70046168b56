"""QuantLinear: a drop-in ``nn.Linear`` replacement holding a 4-bit packed weight."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from .._codebooks import Codebook
from .._inputs import dtype_name
from .._linear import _ELEMENT, Operands, fusable, fused_rows, operands
from .._pack import pack
from .._packed import PackedTensor

#: Token counts up to this use the fused kernel on CPU; larger batches decode the weight once and
#: call ``F.linear``. Measured with ``benches/bench_matvec_vs_peers.py --crossover`` (4096x4096,
#: NF4 block 64, bf16 activations, 2-core AVX2 machine, four runs): the fused kernel is 5-15x
#: faster than decode + matmul at 1-8 tokens, 1.4-2.3x at 32, and 0.9-1.3x at 64.
FUSED_MAX_TOKENS = 32


def _decoded_matmul(x: torch.Tensor, packed: PackedTensor, *, transpose: bool) -> torch.Tensor:
    """``x @ W.T`` (``transpose``) or ``x @ W`` with ``W`` decoded, in ``x.dtype``. On CPU, 16-bit
    inputs are multiplied in float32 (faster there without native 16-bit matmul units, and
    more exact)."""
    compute = x.dtype
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        compute = torch.float32
    weight = packed.to(x.device).dequantize(compute)
    y = F.linear(x.to(compute), weight) if transpose else x.to(compute) @ weight
    return y.to(x.dtype)


class _FrozenQuantMatmul(torch.autograd.Function):
    """``x @ W.T`` with the packed weight frozen: gradients flow to ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: QuantLinear = ctx.layer
        return _decoded_matmul(grad, layer.packed, transpose=False), None


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as a 4-bit :class:`bofrs.PackedTensor`.

    Inputs of any batch shape ``[..., in_features]`` in float32, bfloat16 or float16 (float64
    too, by decoding); the output has the input's dtype. On CPU, up to ``fused_max_tokens`` rows
    run through the fused Rust kernel (the weight is never decoded); larger batches, other
    devices and weights whose rows do not hold whole blocks decode the weight to the input dtype
    and call ``F.linear``. The weight is frozen; gradients flow to the input (and to ``bias`` if
    it requires grad), so LoRA adapters train on top (see :func:`bofrs.nn.lora_config`).

    State: buffers ``codes`` (uint8) and ``scales`` (their storage dtype, never cast by
    ``module.to(dtype)``), parameter ``bias`` or ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        packed: PackedTensor,
        bias: torch.Tensor | None = None,
        *,
        fused_max_tokens: int = FUSED_MAX_TOKENS,
    ) -> None:
        super().__init__()
        if not isinstance(packed, PackedTensor):
            raise TypeError(f"packed must be a bofrs.PackedTensor, got {type(packed).__name__}")
        if len(packed.shape) != 2:
            raise ValueError(f"packed must hold a 2-D weight, got shape {tuple(packed.shape)}")
        if isinstance(fused_max_tokens, bool) or not isinstance(fused_max_tokens, int) or fused_max_tokens < 0:
            raise ValueError(f"fused_max_tokens must be an int >= 0, got {fused_max_tokens!r}")
        self.out_features, self.in_features = (int(d) for d in packed.shape)
        self.block_size = packed.block_size
        self.codebook: Codebook = packed.codebook
        self.weight_dtype: torch.dtype = packed.dtype
        self.fused_max_tokens = fused_max_tokens
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},)")
            self.bias: nn.Parameter | None = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._cache: tuple[torch.Tensor, torch.Tensor, tuple[int, int], Operands | None] | None = None

    # peft / GPTQ-style introspection: in and out features under the names peft looks for.
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes (uint8): tells peft the device, and that the weight is not float."""
        return self.codes

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        codebook: str | Codebook = "nf4",
        block_size: int = 64,
        *,
        scale_dtype: str = "bfloat16",
        fused_max_tokens: int = FUSED_MAX_TOKENS,
    ) -> QuantLinear:
        """Quantizes ``linear.weight`` (kept on its device) and copies its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        packed = pack(linear.weight.detach(), codebook, block_size, scale_dtype=scale_dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, bias, fused_max_tokens=fused_max_tokens)

    @property
    def packed(self) -> PackedTensor:
        """The weight as a :class:`PackedTensor` (views of the buffers, no copy)."""
        return PackedTensor(
            self.codes,
            self.scales,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.block_size,
            self.codebook,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight ``[out_features, in_features]`` (default: the original dtype)."""
        return self.packed.dequantize(dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not input.dtype.is_floating_point:
            raise TypeError(f"input must have a float dtype, got {input.dtype}")
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have shape [..., {self.in_features}], got {tuple(input.shape)}"
            )
        if torch.is_grad_enabled() and input.requires_grad:
            y = cast(torch.Tensor, _FrozenQuantMatmul.apply(input, self))
        else:
            y = self._matmul(input)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without bias, fused for few tokens on CPU."""
        rows = x.reshape(-1, self.in_features)
        element = _ELEMENT.get(x.dtype)
        ops = None
        if element is not None and x.is_cpu and rows.shape[0] <= self.fused_max_tokens:
            ops = self._operands()
        if ops is not None:
            y = fused_rows(rows, ops, element)  # type: ignore[arg-type]
        else:
            y = _decoded_matmul(rows, self.packed, transpose=True)
        return y.view(*x.shape[:-1], self.out_features)

    def _operands(self) -> Operands | None:
        """Kernel operands (``None`` if the weight is not fusable: not on CPU, or rows that do
        not hold whole blocks); cached until the buffers are replaced or modified in place."""
        codes, scales = self._buffers["codes"], self._buffers["scales"]
        assert codes is not None and scales is not None
        cache = self._cache
        if (
            cache is not None
            and cache[0] is codes
            and cache[1] is scales
            and cache[2] == (codes._version, scales._version)
        ):
            return cache[3]
        packed = self.packed
        ops = operands(packed) if fusable(packed) else None
        # Holding the tensors keeps their ids unique while cached.
        self._cache = (codes, scales, (codes._version, scales._version), ops)
        return ops

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # Scales keep their storage dtype under module.to(dtype) / .half(): cast as raw bytes.
        dtype = self.scales.dtype
        self._buffers["scales"] = self.scales.view(torch.uint8)
        try:
            super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        finally:
            self._buffers["scales"] = self._buffers["scales"].view(dtype)  # type: ignore[union-attr]
            self._cache = None
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, codebook={self.codebook.name!r}, "
            f"block_size={self.block_size}, scale_dtype={dtype_name(self.scales.dtype)}"
        )

