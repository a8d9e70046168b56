"""bofrs: data-free 4-bit block-wise quantization of LLM weights, with a fast Rust core.

>>> import torch, bofrs
>>> w = torch.randn(256, 512, dtype=torch.bfloat16)
>>> packed = bofrs.pack(w, "nf4", block_size=64)
>>> packed.bits_per_weight
4.25
>>> bofrs.quantization_error(w, packed)["relative_mse"] < 0.01
True
>>> str(bofrs.pack(w, "bof4s@128+opq").format)
'bof4s@128+opq'

The package by layer: :mod:`bofrs.formats` (the quantization formats and :class:`Format`),
:mod:`bofrs.io` (files, checkpoints, conversion), :mod:`bofrs.nn` (modules, ``quantize_model``),
:mod:`bofrs.eval` (KL divergence and perplexity against the unquantized model, sensitivities,
allocation, llama.cpp peers, offline text and models) and :mod:`bofrs.cli`.
"""

from __future__ import annotations

from bofrs import _native, nn
from bofrs._errors import FormatError
from bofrs._system import num_threads, supported_isas
from bofrs.eval import allocate_model, calibrate_errors, evaluate_formats, fake_quantized
from bofrs.eval.knapsack import Allocation, allocate
from bofrs.eval.linearity import (
    build_menu,
    cross_entropy,
    estimate_sensitivity,
    layer_errors,
    perplexity,
)
from bofrs.formats import (
    BlockwiseFormat,
    Codebook,
    Format,
    HiggsFormat,
    HiggsTensor,
    KeepFormat,
    Outliers,
    PackedTensor,
    QuantizedTensor,
    available_codebooks,
    codebook,
    expected_error,
    hadamard,
    higgs_grid,
    opq_threshold,
    optimize_codebook,
    pack,
    pack_higgs,
    quantization_error,
    unpack,
)
from bofrs.io import (
    load_file,
    load_quantized,
    quantize_checkpoint,
    read_metadata,
    save_file,
    save_quantized,
)
from bofrs.nn import QuantConfig, quantize_model

__version__: str = _native.__version__

__all__ = [
    "Allocation",
    "BlockwiseFormat",
    "Codebook",
    "Format",
    "FormatError",
    "HiggsFormat",
    "HiggsTensor",
    "KeepFormat",
    "Outliers",
    "PackedTensor",
    "QuantConfig",
    "QuantizedTensor",
    "allocate",
    "allocate_model",
    "available_codebooks",
    "build_menu",
    "calibrate_errors",
    "codebook",
    "cross_entropy",
    "estimate_sensitivity",
    "evaluate_formats",
    "expected_error",
    "fake_quantized",
    "hadamard",
    "higgs_grid",
    "layer_errors",
    "load_file",
    "load_quantized",
    "nn",
    "num_threads",
    "optimize_codebook",
    "opq_threshold",
    "pack",
    "pack_higgs",
    "perplexity",
    "quantization_error",
    "quantize_checkpoint",
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
        from bofrs.hf import BofrsConfig

        return BofrsConfig
    raise AttributeError(f"module 'bofrs' has no attribute {name!r}")
