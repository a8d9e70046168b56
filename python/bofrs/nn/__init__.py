"""Torch modules over packed weights: :class:`QuantLinear`, :class:`HiggsLinear`, LoRA support,
and :func:`quantize_model` with its :class:`QuantConfig`."""

from __future__ import annotations

from bofrs.formats.blockwise.matmul import ACTIVATION_MODES, quant_matmul
from bofrs.nn.higgs_linear import HiggsLinear
from bofrs.nn.linear import FUSED_MAX_TOKENS, QuantLinear, set_activations
from bofrs.nn.lora import lora_config, register
from bofrs.nn.quantize import QuantConfig, quantize_model

__all__ = [
    "ACTIVATION_MODES", "FUSED_MAX_TOKENS", "HiggsLinear", "QuantConfig", "QuantLinear", "lora_config",
    "quant_matmul", "quantize_model", "register", "set_activations",
]  # fmt: skip
