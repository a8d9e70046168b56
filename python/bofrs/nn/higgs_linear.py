"""HiggsLinear: an ``nn.Linear`` replacement holding a HIGGS-packed weight."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bofrs import _cuda, _native
from bofrs._cuda import _higgs as _cuda_higgs
from bofrs._cuda._hadamard import hadamard_groups
from bofrs.formats.hadamard import hadamard
from bofrs.formats.higgs.grids import Grid
from bofrs.formats.higgs.tensor import HiggsTensor, pack_higgs
from bofrs.nn.base import PackedLinear
from bofrs.nn.linear import FUSED_MAX_TOKENS


class HiggsLinear(PackedLinear):
    """``y = x @ W.T + b`` with ``W`` stored as a :class:`bofrs.HiggsTensor`.

    The weight stays in its rotated basis: the input is padded to whole groups and rotated by
    the same Hadamard transform per group, then multiplied by the rotated weight
    (``W x = W_rot hadamard(x)``). On CPU, up to ``fused_max_tokens`` rows use the fused Rust
    kernel (one group of the weight decoded at a time); larger batches and other devices decode
    ``W_rot`` and call ``F.linear``. Frozen weight, gradients to the input (LoRA-ready).

    State: buffers ``codes`` (uint8), ``scales`` (storage dtype, kept under ``module.to``) and
    ``grid_points`` (float32); parameter ``bias`` or ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    grid_points: torch.Tensor
    KEEP_DTYPE = ("scales", "grid_points")

    def __init__(
        self,
        packed: HiggsTensor,
        bias: torch.Tensor | None = None,
        *,
        fused_max_tokens: int = FUSED_MAX_TOKENS,
    ) -> None:
        super().__init__()
        if not isinstance(packed, HiggsTensor):
            raise TypeError(f"packed must be a bofrs.HiggsTensor, got {type(packed).__name__}")
        self._init_linear(packed.shape, packed.dtype, bias, fused_max_tokens)
        self.group_size = packed.group_size
        self.grid_p, self.grid_n, self.grid_mse = packed.grid.p, packed.grid.n, packed.grid.mse
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("grid_points", torch.from_numpy(np.array(packed.grid.points, dtype=np.float32)))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        p: int = 2,
        group_size: int = 1024,
        *,
        scale_dtype: str = "float16",
        fused_max_tokens: int = FUSED_MAX_TOKENS,
    ) -> HiggsLinear:
        """Quantizes ``linear.weight`` with :func:`bofrs.pack_higgs` and copies its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        packed = pack_higgs(linear.weight.detach(), bits, p, group_size, scale_dtype=scale_dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, bias, fused_max_tokens=fused_max_tokens)

    def packed_buffer_names(self) -> tuple[str, ...]:
        """The buffers that together hold the packed weight."""
        return ("codes", "scales", "grid_points")

    @property
    def packed(self) -> HiggsTensor:
        """The weight as a :class:`bofrs.HiggsTensor` (views of the buffers; the same object while
        the buffers are unchanged, so its CUDA operands are validated once)."""
        return self._cached("packed", self._build_packed)  # type: ignore[no-any-return]

    def _build_packed(self) -> HiggsTensor:
        points = self.grid_points.detach().cpu().numpy().reshape(self.grid_n, self.grid_p)
        grid = Grid(self.grid_p, self.grid_n, points, self.grid_mse)
        return HiggsTensor(
            self.codes, self.scales, torch.Size((self.out_features, self.in_features)),
            self.weight_dtype, self.group_size, grid,
        )  # fmt: skip

    @property
    def padded_in_features(self) -> int:
        """Input length in the rotated basis (whole groups)."""
        return -(-self.in_features // self.group_size) * self.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight ``[out_features, in_features]`` in the original basis."""
        return self.packed.dequantize(dtype)

    def _cuda_operands(self) -> _cuda_higgs.HiggsOperands:
        """CUDA operands, cached until the buffers are replaced or modified in place."""
        return self.packed.cuda_operands()

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA product: rotate (kernel), then the fused HIGGS matvec for up to
        ``min(fused_max_tokens, 16)`` tokens, else ``W_rot`` decoded into the shared workspace
        and ``F.linear``."""
        ops = self._cuda_operands()
        rows = x.detach().reshape(-1, self.in_features).float()
        padded = F.pad(rows, (0, self.padded_in_features - self.in_features)).contiguous()
        rotated = hadamard_groups(padded, self.group_size)
        tokens = rows.shape[0]
        if _cuda_higgs.fusable(ops) and 1 <= tokens <= min(self.fused_max_tokens, _cuda_higgs.MAX_FUSED_TOKENS):
            y = _cuda_higgs.matvec(ops, rotated)
        else:
            y = _cuda_higgs.decoded_linear(ops, rotated)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.codes.device == x.device and _cuda.enabled(x.device):
            return self._cuda_matmul(x)
        rows = x.detach().reshape(-1, self.in_features).float()
        padded = F.pad(rows, (0, self.padded_in_features - self.in_features))
        rotated = hadamard(padded, self.group_size)
        if x.is_cpu and rows.shape[0] <= self.fused_max_tokens:
            out = _native.matvec_higgs(
                rotated.contiguous().numpy().reshape(-1), rows.shape[0],
                self.codes.contiguous().numpy(), self.scales.float().contiguous().numpy(),
                self.out_features, self.in_features, self.group_size, self.grid_p,
                self.grid_points.contiguous().numpy().reshape(-1),
            )  # fmt: skip
            y = torch.from_numpy(out).view(rows.shape[0], self.out_features)
        else:
            weight = self.packed.rotated(torch.float32).to(x.device)
            y = F.linear(rotated.to(x.device), weight)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, p={self.grid_p}, n={self.grid_n}, "
            f"group_size={self.group_size}"
        )
