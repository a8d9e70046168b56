"""Shared set-up of the real-model evaluations: a GGUF model from a wheel and Austen text cut
into calibration (before the held-out chapter) and evaluation (from it) token windows."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bofrs import evaldata

#: Held-out text: Pride and Prejudice from this chapter on.
HELD_OUT_CHAPTER = 50


@dataclass
class RealModel:
    name: str
    model: Any
    calib: torch.Tensor
    evaluation: torch.Tensor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(evaldata.MODELS), default="smollm2")
    parser.add_argument("--austen", required=True, help="extracted r-cran-janeaustenr folder")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--model-cache", help="folder keeping the dequantized model as a "
                        "transformers checkpoint (GGUF dequantization is slow: minutes for Gemma)")


def _windows(tokenizer: Any, text: str, count: int, length: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise ValueError(f"text has {ids.numel()} tokens, {count * length} needed")
    return ids[: count * length].reshape(count, length)


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    if not args.model_cache:
        return evaldata.load_gguf(evaldata.model_path(args.model))
    # transformers refuses save_pretrained on GGUF-loaded models: a pickle is only a cache.
    cached = Path(args.model_cache) / f"{args.model}.pt"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(evaldata.load_gguf(evaldata.model_path(args.model)), cached)
    model, tokenizer = torch.load(cached, weights_only=False)
    return model, tokenizer


def load(args: argparse.Namespace) -> RealModel:
    """The model named by ``--model`` (float32, dequantized GGUF) and its token windows:
    calibration from the end of the text before the held-out chapter, evaluation from it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _model(args)
    novel = evaldata.austen_novels(args.austen)["PRIDE AND PREJUDICE"]
    before, held_out = evaldata.split_at_chapter(novel, HELD_OUT_CHAPTER)
    calib_chars = len(before) // 4  # ample for the calibration windows, no overlap with eval
    calib = _windows(tokenizer, before[-calib_chars:], args.calib_windows, args.calib_length)
    evaluation = _windows(tokenizer, held_out, args.windows, args.length)
    return RealModel(args.model, model, calib, evaluation)
