"""QuantLinear: a drop-in ``nn.Linear`` replacement holding a 4-bit packed weight."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bofrs import _cuda
from bofrs._cuda import _blockwise as _cuda_blockwise
from bofrs._cuda._hadamard import hadamard_groups
from bofrs._dtypes import NATIVE_FLOATS, dtype_name
from bofrs.formats.blockwise.codebooks import Codebook
from bofrs.formats.blockwise.matmul import (
    Operands,
    check_activations,
    fusable,
    fused_rows,
    operands,
)
from bofrs.formats.blockwise.outliers import Outliers
from bofrs.formats.blockwise.packed import PackedTensor
from bofrs.formats.hadamard import hadamard
from bofrs.formats.pack import pack
from bofrs.nn.base import PackedLinear

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


class QuantLinear(PackedLinear):
    """``y = x @ W.T + b`` with ``W`` stored as a 4-bit :class:`bofrs.PackedTensor`.

    Inputs of any batch shape ``[..., in_features]`` in float32, bfloat16 or float16 (float64
    too, by decoding); the output has the input's dtype. On CPU, up to ``fused_max_tokens`` rows
    run through the fused Rust kernel (the weight is never decoded); larger batches, other
    devices and weights whose rows do not hold whole blocks decode the weight to the input dtype
    and call ``F.linear``. The weight is frozen; gradients flow to the input (and to ``bias`` if
    it requires grad), so LoRA adapters train on top (see :func:`bofrs.nn.lora_config`).

    Every packed-tensor feature is supported: double-quantized scales, OPQ outliers (added as a
    sparse correction after the fused product) and a Hadamard rotation (the input is rotated
    per group, then multiplied by the rotated weight: ``W x = W_rot hadamard(x)``).

    ``activations`` picks how the fused kernel multiplies: ``"float"`` (default; outputs within
    float rounding of ``x @ W.T``), or, opt-in, ``"int16"`` (activations quantized to int16 per
    64 values, error about 6e-5 of ``sum |w x|``) or ``"int8"`` (int8 per 32, as llama.cpp: the
    fastest at batch 1, error about 7e-3 of ``|y|``); see :data:`bofrs.nn.ACTIVATION_MODES`. A
    runtime setting: an attribute, not saved in checkpoints.

    State: buffers ``codes`` (uint8) and ``scales`` (their storage dtype), and when used
    ``scale_scales`` (float32, dq8), ``outlier_indices`` / ``outlier_values``; none of them is
    cast by ``module.to(dtype)``. Parameter ``bias`` or ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    KEEP_DTYPE = ("scales", "scale_scales", "outlier_values")

    def __init__(
        self,
        packed: PackedTensor,
        bias: torch.Tensor | None = None,
        *,
        fused_max_tokens: int = FUSED_MAX_TOKENS,
        activations: str = "float",
    ) -> None:
        super().__init__()
        if not isinstance(packed, PackedTensor):
            raise TypeError(f"packed must be a bofrs.PackedTensor, got {type(packed).__name__}")
        self._init_linear(packed.shape, packed.dtype, bias, fused_max_tokens)
        self.activations = activations
        self.block_size = packed.block_size
        self.codebook: Codebook = packed.codebook
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.rotation: int | None = packed.rotation
        self.outlier_q: float | None = None
        if packed.scale_scales is not None:
            self.register_buffer("scale_scales", packed.scale_scales)
        if packed.outliers is not None:
            self.outlier_q = packed.outliers.q
            self.register_buffer("outlier_indices", packed.outliers.indices)
            self.register_buffer("outlier_values", packed.outliers.values)

    def packed_buffer_names(self) -> tuple[str, ...]:
        """The buffers that together hold the packed weight."""
        return tuple(n for n in _PACKED_BUFFERS if n in self._buffers)

    @property
    def activations(self) -> str:
        """How the fused kernel takes the activations: ``"float"``, or ``"int16"`` / ``"int8"``
        (opt-in)."""
        return self._activations

    @activations.setter
    def activations(self, value: str) -> None:
        self._activations = check_activations(value)

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
        opq: float | None = None,
        rotation: str | int | None = None,
        fused_max_tokens: int = FUSED_MAX_TOKENS,
    ) -> QuantLinear:
        """Quantizes ``linear.weight`` (kept on its device; options as :func:`bofrs.pack`) and
        copies its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        packed = pack(
            linear.weight.detach(), codebook, block_size, scale_dtype=scale_dtype, opq=opq,
            rotation=rotation,
        )
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, bias, fused_max_tokens=fused_max_tokens)

    @property
    def packed(self) -> PackedTensor:
        """The weight as a :class:`PackedTensor` (views of the buffers, no copy; the same object
        while the buffers are unchanged, so its CUDA operands are validated once)."""
        return self._cached("packed", self._build_packed)  # type: ignore[no-any-return]

    def _build_packed(self) -> PackedTensor:
        outliers = None
        if self.outlier_q is not None:
            outliers = Outliers(
                self._buffers["outlier_indices"],  # type: ignore[arg-type]
                self._buffers["outlier_values"],  # type: ignore[arg-type]
                self.outlier_q,
            )
        return PackedTensor(
            self.codes,
            self.scales,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.block_size,
            self.codebook,
            scale_scales=self._buffers.get("scale_scales"),
            outliers=outliers,
            rotation=self.rotation,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight ``[out_features, in_features]`` (default: the original dtype)."""
        return self.packed.dequantize(dtype)

    def _input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return _decoded_matmul(grad, self.packed, transpose=False)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without bias, fused for few tokens on CPU."""
        rows = x.reshape(-1, self.in_features)
        if x.is_cuda and self.codes.device == x.device and _cuda.enabled(x.device):
            return self._cuda_cached().apply(rows, self.fused_max_tokens).view(
                *x.shape[:-1], self.out_features
            )
        element = NATIVE_FLOATS.get(x.dtype)
        ops = None
        if element is not None and x.is_cpu and rows.shape[0] <= self.fused_max_tokens:
            ops = self._operands()
        if ops is not None:
            y = ops.apply(rows, element, self._activations)  # type: ignore[arg-type]
        else:
            y = _decoded_matmul(rows, self.packed, transpose=True)
        return y.view(*x.shape[:-1], self.out_features)

    def _operands(self) -> _Fused | None:
        """Kernel operands (``None`` if the weight is not fusable: not on CPU, or rows that do
        not hold whole blocks); cached until the buffers are replaced or modified in place."""

        def build() -> _Fused | None:
            packed = self.packed
            return _Fused.of(packed) if fusable(packed) else None

        return self._cached("fused", build)  # type: ignore[no-any-return]

    def _cuda_cached(self) -> _CudaFused:
        """The CUDA operands, cached like :meth:`_operands`."""
        return self._cached("cuda", lambda: _CudaFused.of(self.packed))  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, codebook={self.codebook.name!r}, "
            f"block_size={self.block_size}, scale_dtype={dtype_name(self.scales.dtype)}"
            + ("" if self.outlier_q is None else f", opq={self.outlier_q}")
            + ("" if self.rotation is None else f", rotation={self.rotation}")
            + ("" if self._activations == "float" else f", activations={self._activations!r}")
        )


#: Buffers of a QuantLinear that hold its packed weight.
_PACKED_BUFFERS = ("codes", "scales", "scale_scales", "outlier_indices", "outlier_values")


def set_activations(model: torch.nn.Module, activations: str) -> int:
    """Sets :attr:`QuantLinear.activations` on every :class:`QuantLinear` of ``model`` (for
    example ``"int8"`` for the fastest CPU decoding); returns how many layers were set."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_activations(activations)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.activations = activations
    return len(layers)


class _Fused:
    """The fused product of one packed weight: kernel operands, plus the input rotation and
    the sparse outlier correction ``y[:, r] += x[:, c] * (outlier - decoded code)``."""

    def __init__(
        self, ops: Operands, rotation: int | None, correction: tuple[torch.Tensor, ...] | None
    ) -> None:
        self.ops, self.rotation, self.correction = ops, rotation, correction

    @classmethod
    def of(cls, packed: PackedTensor) -> _Fused:
        correction = None
        if packed.outliers is not None and packed.outliers.count:
            flat = packed.outliers.indices.long()
            plain = PackedTensor(
                packed.codes, packed.scales, packed.shape, packed.dtype, packed.block_size,
                packed.codebook, scale_scales=packed.scale_scales, rotation=packed.rotation,
            )  # fmt: skip
            base = plain.dequantize_rotated(torch.float32).reshape(-1)[flat]
            delta = packed.outliers.values.float() - base
            cols = packed.shape[1]
            correction = (flat // cols, flat % cols, delta)
        return cls(operands(packed), packed.rotation, correction)

    def apply(self, rows: torch.Tensor, element: str, activations: str = "float") -> torch.Tensor:
        """``rows @ W.T`` for 2-D CPU ``rows`` of dtype ``element``."""
        if self.rotation is None and self.correction is None:
            return fused_rows(rows, self.ops, element, None, activations)  # in rows.dtype
        x = rows
        if self.rotation is not None:
            x = hadamard(rows.float(), self.rotation)
            element = "float32"
        y = fused_rows(x, self.ops, element, None, activations)
        if self.correction is not None:
            out_rows, in_cols, delta = self.correction
            y = y.float()
            y.index_add_(1, out_rows, x.float()[:, in_cols] * delta)
        return y.to(rows.dtype)



class _CudaFused:
    """The CUDA product of one packed weight: validated device operands, the input rotation,
    and the OPQ correction of the fused kernel (as :class:`_Fused`). Up to
    ``min(fused_max_tokens, 16)`` tokens run the fused matvec; more decode the weight (rotated,
    outliers included) into the shared workspace and call ``F.linear`` (cuBLAS)."""

    def __init__(
        self, ops: _cuda_blockwise.BlockOperands, rows: int, cols: int, rotation: int | None,
        correction: tuple[torch.Tensor, ...] | None,
    ) -> None:  # fmt: skip
        self.ops, self.rows, self.cols = ops, rows, cols
        self.rotation, self.correction = rotation, correction
        self.fusable = _cuda_blockwise.fusable(ops, rows, cols)

    @classmethod
    def of(cls, packed: PackedTensor) -> _CudaFused:
        ops = packed.cuda_operands()
        rows, cols = (int(d) for d in packed.shape)
        correction = None
        if ops.outlier_indices is not None and ops.outlier_indices.numel():
            flat = _cuda_blockwise.wide_indices(ops.outlier_indices)
            plain = _cuda_blockwise.BlockOperands(
                ops.codes, ops.scales, ops.params, ops.scale_fmt, ops.levels, ops.numel,
                ops.block_size, None, None,
            )  # fmt: skip
            base = _cuda_blockwise.dequantize(plain, torch.float32)[flat]
            assert ops.outlier_values is not None
            delta = ops.outlier_values.float() - base
            correction = (flat // cols, flat % cols, delta)
        return cls(ops, rows, cols, packed.rotation, correction)

    def apply(self, rows: torch.Tensor, fused_max_tokens: int) -> torch.Tensor:
        """``rows @ W.T`` for 2-D CUDA ``rows``, in ``rows.dtype``."""
        tokens = rows.shape[0]
        kind = _cuda_blockwise.kind(rows.dtype)
        limit = min(fused_max_tokens, _cuda_blockwise.MAX_FUSED_TOKENS)
        if self.fusable and kind is not None and 1 <= tokens <= limit:
            x = rows
            if self.rotation is not None:
                x = hadamard_groups(rows.detach().float().contiguous(), self.rotation)
            y = _cuda_blockwise.matvec(self.ops, x.contiguous(), self.rows, self.cols)
            if self.correction is not None:
                out_rows, in_cols, delta = self.correction
                y = y.float()
                y.index_add_(1, out_rows, x.float()[:, in_cols] * delta)
            return y.to(rows.dtype)
        if self.rotation is None:
            return _cuda_blockwise.decoded_linear(self.ops, rows.detach(), self.rows, self.cols)
        compute = rows.dtype if kind is not None else torch.float32
        x_rot = hadamard_groups(rows.detach().float().contiguous(), self.rotation).to(compute)
        return _cuda_blockwise.decoded_linear(self.ops, x_rot, self.rows, self.cols).to(rows.dtype)
