"""Torch modules over packed weights: :class:`QuantLinear` and LoRA support."""

from __future__ import annotations

from .._linear import quant_matmul
from .linear import FUSED_MAX_TOKENS, QuantLinear
from .lora import lora_config, register

__all__ = ["FUSED_MAX_TOKENS", "QuantLinear", "lora_config", "quant_matmul", "register"]
