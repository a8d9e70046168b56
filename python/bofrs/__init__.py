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

from bofrs import _native
from bofrs._allocate import Allocation, allocate
from bofrs.formats.blockwise.codebooks import Codebook, available_codebooks, codebook
from bofrs.io.convert import quantize_checkpoint
from bofrs.io.checkpoint import load_quantized, save_quantized
from bofrs._errors import FormatError
from bofrs._evaluate import allocate_model, calibrate_errors, evaluate_formats, fake_quantized
from bofrs.formats.hadamard import hadamard
from bofrs.formats.higgs.tensor import HiggsTensor, higgs_grid, pack_higgs
from bofrs._linearity import build_menu, cross_entropy, estimate_sensitivity, layer_errors, perplexity
from bofrs.io.files import load_file, read_metadata, save_file
from bofrs.formats.metrics import quantization_error
from bofrs.formats.blockwise.optimize import expected_error, optimize_codebook
from bofrs.formats.blockwise.outliers import Outliers
from bofrs.formats.pack import pack, unpack
from bofrs.formats.blockwise.packed import PackedTensor
from bofrs.nn.quantize import QuantConfig, quantize_model
from bofrs import nn

__version__: str = _native.__version__


def num_threads() -> int:
    """Threads the heavy calls use (``BOFRS_NUM_THREADS`` before the first call; default: all cores)."""
    return int(_native.num_threads())


def opq_threshold(block_size: int, q: float) -> float:
    """OPQ threshold factor ``t(I, q) = Phi^-1((q^(1/I) + 1) / 2)``: a value is an outlier when
    its magnitude exceeds ``t`` times its block's sample standard deviation."""
    from bofrs.formats.blockwise.outliers import check_quantile

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    checked = check_quantile(q)
    if checked is None:
        raise TypeError("q must be a float in (0, 1)")
    return float(_native.opq_threshold(block_size, checked))


def supported_isas() -> tuple[str, ...]:
    """Kernel variants this CPU runs ("portable" first, the default last); all give identical results."""
    return tuple(_native.supported_isas())


__all__ = [
    "Allocation",
    "Codebook",
    "FormatError",
    "HiggsTensor",
    "Outliers",
    "PackedTensor",
    "QuantConfig",
    "allocate",
    "allocate_model",
    "available_codebooks",
    "build_menu",
    "calibrate_errors",
    "cross_entropy",
    "estimate_sensitivity",
    "evaluate_formats",
    "codebook",
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
