"""bofrs: data-free 4-bit block-wise quantization of LLM weights, with a fast Rust core.

>>> import torch, bofrs
>>> w = torch.randn(256, 512, dtype=torch.bfloat16)
>>> packed = bofrs.pack(w, "nf4", block_size=64)
>>> packed.bits_per_weight
4.25
>>> bofrs.quantization_error(w, packed)["relative_mse"] < 0.01
True
"""

from __future__ import annotations

from . import _native
from ._codebooks import Codebook, available_codebooks, codebook
from ._checkpoint import load_quantized, save_quantized
from ._errors import FormatError
from ._io import load_file, read_metadata, save_file
from ._metrics import quantization_error
from ._pack import pack, unpack
from ._packed import PackedTensor
from ._quantize import QuantConfig, quantize_model
from . import nn

__version__: str = _native.__version__


def num_threads() -> int:
    """Threads the heavy calls use (``BOFRS_NUM_THREADS`` before the first call; default: all cores)."""
    return int(_native.num_threads())


def supported_isas() -> tuple[str, ...]:
    """Kernel variants this CPU runs ("portable" first, the default last); all give identical results."""
    return tuple(_native.supported_isas())


__all__ = [
    "Codebook",
    "FormatError",
    "PackedTensor",
    "QuantConfig",
    "available_codebooks",
    "codebook",
    "load_file",
    "load_quantized",
    "nn",
    "num_threads",
    "pack",
    "quantization_error",
    "quantize_model",
    "read_metadata",
    "save_file",
    "save_quantized",
    "supported_isas",
    "unpack",
]


def __getattr__(name: str) -> object:
    # transformers is optional (the `hf` extra): BofrsConfig imports it on first use.
    if name == "BofrsConfig":
        from .hf import BofrsConfig

        return BofrsConfig
    raise AttributeError(f"module 'bofrs' has no attribute {name!r}")
