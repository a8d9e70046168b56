"""Offline evaluation text and models; moved to :mod:`bofrs.eval.data`, importable here too."""

from __future__ import annotations

from bofrs.eval.data import (
    CORPORA,
    HELD_OUT,
    MODELS,
    austen_novels,
    corpus_text,
    find_austen,
    gemma3_path,
    load_gguf,
    model_path,
    read_rdb_strings,
    smollm2_path,
    split_at_chapter,
)

__all__ = [
    "CORPORA", "HELD_OUT", "MODELS", "austen_novels", "corpus_text", "find_austen", "gemma3_path",
    "load_gguf", "model_path", "read_rdb_strings", "smollm2_path", "split_at_chapter",
]  # fmt: skip
