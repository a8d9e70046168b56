"""One projection of a transformers model handed to the native builder: a
:class:`bofrs.nn.QuantLinear` as its packed operands, an ``nn.Linear`` as dense float32."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from bofrs import _native
from bofrs.formats.blockwise.matmul import check_activations
from bofrs.formats.blockwise.packed import PackedTensor
from bofrs.nn.linear import QuantLinear, _Fused


def floats(t: torch.Tensor) -> npt.NDArray[np.float32]:
    """A tensor as a flat, contiguous float32 numpy array (a copy only when needed)."""
    return t.detach().to(torch.float32).contiguous().reshape(-1).numpy()


def _bias(module: nn.Module) -> npt.NDArray[np.float32] | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else floats(bias)


def _outliers(packed: PackedTensor) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]] | None:
    """OPQ outliers as flat indices (ascending) and their differences from the decoded codes,
    in the frame the codes are stored in: the correction :class:`QuantLinear` applies."""
    correction = _Fused.of(packed).correction
    if correction is None:
        return None
    rows, cols, deltas = correction
    flat = rows * packed.shape[1] + cols
    order = torch.argsort(flat)
    return flat[order].numpy().astype(np.uint64), floats(deltas[order])


def add_linear(
    builder: _native.LlamaBuilder,
    layer: int | None,
    name: str,
    qualified: str,
    module: nn.Module,
    activations: str | None,
) -> None:
    """Gives ``module`` (named ``qualified`` in the model) to ``builder`` as block ``layer``'s
    ``name`` (or ``lm_head``). ``activations`` overrides a QuantLinear's own mode."""
    if isinstance(module, QuantLinear):
        packed = module.packed
        if packed.device.type != "cpu":
            raise ValueError(f"{qualified} must be on the CPU, got {packed.device}")
        if module.in_features % module.block_size:
            raise ValueError(
                f"{qualified}: the native engine needs rows of whole blocks, got "
                f"in_features={module.in_features} with block_size={module.block_size}"
            )
        mode = check_activations(module.activations if activations is None else activations)
        outliers = _outliers(packed)
        builder.packed_linear(
            layer, name, module.out_features, module.in_features,
            packed.codes.contiguous().reshape(-1).numpy(), floats(packed.decoded_scales()),
            np.ascontiguousarray(packed.codebook.levels, dtype=np.float32), module.block_size, mode,
            bias=_bias(module), rotation=packed.rotation,
            outlier_indices=None if outliers is None else outliers[0],
            outlier_deltas=None if outliers is None else outliers[1],
        )  # fmt: skip
    elif type(module) is nn.Linear:
        if module.weight.device.type != "cpu":
            raise ValueError(f"{qualified} must be on the CPU, got {module.weight.device}")
        builder.dense_linear(
            layer, name, module.out_features, module.in_features, floats(module.weight),
            bias=_bias(module),
        )  # fmt: skip
    else:
        raise ValueError(
            f"{qualified} is a {type(module).__name__}: the native engine takes "
            "bofrs.nn.QuantLinear or torch.nn.Linear layers"
        )
