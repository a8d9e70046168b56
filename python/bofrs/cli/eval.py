"""``bofrs eval`` and ``bofrs report``: formats measured on a model, and a report with plots."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import torch

from bofrs.eval import evaluate_formats, format_table


DEFAULT_FORMATS = "nf4,af4,bof4,bof4s,bof4s+opq,bof4s+rot,higgs4p1,higgs4p2"
PER_LAYER_FORMATS = "nf4,af4,bof4,bof4s,bof4s+rot"


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers ``eval``, ``sensitivity`` and ``report``."""
    e = commands.add_parser(
        "eval", help="KL divergence, perplexity and weight error of formats on a model, with intervals"
    )
    e.add_argument("model", help="transformers checkpoint directory, .gguf file, or a model of "
                   "bofrs.evaldata (smollm2, gemma3)")
    e.add_argument("--formats", default=DEFAULT_FORMATS,
                   help="comma-separated format specs (see bofrs.layer_errors)")
    e.add_argument("--corpus", default="pride50",
                   help="text: pride50 (Pride and Prejudice from chapter 50, default), austen (the "
                   "other novels), jargon (the Jargon File), a text file, or none (weight error only)")
    e.add_argument("--data", help="folder with the extracted Debian text packages (default: "
                   "$BOFRS_EVALDATA or the installed ones)")
    e.add_argument("--windows", type=int, help="at most this many windows (default: all the text)")
    e.add_argument("--length", type=int, default=512, help="tokens per window (BOS included)")
    e.add_argument("--skip-tokens", type=int, default=0, help="tokens of the corpus to skip first")
    e.add_argument("--baseline", default="nf4",
                   help="format the paired differences are taken to ('none': no comparison)")
    e.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--unit", choices=["window", "token"], default="window",
                   help="bootstrap unit (default window: tokens of a window are not independent)")
    e.add_argument("--reference-dir", help="keep the reference log-probabilities here and reuse "
                   "them in later runs on the same model and text (float16, 2 bytes per vocab entry "
                   "per token)")
    e.add_argument("--llamacpp", default="",
                   help="llama.cpp types to add as peers, e.g. Q4_0,IQ4_NL,IQ4_XS,Q4_K (needs "
                   "llama-quantize and a GGUF model)")
    e.add_argument("--llama-quantize", help="the llama-quantize binary or its folder (default: "
                   "$LLAMA_QUANTIZE or PATH)")
    e.add_argument("--llamacpp-dir", default="bofrs-llamacpp",
                   help="folder for the requantized GGUF files (kept for reuse)")
    e.add_argument("--gguf", help="GGUF file to requantize when the model is a checkpoint directory")
    e.add_argument("--json", dest="json_out", help="also write the full result as JSON")
    e.add_argument("--per-layer", action="store_true",
                   help="also the per-layer study: KL with one layer alone quantized")
    e.add_argument("--per-layer-formats", default=PER_LAYER_FORMATS)
    e.add_argument("--per-layer-windows", type=int, default=2, help="windows of the per-layer study")
    e.add_argument("--per-layer-stride", type=int, default=1,
                   help="score every k-th position in the per-layer study (cheaper)")
    e.add_argument("--no-progress", action="store_true")
    s = commands.add_parser(
        "sensitivity", help="per-layer sensitivities (alphas) for `bofrs quantize --budget`"
    )
    s.add_argument("model", help="transformers checkpoint directory or .gguf file")
    s.add_argument("-o", "--out", required=True, help="JSON file to write {layer: alpha}")
    s.add_argument("--corpus", help="text file: cross-entropy on it (default: data-free KL on "
                   "random tokens)")
    s.add_argument("--windows", type=int, default=4, help="windows of text (or random sequences)")
    s.add_argument("--length", type=int, default=256, help="tokens per window")
    s.add_argument("--noise", type=float, default=0.1, help="relative noise level t")
    s.add_argument("--no-progress", action="store_true")
    r = commands.add_parser("report", help="an HTML report with plots from `bofrs eval --json`")
    r.add_argument("result", help="JSON written by bofrs eval --json")
    r.add_argument("out", help="HTML file to write")
    r.add_argument("--block-size", type=int, default=64, help="block size of the codebook plots")


def _model_file(name: str) -> Path:
    from bofrs.eval import data

    return data.model_path(name) if name in data.MODELS else Path(name)


def _load_model(path: Path) -> tuple[Any, Any]:
    if path.suffix == ".gguf":
        from bofrs.eval.data import load_gguf

        return load_gguf(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is neither a checkpoint directory nor a .gguf file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train(False)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _windows(tokenizer: Any, corpus: Path, count: int, length: int, skip: int) -> torch.Tensor:
    """Windows of a text file for ``bofrs sensitivity`` (BOS-prefixed as the model expects)."""
    from bofrs.eval import tokenize_windows

    return tokenize_windows(tokenizer, corpus.read_text(encoding="utf-8"), length,
                            max_windows=count, skip_tokens=skip)  # fmt: skip


def _specs(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def run_eval(args: argparse.Namespace) -> str:
    """Runs ``bofrs eval``; returns what to print."""
    from bofrs.eval import (
        data, llamacpp_format, per_layer_study, per_layer_summary, per_layer_summary_table, per_layer_table,
        tokenize_windows,
    )  # fmt: skip
    from bofrs.eval.harness import FormatEntry

    path = _model_file(args.model)
    model, tokenizer = _load_model(path)
    tokens = None
    if args.corpus != "none":
        text = data.corpus_text(args.corpus, args.data)
        tokens = tokenize_windows(tokenizer, text, args.length, max_windows=args.windows,
                                  skip_tokens=args.skip_tokens)  # fmt: skip
    formats: list[FormatEntry] = list(_specs(args.formats))
    if args.llamacpp:
        source = Path(args.gguf) if args.gguf else path
        if source.suffix != ".gguf":
            raise ValueError("llamacpp: needs a GGUF model (or --gguf FILE) to requantize")
        from bofrs.eval.linearity import linear_layers

        names = list(linear_layers(model))
        for type_name in _specs(args.llamacpp):
            formats.append(llamacpp_format(model, source, type_name, names, binary=args.llama_quantize,
                                           workdir=args.llamacpp_dir))  # fmt: skip
    baseline = None if args.baseline == "none" else args.baseline
    result = evaluate_formats(
        model, formats, tokens, baseline=baseline, reference=args.reference_dir, unit=args.unit,
        resamples=args.resamples, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    result["model"] = str(args.model)
    result["corpus"] = {"name": args.corpus, "windows": None if tokens is None else list(tokens.shape)}
    text_out = format_table(result)
    if args.per_layer:
        if tokens is None:
            raise ValueError("per-layer: the study needs text (a --corpus)")
        study = per_layer_study(model, _specs(args.per_layer_formats), tokens[: args.per_layer_windows],
                                stride=args.per_layer_stride, progress=not args.no_progress)  # fmt: skip
        study["summary"] = per_layer_summary(study)
        result["per_layer"] = study
        text_out += "\n\n" + per_layer_table(study) + "\n\n" + per_layer_summary_table(study["summary"])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return text_out


def run_sensitivity(args: argparse.Namespace) -> str:
    """Runs ``bofrs sensitivity``; returns what to print."""
    from bofrs.eval.linearity import estimate_sensitivity

    model, tokenizer = _load_model(Path(args.model))
    tokens = None
    if args.corpus:
        tokens = _windows(tokenizer, Path(args.corpus), args.windows, args.length, 0)
    alphas = estimate_sensitivity(
        model, tokens, metric="cross_entropy" if tokens is not None else "kl",
        noise_levels=(args.noise,), num_sequences=args.windows, seq_len=args.length,
        progress=not args.no_progress,
    )  # fmt: skip
    Path(args.out).write_text(json.dumps(alphas, indent=1))
    unit = "nats of cross-entropy" if tokens is not None else "nats of KL"
    return f"bofrs: alphas ({unit} per unit t^2) of {len(alphas)} layers written to {args.out}"


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def run_report(args: argparse.Namespace) -> str:
    """Runs ``bofrs report``; returns what to print."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bofrs.plot import plot_codebooks, plot_error_vs_block_size

    try:
        result = json.loads(Path(args.result).read_text())
        formats: dict[str, Any] = result["formats"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"result: not a bofrs eval JSON file ({err})") from None
    images = []
    fig, ax = plt.subplots(figsize=(7, 3))
    plot_codebooks(args.block_size, names=("nf4", "af4", "bof4", "bof4s"), ax=ax)
    images.append(("Codebook levels", _png(fig)))
    fig, ax = plt.subplots(figsize=(7, 4))
    plot_error_vs_block_size(ax=ax)
    images.append(("Expected MSE on Gaussian weights versus block size", _png(fig)))
    fig, ax = plt.subplots(figsize=(8, 4))
    for spec, entry in formats.items():
        values = list(entry["per_layer_t2"].values())
        ax.plot(range(len(values)), values, marker=".", label=spec)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("relative squared error t^2")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    images.append(("Per-layer weight error", _png(fig)))
    if "baseline_perplexity" in result:
        fig, ax = plt.subplots(figsize=(7, 4))
        for spec, entry in formats.items():
            ax.scatter(entry["bits_per_weight"], entry["perplexity"], label=spec)
            ax.annotate(spec, (entry["bits_per_weight"], entry["perplexity"]), fontsize=8)
        ax.axhline(result["baseline_perplexity"], color="gray", linestyle="--", label="unquantized")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("perplexity")
        images.append(("Perplexity versus bits per weight", _png(fig)))
    plt.close("all")
    table = html.escape(format_table(result))
    body = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'/>"
        for title, data in images
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>bofrs report</title></head><body>"
        f"<h1>bofrs report: {html.escape(str(result.get('model', '')))}</h1>"
        f"<pre>{table}</pre>{body}</body></html>"
    )
    Path(args.out).write_text(page, encoding="utf-8")
    return f"bofrs: wrote {args.out} ({len(images)} plots)"
