"""Former home of the evaluation code, now :mod:`bofrs.eval`; these names stay importable."""

from __future__ import annotations

from bofrs.eval import allocate_model, calibrate_errors, evaluate_formats, fake_quantized, format_table

__all__ = ["allocate_model", "calibrate_errors", "evaluate_formats", "fake_quantized", "format_table"]
