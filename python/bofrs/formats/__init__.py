"""Quantization formats: one subpackage per family (:mod:`~bofrs.formats.blockwise`,
:mod:`~bofrs.formats.higgs`), the :class:`Format` value that names any of them, the
:class:`QuantizedTensor` both families' tensors are, packing, the Hadamard transform and metrics."""

from __future__ import annotations

from bofrs.formats.blockwise.codebooks import Codebook, available_codebooks, codebook
from bofrs.formats.blockwise.optimize import expected_error, optimize_codebook
from bofrs.formats.blockwise.outliers import Outliers, opq_threshold
from bofrs.formats.blockwise.packed import PackedTensor
from bofrs.formats.format import BlockwiseFormat, Format, HiggsFormat, KeepFormat
from bofrs.formats.hadamard import hadamard
from bofrs.formats.higgs.tensor import HiggsTensor, higgs_grid, pack_higgs
from bofrs.formats.metrics import quantization_error
from bofrs.formats.pack import pack, unpack
from bofrs.formats.tensor import QuantizedTensor, tensor_kinds

__all__ = [
    "BlockwiseFormat", "Codebook", "Format", "HiggsFormat", "HiggsTensor", "KeepFormat", "Outliers",
    "PackedTensor", "QuantizedTensor", "available_codebooks", "codebook", "expected_error", "hadamard",
    "higgs_grid", "opq_threshold", "optimize_codebook", "pack", "pack_higgs", "quantization_error",
    "tensor_kinds", "unpack",
]  # fmt: skip
