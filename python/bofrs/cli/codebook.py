"""``bofrs codebook``: print (and optionally plot) an optimized codebook."""

from __future__ import annotations

import argparse
import json

from bofrs.formats.blockwise.codebooks import Codebook
from bofrs.formats.blockwise.optimize import expected_error, optimize_codebook


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers the command."""
    p = commands.add_parser("codebook", help="optimize and print a BOF4 codebook")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--metric", choices=("mse", "mae"), default="mse")
    p.add_argument("--signed", action="store_true", help="signed absmax normalization (BOF4-S)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--no-pins", action="store_true", help="pin no level (default: the paper's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="also draw the levels next to NF4 and AF4")


def run(args: argparse.Namespace) -> str:
    """Optimizes the codebook the arguments describe; returns what to print."""
    normalization = "signed_absmax" if args.signed else "absmax"
    book = optimize_codebook(
        args.block_size,
        metric=args.metric,
        normalization=normalization,
        bits=args.bits,
        pinned=() if args.no_pins else None,
    )
    error = expected_error(book, metric=args.metric)
    nf4 = expected_error("nf4", args.block_size, metric=args.metric)
    if args.plot:
        _plot(book, args.block_size, args.plot)
    if args.json:
        return json.dumps({**book.to_dict(), "expected_error": error, "metric": args.metric})
    lines = [f"{book.name} (block size {args.block_size}, {normalization}, {args.bits} bits)"]
    lines += [f"{k:>4} {v: .10f}" for k, v in enumerate(book.levels)]
    lines.append(
        f"expected {args.metric.upper()} on N(0,1) weights: {error:.6e} "
        f"({error / nf4:.3f} x NF4's {nf4:.6e})"
    )
    return "\n".join(lines)


def _plot(book: Codebook, block_size: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bofrs.plot import plot_codebooks

    _, ax = plt.subplots(figsize=(7, 3))
    plot_codebooks(block_size, names=("nf4", "af4", book), ax=ax)
    ax.get_figure().savefig(path, bbox_inches="tight")  # type: ignore[union-attr]
    plt.close("all")
