"""A native CPU decoder for Llama-architecture models quantized with bofrs.

:class:`LlamaEngine` copies a transformers ``LlamaForCausalLM`` (or ``MistralForCausalLM``) whose
Linear layers :func:`bofrs.nn.quantize_model` replaced by :class:`bofrs.nn.QuantLinear` into the
Rust decoder of ``bofrs-core``: one native call runs a whole pass of new tokens (every product
through the fused 4-bit kernels, attention over a float32 KV cache), without the interpreter
and with no per-layer Python. The packed codes and scales are used as they are (no
requantization); layers left in full precision run as dense float32 products.
"""

from __future__ import annotations

from bofrs.engine._llama import SUPPORTED_MODEL_TYPES, LlamaEngine

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaEngine"]
