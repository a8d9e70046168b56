"""Shared set-up of the real-model evaluations: a GGUF model from a wheel and Austen text cut
into calibration (before the held-out chapter) and evaluation (from it) token windows, each
window opened by BOS where the model expects one (Gemma-3)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bofrs import evaldata
from bofrs.eval import tokenize_windows

#: Held-out text: Pride and Prejudice from this chapter on.
HELD_OUT_CHAPTER = evaldata.HELD_OUT[1]


@dataclass
class RealModel:
    name: str
    model: Any
    tokenizer: Any
    calib: torch.Tensor
    evaluation: torch.Tensor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(evaldata.MODELS), default="smollm2")
    parser.add_argument("--austen", "--data", dest="data",
                        help="folder with the extracted Debian packages (r-cran-janeaustenr, jargon-text); "
                        "default $BOFRS_EVALDATA or the installed ones")
    parser.add_argument("--windows", type=int, help="evaluation windows (default: all of the text)")
    parser.add_argument("--length", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--model-cache", help="folder keeping the dequantized model as a "
                        "pickle (GGUF dequantization is slow: minutes for Gemma)")


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
    novel = evaldata.austen_novels(evaldata.find_austen(args.data))
    before, held_out = evaldata.split_at_chapter(novel[evaldata.HELD_OUT[0]], HELD_OUT_CHAPTER)
    calib_chars = len(before) // 4  # ample for the calibration windows, no overlap with eval
    calib = tokenize_windows(tokenizer, before[-calib_chars:], args.calib_length, max_windows=args.calib_windows)
    if calib.shape[0] < args.calib_windows:
        raise ValueError(f"calibration text gives {calib.shape[0]} windows, {args.calib_windows} asked")
    evaluation = tokenize_windows(tokenizer, held_out, args.length, max_windows=args.windows)
    return RealModel(args.model, model, tokenizer, calib, evaluation)


def bos_of(real: RealModel) -> int | None:
    """The BOS id the windows start with, or None."""
    from bofrs.eval import bos_token

    return bos_token(real.tokenizer)
