"""Torch modules over packed weights: :class:`QuantLinear`, :class:`HiggsLinear`, LoRA support."""

from __future__ import annotations

from .._linear import ACTIVATION_MODES, quant_matmul
from .higgs_linear import HiggsLinear
from .linear import FUSED_MAX_TOKENS, QuantLinear, set_activations
from .lora import lora_config, register

__all__ = ["ACTIVATION_MODES", "FUSED_MAX_TOKENS", "HiggsLinear", "QuantLinear", "lora_config", "quant_matmul", "register", "set_activations"]
