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

from bofrs._evaluate import evaluate_formats, format_table


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers ``eval`` and ``report``."""
    e = commands.add_parser("eval", help="per-layer error and perplexity of formats on a model")
    e.add_argument("model", help="transformers checkpoint directory or .gguf file")
    e.add_argument("--formats", default="nf4,af4,bof4,bof4s,bof4s+opq,higgs4p1,higgs4p2",
                   help="comma-separated format specs (see bofrs.layer_errors)")
    e.add_argument("--corpus", help="text file for perplexity (non-overlapping windows)")
    e.add_argument("--windows", type=int, default=8, help="windows of text to score")
    e.add_argument("--length", type=int, default=512, help="tokens per window")
    e.add_argument("--skip-tokens", type=int, default=0, help="tokens of the corpus to skip first")
    e.add_argument("--json", dest="json_out", help="also write the full result as JSON")
    e.add_argument("--per-layer", action="store_true", help="print the per-layer table too")
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


def _load_model(path: Path) -> tuple[Any, Any]:
    if path.suffix == ".gguf":
        from bofrs.evaldata import load_gguf

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
    if tokenizer is None:
        raise ValueError("corpus: the model has no tokenizer to read text with")
    ids = tokenizer(corpus.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][skip:]
    if ids.numel() < count * length:
        count = ids.numel() // length
    if count < 1:
        raise ValueError(f"corpus: {ids.numel()} tokens, fewer than one window of {length}")
    windows: torch.Tensor = ids[: count * length].reshape(count, length)
    return windows


def run_eval(args: argparse.Namespace) -> str:
    """Runs ``bofrs eval``; returns what to print."""
    model, tokenizer = _load_model(Path(args.model))
    tokens = None
    if args.corpus:
        tokens = _windows(tokenizer, Path(args.corpus), args.windows, args.length, args.skip_tokens)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    result = evaluate_formats(model, formats, tokens, progress=not args.no_progress)
    result["model"] = str(args.model)
    result["corpus"] = {"path": args.corpus, "windows": None if tokens is None else list(tokens.shape)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    text = format_table(result)
    if args.per_layer:
        names = list(result["layers"])
        head = "| layer | " + " | ".join(formats) + " |"
        rows = [head, "|---|" + "---|" * len(formats)]
        for n in names:
            cells = " | ".join(f"{result['formats'][f]['per_layer_t2'][n]:.5f}" for f in formats)
            rows.append(f"| {n} | {cells} |")
        text += "\n\n" + "\n".join(rows)
    return text


def run_sensitivity(args: argparse.Namespace) -> str:
    """Runs ``bofrs sensitivity``; returns what to print."""
    from bofrs._linearity import estimate_sensitivity

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
