"""Files: bofrs safetensors files (:mod:`~bofrs.io.files`), model checkpoints
(:mod:`~bofrs.io.checkpoint`) and whole-checkpoint conversion (:mod:`~bofrs.io.convert`)."""

from __future__ import annotations

from bofrs.io.checkpoint import load_quantized, save_quantized
from bofrs.io.convert import quantize_checkpoint
from bofrs.io.files import load_file, read_metadata, save_file

__all__ = ["load_file", "load_quantized", "quantize_checkpoint", "read_metadata", "save_file", "save_quantized"]
