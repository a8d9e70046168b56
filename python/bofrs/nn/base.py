"""What every packed Linear module shares: shape and bias handling, input checks, the frozen
autograd product, and packed buffers that keep their dtype under ``module.to(dtype)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import nn

from bofrs.formats.tensor import QuantizedTensor


class _FrozenMatmul(torch.autograd.Function):
    """``x @ W.T`` with the packed weight frozen: gradients flow to ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: PackedLinear = ctx.layer
        return layer._input_grad(grad), None


class PackedLinear(nn.Module):
    """Base of :class:`bofrs.nn.QuantLinear` and :class:`bofrs.nn.HiggsLinear`."""

    #: Buffers moved as raw bytes by ``module.to``: their storage dtype never changes.
    KEEP_DTYPE: ClassVar[tuple[str, ...]] = ()

    def _init_linear(
        self,
        shape: torch.Size,
        dtype: torch.dtype,
        bias: torch.Tensor | None,
        fused_max_tokens: int,
    ) -> None:
        if len(shape) != 2:
            raise ValueError(f"packed must hold a 2-D weight, got shape {tuple(shape)}")
        if isinstance(fused_max_tokens, bool) or not isinstance(fused_max_tokens, int) or fused_max_tokens < 0:
            raise ValueError(f"fused_max_tokens must be an int >= 0, got {fused_max_tokens!r}")
        self.out_features, self.in_features = (int(d) for d in shape)
        self.weight_dtype: torch.dtype = dtype
        self.fused_max_tokens = fused_max_tokens
        #: Values derived from the packed buffers (operands, the packed tensor), see :meth:`_cached`.
        self._caches: dict[str, tuple[tuple[torch.Tensor | None, ...], tuple[int, ...], Any]] = {}
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},)")
            self.bias: nn.Parameter | None = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without bias."""
        raise NotImplementedError

    def packed_buffer_names(self) -> tuple[str, ...]:
        """The buffers that together hold the packed weight."""
        raise NotImplementedError

    @property
    def packed(self) -> QuantizedTensor:
        """The weight as a packed tensor (views of the buffers)."""
        raise NotImplementedError

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, kept under ``key`` while every packed buffer is the same object at the
        same version (holding the tensors keeps their ids unique while cached); replaced or
        modified buffers rebuild it."""
        present = self._buffers
        names = self.packed_buffer_names()
        cache = self._caches.get(key)
        if cache is not None:
            tensors, versions, value = cache
            if len(tensors) == len(names):
                for name, tensor, version in zip(names, tensors, versions):
                    now = present.get(name)
                    if now is not tensor or (now is not None and now._version != version):
                        break
                else:
                    return value
        tensors = tuple(present.get(n) for n in names)
        versions = tuple(-1 if t is None else t._version for t in tensors)
        value = build()
        self._caches[key] = (tensors, versions, value)
        return value

    def invalidate_caches(self) -> None:
        """Drops every value derived from the packed buffers (they are rebuilt on next use)."""
        self._caches.clear()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight ``[out_features, in_features]``."""
        raise NotImplementedError

    def _input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad @ W`` for the backward pass (the weight decoded; 16-bit grads in float32)."""
        weight = self.dequantize(torch.float32).to(grad.device)
        return (grad.float() @ weight).to(grad.dtype)

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
            y = cast(torch.Tensor, _FrozenMatmul.apply(input, self))
        else:
            y = self._matmul(input)
        bias = self.bias
        if bias is not None:
            y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        return y

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLinear:
        kept = {n: b.dtype for n in self.KEEP_DTYPE if (b := self._buffers.get(n)) is not None}
        for name in kept:
            self._buffers[name] = self._buffers[name].view(torch.uint8)  # type: ignore[union-attr]
        try:
            super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        finally:
            for name, dtype in kept.items():
                self._buffers[name] = self._buffers[name].view(dtype)  # type: ignore[union-attr]
            self._after_apply()
        return self

    def _after_apply(self) -> None:
        """Hook run after ``module.to``: the derived values are stale."""
        self.invalidate_caches()
