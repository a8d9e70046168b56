"""Torch modules over packed weights: :class:`QuantLinear`, :class:`HiggsLinear`, LoRA support."""

from __future__ import annotations

from bofrs.formats.blockwise.matmul import ACTIVATION_MODES, quant_matmul
from bofrs.nn.higgs_linear import HiggsLinear
from bofrs.nn.linear import FUSED_MAX_TOKENS, QuantLinear, set_activations
from bofrs.nn.lora import lora_config, register

__all__ = ["ACTIVATION_MODES", "FUSED_MAX_TOKENS", "HiggsLinear", "QuantLinear", "lora_config", "quant_matmul", "register", "set_activations"]
