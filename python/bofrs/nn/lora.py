"""LoRA (peft) on top of QuantLinear: peft's own LoRA ``Linear`` wrapper, registered for it."""

from __future__ import annotations

from typing import Any

from bofrs.nn.linear import QuantLinear


def lora_config(**kwargs: Any) -> Any:
    """A ``peft.LoraConfig(**kwargs)`` that also targets :class:`QuantLinear` layers.

    peft has no built-in dispatch for bofrs layers; this registers peft's LoRA ``Linear``
    wrapper (``base_layer(x) + B(A(dropout(x))) * scaling``) for them through peft's
    custom-module hook. Merging adapters into a 4-bit weight is not supported.
    """
    import peft

    config = peft.LoraConfig(**kwargs)
    register(config)
    return config


def register(config: Any) -> Any:
    """Registers QuantLinear on an existing ``peft.LoraConfig`` (returns it)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not hasattr(config, "_register_custom_module"):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: LoraLinear})
    return config
