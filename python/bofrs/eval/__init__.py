"""Evaluating formats on a model: weight error, and on text the KL divergence to the
unquantized model, perplexity and top-1 agreement with paired bootstrap intervals; llama.cpp's
types as peers; the per-layer study; mixed allocations from the linearity theorem.

- :func:`evaluate_formats` (harness): every format on the same windows, against one reference
  pass (:class:`ReferenceLogProbs`, float16 memmap) — ``bofrs eval``.
- :func:`tokenize_windows` / :func:`token_windows`: windows, BOS-prefixed where the model wants it.
- :func:`llamacpp_format`: a llama.cpp type (requantized GGUF, read back) as a :class:`DecodedFormat`.
- :func:`per_layer_study`: KL with one layer quantized, beside weight and output error;
  :func:`per_layer_summary`: which of the two the KL follows.
- :func:`fake_quantized`, :func:`allocate_model`, :func:`calibrate_errors`.
- :func:`format_table`, :func:`compare`, :func:`ranking`: tables and paired comparisons.
- :mod:`bofrs.eval.linearity` (sensitivities, per-layer errors, perplexity),
  :mod:`bofrs.eval.knapsack` (the exact allocation), :mod:`bofrs.eval.data` (offline text and
  models, also as ``bofrs.evaldata``), :mod:`bofrs.eval.quantized` (one weight in one format).
"""

from __future__ import annotations

from bofrs.eval.allocation import allocate_model, calibrate_errors
from bofrs.eval.fake import DecodedFormat, fake_quantized, swapped
from bofrs.eval.harness import FormatEntry, evaluate_formats, score_model, summarize
from bofrs.eval.llamacpp import LLAMACPP_TYPES, find_llama_quantize, gguf_linear_weights, llama_quantize, llamacpp_format
from bofrs.eval.per_layer import (
    InputMoments, output_error, per_layer_study, per_layer_summary, per_layer_summary_table, per_layer_table, spearman,
)  # fmt: skip
from bofrs.eval.reference import ReferenceLogProbs
from bofrs.eval.report import compare, format_table, ranking
from bofrs.eval.scoring import TokenScores, score_window
from bofrs.eval.stats import Bootstrap, Interval, unit_of_token
from bofrs.eval.windows import bos_token, token_windows, tokenize_windows

__all__ = [
    "Bootstrap", "DecodedFormat", "FormatEntry", "InputMoments", "Interval", "LLAMACPP_TYPES",
    "ReferenceLogProbs", "TokenScores", "allocate_model", "bos_token", "calibrate_errors", "compare",
    "evaluate_formats", "fake_quantized", "find_llama_quantize", "format_table", "gguf_linear_weights",
    "llama_quantize", "llamacpp_format", "output_error", "per_layer_study", "per_layer_summary",
    "per_layer_summary_table", "per_layer_table", "ranking", "spearman",
    "score_model", "score_window", "summarize", "swapped", "token_windows", "tokenize_windows",
    "unit_of_token",
]  # fmt: skip
